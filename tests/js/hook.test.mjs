// useCandleStream (@candle-gateway/client/react) in headless Chromium, in a React app of two charts
// (tests/js/pages/hook-app.jsx, StrictMode), against the real gateway of tests/js_harness.py.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { mkdirSync } from "node:fs";
import path from "node:path";
import { GATEWAY, SCREENSHOTS, START, bundle, control, launch, skip, sleep, trackStreams, until } from "./lib.mjs";

let browser;
let app;
before(async () => {
  if (skip) return;
  [browser, app] = await Promise.all([launch(), bundle("hook-app.jsx")]);
});
after(async () => { await browser?.close(); });

async function openApp(tokenLifetimeS) {
  const page = await browser.newPage({ viewport: { width: 1000, height: 700 } });
  const problems = [];
  page.on("pageerror", (error) => problems.push(String(error)));
  page.on("console", (message) => {
    if (message.type() === "error" && !message.text().includes("status of 401")) problems.push(message.text());
  });
  await page.route("**/favicon.ico", (route) => route.fulfill({ status: 204 }));
  const streams = trackStreams(page);
  await page.goto(`${GATEWAY}/healthz`); // the gateway's origin
  await page.exposeFunction("testToken", (uid) => control(`/token?uid=${uid}&lifetime=${tokenLifetimeS}`, "GET"));
  await page.addScriptTag({ content: app, type: "module" });
  await page.waitForFunction(() => window.app !== undefined);
  return { page, problems, streams };
}

const chart = (page, interval) => page.$eval(`.chart[data-interval="${interval}"]`, (el) => ({
  status: el.dataset.status, count: Number(el.dataset.count), chartPoints: Number(el.dataset.chartPoints),
  progress: Number(el.dataset.progress),
}));
const openOnServer = async () => (await control("/streams", "GET")).open;

test("two charts through the hook: StrictMode, a frame per render, a cut connection, an expired token", { skip }, async () => {
  await control("/jobs/hook-job?intervals=day,minute&count=0&status=running&uid=hook");
  await control("/jobs/hook-job/append?interval=day&count=40");
  await control("/jobs/hook-job/append?interval=minute&count=900");
  const { page, problems, streams } = await openApp(3);
  const tokenMinted = Date.now();
  await page.evaluate(() => window.app.render({
    uid: "hook", id: "hook-job", intervals: ["day", "minute"], follow: true, chunkSize: 10, limit: 5000,
    maxBackoffMs: 500,
  }));
  await page.waitForFunction(() => document.querySelector('.chart[data-interval="minute"]')?.dataset.count === "900");
  assert.deepEqual(await chart(page, "day"), { status: "complete", count: 40, chartPoints: 40, progress: 1 });
  assert.deepEqual(await chart(page, "minute"), { status: "complete", count: 900, chartPoints: 900, progress: 1 });
  // StrictMode mounted, unmounted and mounted the hook: one stream was opened, not two.
  assert.equal(streams.started.length, 1, streams.started.join("\n"));
  const counts = await page.evaluate(() => ({ ...window.probe, view: undefined }));
  // 98 events (94 chunks of 10 candles, the starts and completes) never cost a render each: every
  // commit waited for an animation frame (StrictMode's mount adds a few), and events that arrived
  // together (one network read holds many) shared one. Typically 6 or 7 commits in 18 to 30 frames.
  assert.ok(counts.events >= 98, JSON.stringify(counts));
  assert.ok(counts.commits <= counts.frames + 3, `${counts.commits} commits in ${counts.frames} frames`);
  assert.ok(counts.commits < counts.events, `${counts.commits} commits for ${counts.events} events`);

  // The token (3 s) expires; a real cut (the replica restarts) makes the client reconnect: 401, a fresh
  // token through the caller's getToken, and the stream resumes exactly.
  await sleep(Math.max(0, tokenMinted + 3500 - Date.now()));
  await control("/replica/restart");
  await control("/jobs/hook-job/append?interval=minute&count=60");
  await control("/jobs/hook-job/append?interval=day&count=2");
  await page.waitForFunction(() => window.probe.view.intervals.minute.candles.length === 960, null, { timeout: 20_000 });
  await page.waitForFunction(() => window.probe.view.intervals.day.candles.length === 42);
  const view = await page.evaluate(() => {
    const v = window.probe.view;
    return { tokenCalls: window.probe.tokenCalls, refreshes: v.tokenRefreshes, reconnects: v.reconnects,
      status: v.status, minute: v.intervals.minute.candles.map((c) => Date.parse(c.time)),
      day: v.intervals.day.candles.map((c) => Date.parse(c.time)), minuteStatus: v.intervals.minute.status };
  });
  assert.deepEqual(view.tokenCalls, [false, true]);
  assert.equal(view.refreshes, 1);
  assert.ok(view.reconnects >= 1);
  assert.equal(view.status, "open");
  assert.equal(view.minuteStatus, "live");
  assert.deepEqual(view.minute, view.minute.map((_, i) => START + i * 60_000), "no gap, no duplicate");
  assert.deepEqual(view.day, view.day.map((_, i) => START + i * 86_400_000));
  await page.waitForFunction(() => document.querySelector('.chart[data-interval="minute"]').dataset.chartPoints === "960");
  mkdirSync(SCREENSHOTS, { recursive: true });
  await page.screenshot({ path: path.join(SCREENSHOTS, "hook-two-charts.png"), fullPage: true });

  // The job completes: the hook says so, and the stream ends.
  await control("/jobs/hook-job/status?status=completed");
  await page.waitForFunction(() => document.getElementById("app").dataset.status === "complete");
  assert.equal(await page.$eval("#app", (el) => el.dataset.jobStatus), "completed");
  await until(() => streams.open.size === 0, "the finished stream's request to end");
  assert.deepEqual(problems, []);
  await page.close();
});

test("new arguments reopen the stream; an unmount mid-stream leaves no request open", { skip }, async () => {
  await control("/jobs/hook-a?intervals=day,minute&count=30&status=running&uid=hook2");
  await control("/jobs/hook-b?intervals=day&count=12&status=running&uid=hook2");
  const { page, problems, streams } = await openApp(3600);
  const args = { uid: "hook2", id: "hook-a", intervals: ["day", "minute"], follow: true };
  await page.evaluate((args) => window.app.render(args), args);
  await page.waitForFunction(() => document.querySelector('.chart[data-interval="minute"]')?.dataset.count === "30");
  // A re-render with equal arguments (a new getToken function each time) keeps the stream.
  await page.evaluate((args) => window.app.render({ ...args }), args);
  await sleep(300);
  assert.equal(streams.started.length, 1);

  await page.evaluate((args) => window.app.render({ ...args, id: "hook-b", intervals: ["day"] }), args);
  await page.waitForFunction(() => document.querySelectorAll(".chart").length === 1
    && document.querySelector('.chart[data-interval="day"]')?.dataset.count === "12");
  assert.equal(streams.started.length, 2);
  assert.match(streams.started[1], /hook-b/);
  await until(() => streams.open.size === 1, "the first stream's request to end");
  // The gateway ended the first stream as its client left, though the job wrote nothing since.
  await until(async () => (await openOnServer()) === 1, "the gateway to close the first stream", 5000);

  // Mid-stream (following a running job): unmount.
  await control("/jobs/hook-b/append?interval=day&count=3");
  await page.waitForFunction(() => document.querySelector('.chart[data-interval="day"]')?.dataset.count === "15");
  await page.evaluate(() => window.app.unmount());
  await until(() => streams.open.size === 0, "no stream request left open in the page");
  await until(async () => (await openOnServer()) === 0, "no stream left open at the gateway", 5000);
  assert.equal(await page.$$eval(".chart", (charts) => charts.length), 0);
  assert.equal(streams.started.length, 2, "nothing reopened after the unmount");
  assert.equal(await page.evaluate(() => window.probe.stale), 0, "no render showed the first stream's intervals");
  assert.deepEqual(problems, []);
  await page.close();
});
