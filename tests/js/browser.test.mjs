// In headless Chromium, against the real gateway of tests/js_harness.py (run by tests/test_browser.py):
// the client over the page's real fetch(), what a bare EventSource does with each answer, and the console.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { mkdirSync } from "node:fs";
import { createRequire } from "node:module";
import path from "node:path";

const require = createRequire(new URL("../../frontend/package.json", import.meta.url));
const { chromium } = require("playwright-core");

const GATEWAY = process.env.GATEWAY_URL;
const CONTROL = process.env.CONTROL_URL;
const CHROMIUM = process.env.CHROMIUM_PATH ?? "/usr/bin/chromium";
const SCREENSHOTS = process.env.SCREENSHOT_DIR ?? "artifacts/screenshots";
const skip = GATEWAY && CONTROL ? false : "needs GATEWAY_URL and CONTROL_URL (run by tests/test_browser.py)";
const START = Date.parse("2025-04-01T00:00:00Z");

async function control(route, method = "POST") {
  const response = await fetch(CONTROL + route, { method });
  const text = await response.text();
  assert.equal(response.status, 200, `${route}: ${text}`);
  return text.startsWith("{") ? JSON.parse(text) : text;
}

let browser;
before(async () => {
  if (skip) return;
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  });
});
after(async () => { await browser?.close(); });

async function newPage() {
  const page = await browser.newPage({ viewport: { width: 1280, height: 1100 } });
  const problems = [];
  page.on("pageerror", (error) => problems.push(String(error)));
  page.on("console", (message) => {
    // The browser logs every non-2xx answer; the expected 401 before a token refresh is not a problem.
    if (message.type() === "error" && !message.text().includes("status of 401")) problems.push(message.text());
  });
  return { page, problems };
}

test("the client in Chromium: fetch streaming, token refresh on 401, exact resume", { skip }, async () => {
  await control("/jobs/browser-job?intervals=minute&count=700&status=running&uid=browser");
  const token = (lifetime) => control(`/token?uid=browser&lifetime=${lifetime}`, "GET");
  const { page } = await newPage();
  await page.goto(`${GATEWAY}/healthz`); // any page of the gateway's origin
  await page.exposeFunction("freshToken", () => token(2));
  await page.evaluate(async () => {
    const { openCandleStream } = await import("/static/client/index.js");
    window.calls = [];
    window.s = openCandleStream({
      id: "browser-job", intervals: ["minute"], chunkSize: 100, follow: true, limit: 5000,
      getToken: (force) => { window.calls.push(force); return window.freshToken(); },
    });
  });
  await page.waitForFunction(() => window.s.state.intervals.minute.status === "complete");
  await page.waitForTimeout(2300); // the token expires; the stream goes on
  await page.evaluate(() => window.s.dropConnection());
  await control("/jobs/browser-job/append?interval=minute&count=50");
  await page.waitForFunction(() => window.s.state.intervals.minute.points.length === 750);
  await control("/jobs/browser-job/status?status=completed");
  const result = await page.evaluate(async () => {
    const state = await window.s.done;
    return { calls: window.calls, refreshes: state.tokenRefreshes, status: state.status,
      times: state.intervals.minute.points.map((p) => p.time) };
  });
  assert.deepEqual(result.calls, [false, true]);
  assert.equal(result.refreshes, 1);
  assert.equal(result.status, "complete");
  assert.deepEqual(result.times.map(Date.parse), result.times.map((_, i) => START + i * 60_000));
  await page.close();
});

test("a bare EventSource: resumes after a network error, stops for good on 401 and on 204", { skip }, async () => {
  await control("/jobs/es-job?intervals=minute&count=300&status=running&uid=es");
  const token = await control("/token?uid=es", "GET");
  const { page } = await newPage();
  await page.goto(`${GATEWAY}/healthz`);
  const url = `/api/sse/backtest/es-job/data/multi?intervals=minute&chunk_size=100&follow=true&token=${token}`;
  await page.evaluate((url) => {
    window.log = [];
    window.points = 0;
    const source = new EventSource(url);
    window.es = source;
    source.onopen = () => window.log.push("open");
    source.onerror = () => window.log.push(`error readyState=${source.readyState}`);
    source.addEventListener("data_chunk", (e) => { window.points += JSON.parse(e.data).data_points.length; });
    source.addEventListener("all_complete", (e) => { window.log.push("all_complete"); window.lastId = e.lastEventId; source.close(); });
  }, url);
  await page.waitForFunction(() => window.points === 300);
  await control("/replica/restart"); // a network error: the browser reconnects by itself, with Last-Event-ID
  await page.waitForFunction(() => window.log.filter((l) => l === "open").length >= 2, null, { timeout: 15_000 });
  await control("/jobs/es-job/append?interval=minute&count=20");
  await control("/jobs/es-job/status?status=completed");
  await page.waitForFunction(() => window.log.includes("all_complete"));
  const resumed = await page.evaluate(() => ({ points: window.points, log: window.log, lastId: window.lastId }));
  assert.equal(resumed.points, 320, JSON.stringify(resumed.log));
  assert.ok(resumed.log.includes("error readyState=0"), "a network error leaves it CONNECTING");

  const ends = await page.evaluate(async ({ url, lastId }) => {
    const outcome = (source) => new Promise((resolve) => {
      source.onerror = () => setTimeout(() => resolve(source.readyState), 500);
    });
    const unauthorized = await outcome(new EventSource(url.replace(/token=[^&]*/, "token=expired")));
    const done = await outcome(new EventSource(`${url}&last_event_id=${encodeURIComponent(lastId)}`));
    return { unauthorized, done };
  }, { url, lastId: resumed.lastId });
  assert.deepEqual(ends, { unauthorized: 2, done: 2 }, "CLOSED (2): EventSource gives up for good");
  await page.close();
});

test("the console: live candles, a dropped connection, a token refresh, charts equal to the store", { skip }, async () => {
  mkdirSync(SCREENSHOTS, { recursive: true });
  await control("/jobs/console-job?intervals=minute,3minute,day&count=0&status=running&uid=demo");
  await control("/jobs/console-job/append?interval=minute&count=600");
  await control("/jobs/console-job/append?interval=3minute&count=200");
  await control("/jobs/console-job/append?interval=day&count=20");
  await control("/jobs/console-job/run?intervals=minute,3minute,day&per_tick=30,10,1&ticks=28&tick_ms=250");
  const { page, problems } = await newPage();
  const opened = Date.now();
  await page.goto(`${GATEWAY}/?id=console-job&intervals=minute,3minute,day&follow=true&limit=5000&chunk_size=200&token_lifetime=5`);
  await page.waitForFunction(() => window.consoleState?.intervals?.day?.status === "live", null, { timeout: 15_000 });
  await page.screenshot({ path: path.join(SCREENSHOTS, "console-live.png"), fullPage: true });

  await page.click("#drop");
  await page.waitForFunction(() => window.consoleState.stream.reconnects >= 1);
  await page.waitForTimeout(Math.max(0, opened + 5600 - Date.now())); // past the dev token's 5 s
  await page.click("#drop"); // this reconnect meets a 401 and refreshes the token
  await page.waitForFunction(() => window.consoleState.stream.status === "complete", null, { timeout: 20_000 });
  await page.waitForTimeout(300); // the last frame is drawn
  await page.screenshot({ path: path.join(SCREENSHOTS, "console-complete.png"), fullPage: true });

  const shown = await page.evaluate(() => window.consoleState);
  const stored = await control("/jobs/console-job/stored", "GET");
  for (const name of ["minute", "3minute", "day"]) {
    const interval = shown.intervals[name];
    assert.equal(interval.chartPoints, Math.min(stored[name], 5000), `${name}: chart vs store`);
    assert.equal(interval.points, interval.chartPoints, `${name}: chart vs client state`);
    assert.equal(interval.jobStatus, "completed", `${name} is not stale after all_complete`);
    assert.equal(interval.isPartial, false);
  }
  assert.ok(shown.stream.reconnects >= 2, JSON.stringify(shown.stream));
  assert.ok(shown.stream.tokenRefreshes >= 1, JSON.stringify(shown.stream));
  const progress = await page.$$eval(".bar > div", (bars) => bars.map((bar) => bar.style.width));
  assert.deepEqual(progress, ["100%", "100%", "100%"]);
  assert.deepEqual(problems, []);
  await page.close();
});

test("the console shows an error on the interval it concerns", { skip }, async () => {
  await control("/jobs/console-err-job?intervals=minute&count=50&status=completed&uid=demo");
  const { page } = await newPage();
  await page.goto(`${GATEWAY}/?id=console-err-job&intervals=hour,minute&follow=false`);
  await page.waitForFunction(() => window.consoleState?.stream?.status === "complete");
  await page.waitForTimeout(200);
  const card = await page.$eval('.card[data-interval="hour"] .error', (el) => ({ shown: el.style.display, text: el.textContent }));
  assert.equal(card.shown, "block");
  assert.match(card.text, /interval_not_found/);
  const minute = await page.evaluate(() => window.consoleState.intervals.minute);
  assert.equal(minute.chartPoints, 50);
  await page.screenshot({ path: path.join(SCREENSHOTS, "console-interval-error.png"), fullPage: true });
  // Opening the stream again starts the charts afresh: the closed stream draws nothing more.
  await page.click("#open");
  await page.waitForFunction(() => window.consoleState?.stream?.status === "complete");
  await page.waitForTimeout(200);
  const again = await page.evaluate(() => window.consoleState.intervals.minute);
  assert.equal(again.chartPoints, 50);
  await page.close();
});

// Compressed streams (issue 22). Chromium offers "gzip, deflate, br, zstd" (here, to 127.0.0.1), so
// every stream of these tests comes zstd-coded; the gzip run's page asks for "gzip, deflate" only.
for (const coding of ["gzip", "zstd"]) {
  test(`a ${coding} stream: EventSource and the client's fetch decode it, resume after a cut included`, { skip }, async () => {
    const job = `coded-${coding}`;
    await control(`/jobs/${job}?intervals=minute&count=300&status=running&uid=${job}`);
    const token = await control(`/token?uid=${job}`, "GET");
    const { page, problems } = await newPage();
    if (coding === "gzip") await page.setExtraHTTPHeaders({ "Accept-Encoding": "gzip, deflate" });
    const encodings = [];
    page.on("response", (response) => {
      if (response.url().includes("/api/sse/")) encodings.push(response.headers()["content-encoding"] ?? "identity");
    });
    await page.goto(`${GATEWAY}/healthz`);
    const url = `/api/sse/backtest/${job}/data/multi?intervals=minute&chunk_size=100&follow=true&token=${token}`;
    await page.evaluate(async ({ url, job, token }) => {
      window.es = { points: 0, opens: 0, done: false, log: [] };
      const source = new EventSource(url);
      source.onopen = () => { window.es.opens += 1; window.es.log.push("open"); };
      source.onerror = () => { window.es.log.push(`error readyState=${source.readyState}`); };
      source.addEventListener("data_chunk", (e) => { window.es.points += JSON.parse(e.data).data_points.length; });
      source.addEventListener("all_complete", () => { window.es.done = true; source.close(); });
      const { openCandleStream } = await import("/static/client/index.js");
      window.s = openCandleStream({ id: job, intervals: ["minute"], chunkSize: 100, follow: true, getToken: () => token });
    }, { url, job, token });
    await page.waitForFunction(() => window.es.points === 300 && window.s.state.intervals.minute.points.length === 300);
    // One live event at a time, each decoded as it arrives.
    for (let n = 1; n <= 3; n++) {
      await control(`/jobs/${job}/append?interval=minute&count=1`);
      await page.waitForFunction((n) => window.es.points === 300 + n && window.s.state.intervals.minute.points.length === 300 + n, n);
    }
    await control("/replica/restart"); // both reconnect with their last event id, to a new compressed stream
    await control(`/jobs/${job}/append?interval=minute&count=20`);
    await control(`/jobs/${job}/status?status=completed`);
    await page.waitForFunction(() => window.es.done, null, { timeout: 30_000 }).catch(async (error) => {
      throw new Error(`${error}: ${JSON.stringify(await page.evaluate(() => [window.es, window.s.state.status]))}`);
    });
    const state = await page.evaluate(async () => {
      const state = await window.s.done;
      return { es: window.es.points, client: state.intervals.minute.points.map((p) => p.time), status: state.status };
    });
    assert.equal(state.es, 323);
    assert.ok(await page.evaluate(() => window.es.opens >= 2), "the EventSource reconnected");
    assert.equal(state.status, "complete");
    assert.deepEqual(state.client.map(Date.parse), state.client.map((_, i) => START + i * 60_000));
    assert.equal(state.client.length, 323);
    assert.ok(encodings.length >= 4, JSON.stringify(encodings)); // two streams, each opened twice
    assert.deepEqual([...new Set(encodings)], [coding]);
    // (A page's first load may ask for /favicon.ico: a 404 that is no decoding problem.)
    assert.deepEqual(problems.filter((problem) => !problem.includes("status of 404")), []);
    await page.close();
  });
}
