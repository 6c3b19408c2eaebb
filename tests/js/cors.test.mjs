// Cross-origin in headless Chromium: pages served from other ports than the gateway's (tests/js_harness.py).
// ALLOWED_PAGE_URL is in the gateway's server.cors_origins, REFUSED_PAGE_URL is not.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { GATEWAY, START, control, launch, skip } from "./lib.mjs";

const ALLOWED = process.env.ALLOWED_PAGE_URL;
const REFUSED = process.env.REFUSED_PAGE_URL;

let browser;
before(async () => { if (!skip) browser = await launch(); });
after(async () => { await browser?.close(); });

async function pageOn(origin, uid) {
  const page = await browser.newPage();
  const consoleErrors = [];
  page.on("console", (message) => { if (message.type() === "error") consoleErrors.push(message.text()); });
  const seen = [];
  page.on("request", (request) => {
    if (request.url().startsWith(GATEWAY)) seen.push(`${request.method()} ${new URL(request.url()).pathname}`);
  });
  await page.goto(`${origin}/`);
  await page.exposeFunction("testToken", (lifetime) => control(`/token?uid=${uid}&lifetime=${lifetime}`, "GET"));
  return { page, consoleErrors, seen };
}

test("a page of an allowed origin streams with Authorization and Last-Event-ID, and reads error answers", { skip }, async () => {
  await control("/jobs/xo-job?intervals=minute&count=400&status=running&uid=xo");
  const { page, seen } = await pageOn(ALLOWED, "xo");
  await page.evaluate(async (gateway) => {
    const { openCandleStream } = await import("/client/index.js");
    let chunks = 0;
    window.stream = openCandleStream({
      url: gateway, id: "xo-job", intervals: ["minute"], chunkSize: 50, follow: true,
      getToken: () => window.testToken(3600),
      // A resume: the reconnect carries Last-Event-ID, a second preflighted header.
      onEvent: (event) => { if (event.event === "data_chunk" && ++chunks === 3) window.stream.dropConnection(); },
    });
  }, GATEWAY);
  await page.waitForFunction(() => window.stream.state.intervals.minute.status === "complete");
  await control("/jobs/xo-job/status?status=completed");
  const result = await page.evaluate(async (gateway) => {
    const { openCandleStream } = await import("/client/index.js");
    const state = await window.stream.done;
    // An error answer's JSON is readable cross-origin: the client reports the server's message.
    const bad = await openCandleStream({ url: gateway, id: "xo-job", intervals: "Minute", getToken: () => window.testToken(3600) })
      .done.then(() => null, (error) => ({ code: error.code, message: error.message }));
    return { status: state.status, reconnects: state.reconnects, times: state.intervals.minute.points.map((p) => Date.parse(p.time)), bad };
  }, GATEWAY);
  assert.equal(result.status, "complete");
  assert.ok(result.reconnects >= 1);
  assert.deepEqual(result.times, result.times.map((_, i) => START + i * 60_000));
  assert.equal(result.times.length, 400);
  assert.equal(result.bad.code, "invalid_request");
  assert.match(result.bad.message, /^intervals/);
  // Chromium asked first (its preflight cache answers the reconnect's), then streamed.
  const answers = await control("/answers?path=/xo-job/", "GET");
  assert.equal(answers[0], "OPTIONS /api/sse/backtest/xo-job/data/multi 204", answers.join("\n"));
  assert.ok(answers.filter((s) => s === "GET /api/sse/backtest/xo-job/data/multi 200").length >= 2, answers.join("\n"));
  assert.ok(answers.includes("GET /api/sse/backtest/xo-job/data/multi 400"), answers.join("\n"));

  // A bare EventSource (no preflight: a token in the URL) reads too.
  const points = await page.evaluate(async ({ gateway, token }) => new Promise((resolve, reject) => {
    let count = 0;
    const source = new EventSource(`${gateway}/api/sse/backtest/xo-job/data/multi?intervals=minute&token=${token}`);
    source.addEventListener("data_chunk", (e) => { count += JSON.parse(e.data).data_points.length; });
    source.addEventListener("all_complete", () => { source.close(); resolve(count); });
    source.onerror = () => { source.close(); reject(new Error(`EventSource failed after ${count} points`)); };
  }), { gateway: GATEWAY, token: await control("/token?uid=xo", "GET") });
  assert.equal(points, 400);
  await page.close();
});

test("a page of another origin is refused at the preflight: the stream is never requested", { skip }, async () => {
  await control("/jobs/xo-refused?intervals=minute&count=10&status=completed&uid=xo2");
  const { page, consoleErrors, seen } = await pageOn(REFUSED, "xo2");
  const result = await page.evaluate(async (gateway) => {
    const { openCandleStream } = await import("/client/index.js");
    const stream = openCandleStream({
      url: gateway, id: "xo-refused", intervals: "minute", getToken: () => window.testToken(3600), giveUpAfterMs: 1500,
      initialRetryMs: 200, maxBackoffMs: 400,
    });
    const error = await stream.done.then(() => null, (e) => ({ code: e.code, message: e.message }));
    return { error, lastError: stream.state.lastError, points: stream.state.intervals.minute.points.length };
  }, GATEWAY);
  assert.equal(result.points, 0);
  assert.equal(result.error.code, "unavailable", JSON.stringify(result));
  assert.equal(result.lastError.reason, "network", "to the page a refused origin looks like a network error");
  assert.ok(consoleErrors.some((text) => /blocked by CORS policy/.test(text)), consoleErrors.join("\n"));
  // The page tried (and retried) the stream; the gateway only ever saw preflights, and refused them.
  assert.ok(seen.length >= 2, seen.join("\n"));
  const answers = await control("/answers?path=/xo-refused/", "GET");
  assert.ok(answers.length >= 1);
  assert.deepEqual(new Set(answers), new Set(["OPTIONS /api/sse/backtest/xo-refused/data/multi 403"]), answers.join("\n"));
  await page.close();
});
