// In headless Chromium, against the real gateway of tests/js_harness.py (run by tests/test_browser.py):
// the client over the page's real fetch(), what a bare EventSource does with each answer, and the console.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { mkdirSync } from "node:fs";
import { createRequire } from "node:module";
import path from "node:path";
import { CANDLE_COLORS, boxOf, clusters, screenshotPixels } from "./lib.mjs";

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

/** What a chart shows, checked in a screenshot: the columns of its pane that hold candles. */
async function candlesShown(page, png, interval) {
  const shown = await page.evaluate((name) => window.consoleState.intervals[name], interval);
  const box = await boxOf(page, `.card[data-interval="${interval}"] .chart`);
  const rect = { x: box.x, y: box.y, width: shown.paneWidth, height: shown.paneHeight };
  const columns = await screenshotPixels(page, png, { rect, colors: CANDLE_COLORS });
  return { columns, first: columns[0] / rect.width, last: columns.at(-1) / rect.width, clusters: clusters(columns) };
}

/** Every bar the chart holds is in its visible range. */
function assertAllVisible(shown, name) {
  assert.ok(shown.visibleFrom < 0.5 && shown.visibleTo > shown.chartPoints - 1.5,
    `${name}: bars 0..${shown.chartPoints - 1} held, ${shown.visibleFrom}..${shown.visibleTo} shown`);
}

test("the console: live candles, a waiting interval, a dropped connection, a token refresh, every bar shown", { skip }, async () => {
  mkdirSync(SCREENSHOTS, { recursive: true });
  // "hour" is configured but gets no candle while the job runs: it waits, and says so.
  await control("/jobs/console-job?intervals=minute,3minute,day,hour&count=0&status=running&uid=demo");
  await control("/jobs/console-job/append?interval=minute&count=600");
  await control("/jobs/console-job/append?interval=3minute&count=200");
  await control("/jobs/console-job/append?interval=day&count=20");
  await control("/jobs/console-job/run?intervals=minute,3minute,day&per_tick=30,10,1&ticks=28&tick_ms=250");
  const { page, problems } = await newPage();
  const opened = Date.now();
  await page.goto(`${GATEWAY}/?id=console-job&intervals=minute,3minute,day,hour&follow=true&limit=5000&chunk_size=200&token_lifetime=5`);
  await page.waitForFunction(() => window.consoleState?.intervals?.day?.status === "live", null, { timeout: 15_000 });
  await page.waitForFunction(() => window.consoleState.intervals.hour?.status === "waiting");
  await page.waitForTimeout(200); // the frame is drawn
  const live = await page.screenshot({ path: path.join(SCREENSHOTS, "console-live.png"), fullPage: true });
  // The waiting interval: its pill says waiting (in the waiting colour, not the green of complete),
  // its bar is empty, its text says what it waits for.
  const hour = await page.$eval('.card[data-interval="hour"]', (card) => ({
    pill: card.querySelector(".status").textContent, bar: card.querySelector(".bar > div").style.width,
    text: card.querySelector(".points").textContent, className: card.className,
  }));
  assert.deepEqual(hour, { pill: "waiting", bar: "0%", text: "0 points · waiting for the first candle (job running)", className: "card waiting" });
  const pill = await boxOf(page, '.card[data-interval="hour"] .status');
  const pillColor = await screenshotPixels(page, live, { point: { x: pill.x + 3, y: pill.y + Math.floor(pill.height / 2) } });
  assert.deepEqual(pillColor, [0xdb, 0xea, 0xfe], "the waiting pill's background in the screenshot");

  await page.click("#drop");
  await page.waitForFunction(() => window.consoleState.stream.reconnects >= 1);
  await page.waitForTimeout(Math.max(0, opened + 5600 - Date.now())); // past the dev token's 5 s
  await page.click("#drop"); // this reconnect meets a 401 and refreshes the token
  await page.waitForFunction(() => window.consoleState.stream.status === "complete", null, { timeout: 20_000 });
  await page.waitForTimeout(300); // the last frame is drawn
  const complete = await page.screenshot({ path: path.join(SCREENSHOTS, "console-complete.png"), fullPage: true });

  const shown = await page.evaluate(() => window.consoleState);
  const stored = await control("/jobs/console-job/stored", "GET");
  for (const name of ["minute", "3minute", "day"]) {
    const interval = shown.intervals[name];
    assert.equal(interval.chartPoints, Math.min(stored[name], 5000), `${name}: chart vs store`);
    assert.equal(interval.points, interval.chartPoints, `${name}: chart vs client state`);
    assert.equal(interval.jobStatus, "completed", `${name} is not stale after all_complete`);
    assert.equal(interval.isPartial, false);
    assertAllVisible(interval, name);
    // In the screenshot, candles run from the pane's left edge to its right edge.
    const drawn = await candlesShown(page, complete, name);
    assert.ok(drawn.first < 0.05 && drawn.last > 0.9, `${name}: candles drawn from ${drawn.first} to ${drawn.last} of the width`);
  }
  assert.deepEqual(shown.intervals.hour, { ...shown.intervals.hour, status: "complete", points: 0, error: null });
  assert.ok(shown.stream.reconnects >= 2, JSON.stringify(shown.stream));
  assert.ok(shown.stream.tokenRefreshes >= 1, JSON.stringify(shown.stream));
  const progress = await page.$$eval(".bar > div", (bars) => bars.map((bar) => bar.style.width));
  assert.deepEqual(progress, ["100%", "100%", "100%", "100%"]);
  assert.deepEqual(problems, []);
  await page.close();
});

test("a chart shows every bar as live ones arrive, and leaves a user's zoom alone until 'fit'", { skip }, async () => {
  await control("/jobs/fit-job?intervals=day&count=1&status=running&uid=demo");
  const { page, problems } = await newPage();
  await page.goto(`${GATEWAY}/?id=fit-job&intervals=day&follow=true`);
  await page.waitForFunction(() => window.consoleState?.intervals?.day?.status === "complete");
  for (let n = 2; n <= 5; n += 1) {
    await control("/jobs/fit-job/append?interval=day&count=1");
    await page.waitForFunction((n) => window.consoleState.intervals.day.chartPoints === n, n);
  }
  await page.waitForTimeout(300);
  const five = await page.screenshot({ path: path.join(SCREENSHOTS, "console-five-live-days.png"), fullPage: true });
  let day = await page.evaluate(() => window.consoleState.intervals.day);
  assert.equal(day.status, "live");
  assertAllVisible(day, "day");
  assert.equal((await candlesShown(page, five, "day")).clusters, 5, "five candles drawn, not the last two");

  // The user zooms in: the chart is theirs; new bars do not pull it back to everything.
  const chart = await boxOf(page, '.card[data-interval="day"] .chart');
  await page.mouse.move(chart.x + chart.width / 2, chart.y + chart.height / 2);
  await page.mouse.wheel(0, -600);
  await page.waitForFunction(() => window.consoleState.intervals.day.autoFit === false);
  await page.waitForTimeout(200);
  const zoomed = await page.evaluate(() => window.consoleState.intervals.day);
  for (let n = 6; n <= 8; n += 1) await control("/jobs/fit-job/append?interval=day&count=1");
  await page.waitForFunction(() => window.consoleState.intervals.day.chartPoints === 8);
  await page.waitForTimeout(300);
  day = await page.evaluate(() => window.consoleState.intervals.day);
  assert.ok(zoomed.visibleTo - zoomed.visibleFrom < 4, `zoomed in: ${zoomed.visibleFrom}..${zoomed.visibleTo}`);
  // The user's zoom is kept (not fitted to all 8 bars); a view that reached the right edge moves
  // along with the new bars (the chart library's shiftVisibleRangeOnNewBar), one that did not stays.
  const width = (range) => range.visibleTo - range.visibleFrom;
  const view = `${day.visibleFrom}..${day.visibleTo}, zoomed ${zoomed.visibleFrom}..${zoomed.visibleTo}`;
  assert.ok(Math.abs(width(day) - width(zoomed)) < 0.01, `the user's zoom kept: ${view}`);
  assert.ok(day.visibleFrom > 1, `not fitted to every bar: ${view}`);
  const shift = day.visibleFrom - zoomed.visibleFrom;
  assert.ok(Math.abs(shift) < 0.01 || Math.abs(shift - 3) < 0.01, `kept, or moved by the 3 new bars: ${view}`);

  await page.click('.card[data-interval="day"] .fit');
  await page.waitForFunction(() => window.consoleState.intervals.day.autoFit === true);
  await page.waitForTimeout(300);
  const fitted = await page.screenshot({ path: path.join(SCREENSHOTS, "console-fit-again.png"), fullPage: true });
  assertAllVisible(await page.evaluate(() => window.consoleState.intervals.day), "day");
  assert.equal((await candlesShown(page, fitted, "day")).clusters, 8);
  assert.deepEqual(problems, []);
  await page.close();
  await control("/jobs/fit-job/status?status=completed"); // the gateway ends the stream (and frees the slot)
});

test("the demo job under an open console: a restarted `make run` continues it, and the console resumes", { skip }, async () => {
  await control("/demo/start?tick_ms=50&backfill=400");
  const { page, problems } = await newPage();
  await page.goto(`${GATEWAY}/`); // the console as `make run` opens it: the demo job, followed
  await page.waitForFunction(() => window.consoleState?.intervals?.minute?.points > 450, null, { timeout: 20_000 });
  const before = await page.evaluate(() => window.consoleState.intervals.minute.points);
  // Ctrl-C and `make run` again: the writer and the gateway stop, and both come back.
  await control("/demo/stop");
  await control("/replica/stop");
  await page.waitForFunction(() => window.consoleState.stream.status === "retrying");
  await control("/replica/start");
  await control("/demo/start?tick_ms=50&backfill=400");
  await page.waitForFunction((before) => window.consoleState.intervals.minute.points > before + 40, before, { timeout: 20_000 });
  await control("/demo/stop");
  const stored = await control("/jobs/demo-job/stored", "GET");
  await page.waitForFunction((stored) => window.consoleState.intervals.minute.chartPoints === stored.minute
    && window.consoleState.intervals["3minute"].chartPoints === stored["3minute"], stored, { timeout: 10_000 });
  await page.waitForTimeout(300);
  const resumed = await page.screenshot({ path: path.join(SCREENSHOTS, "console-resumed.png"), fullPage: true });
  const shown = await page.evaluate(() => window.consoleState);
  assert.equal(shown.stream.status, "open");
  assert.ok(shown.stream.reconnects >= 1);
  for (const name of ["day", "minute", "3minute"]) {
    assert.equal(shown.intervals[name].error, null, `${name}: no data_error, the job was continued, not rewritten`);
    assert.equal(shown.intervals[name].chartPoints, stored[name], `${name}: chart vs store`);
    assert.equal(shown.intervals[name].jobStatus, "running");
  }
  const errors = await page.$$eval(".card .error", (els) => els.filter((el) => el.style.display !== "none").map((el) => el.textContent));
  assert.deepEqual(errors, []);
  const minute = await candlesShown(page, resumed, "minute");
  assert.ok(minute.first < 0.05 && minute.last > 0.9, JSON.stringify({ first: minute.first, last: minute.last }));
  assert.deepEqual(problems.filter((p) => !p.includes("ERR_CONNECTION_REFUSED")), []);
  await page.close(); // the gateway ends the stream as the page goes, and frees the demo user's slot
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
