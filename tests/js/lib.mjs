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
