// Shared by the Chromium tests (tests/js/*.test.mjs, run by tests/test_browser.py): the harness's
// control endpoint, the browser, and pages bundled with esbuild from frontend/package-lock.json.
import assert from "node:assert/strict";
import { createRequire } from "node:module";
import path from "node:path";
import { fileURLToPath } from "node:url";

export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../..");
const require = createRequire(path.join(ROOT, "frontend/package.json"));
export const { chromium } = require("playwright-core");

export const GATEWAY = process.env.GATEWAY_URL;
export const CONTROL = process.env.CONTROL_URL;
export const CHROMIUM = process.env.CHROMIUM_PATH ?? "/usr/bin/chromium";
export const SCREENSHOTS = process.env.SCREENSHOT_DIR ?? path.join(ROOT, "artifacts/screenshots");
export const skip = GATEWAY && CONTROL ? false : "needs GATEWAY_URL and CONTROL_URL (run by tests/test_browser.py)";
export const START = Date.parse("2025-04-01T00:00:00Z");

export async function control(route, method = "POST") {
  const response = await fetch(CONTROL + route, { method });
  const text = await response.text();
  assert.equal(response.status, 200, `${route}: ${text}`);
  return text.startsWith("{") || text.startsWith("[") ? JSON.parse(text) : text;
}

export function launch() {
  return chromium.launch({
    executablePath: CHROMIUM,
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  });
}

export const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

export async function until(condition, what, timeoutMs = 15_000) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await condition();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(50);
  }
}

/** An ES module bundle of `entry` (a page of tests/js/pages), with React in its development build. */
export async function bundle(entry) {
  const esbuild = require("esbuild");
  const result = await esbuild.build({
    entryPoints: [path.join(ROOT, "tests/js/pages", entry)],
    bundle: true,
    format: "esm",
    write: false,
    jsx: "automatic",
    // The package's two entries, as its exports map names them, from the working tree.
    alias: {
      "@candle-gateway/client/react": path.join(ROOT, "clients/js/src/react.js"),
      "@candle-gateway/client": path.join(ROOT, "clients/js/src/index.js"),
    },
    nodePaths: [path.join(ROOT, "frontend/node_modules")],
    define: { "process.env.NODE_ENV": '"development"' },
    logLevel: "error",
  });
  return result.outputFiles[0].text;
}

/** The stream requests a page has open: started and neither finished nor failed. */
export function trackStreams(page) {
  const open = new Set();
  const started = [];
  page.on("request", (request) => {
    if (request.url().includes("/api/sse/")) { open.add(request); started.push(request.url()); }
  });
  page.on("requestfinished", (request) => open.delete(request));
  page.on("requestfailed", (request) => open.delete(request));
  return { open, started };
}

/** An element's box in the page (what a full-page screenshot's pixel coordinates are). */
export function boxOf(page, selector) {
  return page.$eval(selector, (el) => {
    const r = el.getBoundingClientRect();
    return { x: Math.round(r.x + scrollX), y: Math.round(r.y + scrollY), width: Math.round(r.width), height: Math.round(r.height) };
  });
}

/**
 * Read a screenshot's pixels: the PNG is decoded in the page (no image library here). Returns the
 * colour at `point`, or for `rect` the columns (from rect.x) holding at least `minPixels` pixels of
 * one of `colors` (candles; a 1-pixel dotted price line does not count).
 */
export async function screenshotPixels(page, png, { point, rect, colors = [], minPixels = 3, tolerance = 60 }) {
  return page.evaluate(async ({ b64, point, rect, colors, minPixels, tolerance }) => {
    const blob = await (await fetch(`data:image/png;base64,${b64}`)).blob();
    const bitmap = await createImageBitmap(blob);
    const canvas = new OffscreenCanvas(bitmap.width, bitmap.height);
    const context = canvas.getContext("2d");
    context.drawImage(bitmap, 0, 0);
    if (point) return Array.from(context.getImageData(point.x, point.y, 1, 1).data.slice(0, 3));
    const { data } = context.getImageData(rect.x, rect.y, rect.width, rect.height);
    const columns = [];
    for (let x = 0; x < rect.width; x += 1) {
      let hits = 0;
      for (let y = 0; y < rect.height; y += 1) {
        const i = (y * rect.width + x) * 4;
        if (colors.some(([r, g, b]) => Math.abs(data[i] - r) + Math.abs(data[i + 1] - g) + Math.abs(data[i + 2] - b) < tolerance)) hits += 1;
      }
      if (hits >= minPixels) columns.push(x);
    }
    return columns;
  }, { b64: png.toString("base64"), point, rect, colors, minPixels, tolerance });
}

/** Runs of adjacent columns: one per candle when candles stand apart. */
export function clusters(columns) {
  let count = 0;
  columns.forEach((x, i) => { if (i === 0 || x > columns[i - 1] + 1) count += 1; });
  return count;
}

export const CANDLE_COLORS = [[22, 163, 74], [220, 38, 38]]; // the console's up and down colours
