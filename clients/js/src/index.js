// The candle stream gateway's client, for browsers and Node >= 20: no dependencies.
//
// A browser EventSource cannot send headers and gives up for good on any
// answer but 200, so this client reads the stream with fetch() and its own
// SSE parser instead. It sends the token as `Authorization: Bearer`, resumes
// by `Last-Event-ID` after any drop, refreshes the token once on a 401, waits
// out 429/503 (Retry-After) and network errors with a bounded, jittered
// back-off, and keeps per-interval state an app can render from.
// The protocol it speaks is docs/PROTOCOL.md of the gateway's repository.

import { SSEParser } from "./sse.js";

export { SSEParser };

/** Job statuses for which more points may still arrive (is_partial). */
export const ACTIVE_STATUSES = Object.freeze(["queued", "running", "paused"]);
/** Events after which the server ends the stream and the client stops. */
export const FATAL_ERRORS = Object.freeze(["job_not_found", "job_error"]);
export const STREAM_PATH = "/api/sse/backtest/{id}/data/multi";

const DEFAULTS = Object.freeze({
  url: "",
  limit: undefined,
  chunkSize: undefined,
  follow: false,
  order: "sequential",
  keepPoints: true,
  giveUpAfterMs: 120_000,
  maxBackoffMs: 30_000,
  initialRetryMs: 1000,
});

/** Every way a stream ends other than all_complete or 204 (and close()). */
export class CandleStreamError extends Error {
  /**
   * @param {string} code `invalid_request`, `unauthenticated`, `unavailable` (gave up), `job_not_found`,
   *   `job_error`, `token_error` (getToken failed) or `http_<status>`
   * @param {string} message
   * @param {{ status?: number | null, event?: object | null, cause?: unknown }} [details]
   */
  constructor(code, message, details = {}) {
    super(message, details.cause === undefined ? undefined : { cause: details.cause });
    this.name = "CandleStreamError";
    this.code = code;
    this.status = details.status ?? null;
    this.event = details.event ?? null;
  }
}

/** The stream's URL (without token): `base` + path + query. */
export function streamUrl({ url = "", id, intervals, limit, chunkSize, follow, order }) {
  if (!id) throw new TypeError("id is required");
  const names = Array.isArray(intervals) ? intervals.join(",") : String(intervals ?? "");
  if (!names) throw new TypeError("intervals is required");
  const query = new URLSearchParams({ intervals: names });
  if (limit !== undefined) query.set("limit", String(limit));
  if (chunkSize !== undefined) query.set("chunk_size", String(chunkSize));
  if (follow) query.set("follow", "true");
  if (order && order !== "sequential") query.set("order", order);
  const path = STREAM_PATH.replace("{id}", encodeURIComponent(id));
  return `${url.replace(/\/+$/, "")}${path}?${query}`;
}

/** Open a stream; returns its handle at once (events arrive through `onEvent`, the end through `done`). */
export function openCandleStream(options) {
  const stream = new CandleStream(options);
  stream._start();
  return stream;
}

/**
 * The same stream as an async iterator of `{ event, data, id, state }`; it ends after all_complete
 * (or a 204) and throws a CandleStreamError for a fatal end. Breaking out of the loop closes it.
 */
export async function* candleStream(options) {
  const queue = [];
  let wake = null;
  let finished = false;
  let failure = null;
  const stream = openCandleStream({
    ...options,
    onEvent(event, state) {
      options.onEvent?.(event, state);
      queue.push(event);
      wake?.();
    },
  });
  stream.done.then(
    () => { finished = true; wake?.(); },
    (error) => { failure = error; wake?.(); },
  );
  try {
    for (;;) {
      while (queue.length) yield queue.shift();
      if (failure) throw failure;
      if (finished) return;
      await new Promise((resolve) => { wake = resolve; });
      wake = null;
    }
  } finally {
    stream.close();
  }
}

function newIntervalState(name, index) {
  return {
    interval: name,
    index,
    // pending | streaming | waiting (a followed interval whose snapshot was empty: no candle yet, more to
    // come) | complete | live (a followed interval receiving live points) | failed
    status: "pending",
    totalPoints: null,
    totalChunks: null,
    pointsSent: 0,
    chunksReceived: 0,
    points: [],
    progress: null, // this interval's entry of the last progress.overall_progress
    isPartial: null,
    jobStatus: null,
    currentBar: null,
    error: null, // { error, message, points_sent } of an interval_not_found / data_error
  };
}

class CandleStream {
  constructor(options) {
    if (!options || typeof options !== "object") throw new TypeError("options are required");
    // An option given as undefined (e.g. passed through from a caller's own optional argument) keeps its default.
    const given = Object.fromEntries(Object.entries(options).filter(([, value]) => value !== undefined));
    this.options = { ...DEFAULTS, ...given };
    this.url = streamUrl(this.options);
    const names = Array.isArray(options.intervals) ? options.intervals : String(options.intervals).split(",");
    const intervals = {};
    [...new Set(names)].forEach((name, index) => { intervals[name] = newIntervalState(name, index); });
    /** Everything an app renders from; updated before each onEvent call. */
    this.state = {
      status: "connecting", // connecting | open | retrying | complete | failed | closed
      intervals,
      jobId: null,
      backtestId: null,
      symbol: null,
      exchange: null,
      jobStatus: null,
      currentBar: null,
      isPartial: null,
      progress: null,
      completedIntervals: [],
      totalPoints: null, // all_complete's per-interval counts
      lastEventId: options.lastEventId ?? null,
      reconnects: 0,
      tokenRefreshes: 0,
      lastError: null, // the last transient problem (answer, network error, connection_error)
      error: null, // the fatal one
    };
    this.retryMs = this.options.initialRetryMs;
    this._fetch = this.options.fetch ?? globalThis.fetch.bind(globalThis);
    this._controller = null;
    this._dropped = false;
    this._closed = false;
    this._finished = false;
    this._sleepAbort = null;
    this.done = new Promise((resolve, reject) => { this._resolve = resolve; this._reject = reject; });
    this.done.catch(() => {}); // a caller that only uses callbacks must not see an unhandled rejection
  }

  /** Stop for good (no reconnect); `done` resolves with the state. */
  close() {
    if (this._closed) return;
    this._closed = true;
    this._controller?.abort();
    this._sleepAbort?.();
    if (!this._finished) {
      this._finished = true;
      this._setStatus("closed");
      this._resolve(this.state);
    }
  }

  /** Cut the current connection, as a network failure would; the stream resumes from the last event. */
  dropConnection() {
    if (this._closed || !this._controller || this.state.status !== "open") return;
    this._dropped = true;
    this._controller.abort();
  }

  _start() {
    this._run().catch((error) => this._fail(
      error instanceof CandleStreamError ? error : new CandleStreamError("internal", String(error), { cause: error }),
    ));
  }

  async _run() {
    let token = null;
    let refreshed = false; // a fresh token was fetched after a 401, and no 200 came since
    let attempt = 0;
    let troubleSince = null;
    const options = this.options;

    const pause = async (reason, delayMs, details) => {
      troubleSince ??= Date.now();
      const elapsed = Date.now() - troubleSince;
      this.state.lastError = { reason, ...details };
      if (elapsed + delayMs > options.giveUpAfterMs) {
        const what = details.message ? `${reason}: ${details.message}` : reason;
        throw new CandleStreamError(
          "unavailable",
          `gave up after ${Math.round(elapsed / 1000)} s of failed attempts (last: ${what})`,
          { status: details.status ?? null },
        );
      }
      this._setStatus("retrying", { reason, delayMs, ...details });
      await this._sleep(delayMs);
    };
    const backoff = () => {
      // Exponential from the server's retry: (or initialRetryMs), capped, with full jitter in [d/2, d].
      const ceiling = Math.min(options.maxBackoffMs, this.retryMs * 2 ** Math.min(attempt, 16));
      attempt += 1;
      return ceiling / 2 + Math.random() * (ceiling / 2);
    };

    while (!this._closed) {
      if (token === null && options.getToken) token = await this._getToken(false);
      else if (token === null && options.token) token = options.token;
      const headers = { Accept: "text/event-stream" };
      if (token) headers.Authorization = `Bearer ${token}`;
      if (this.state.lastEventId) headers["Last-Event-ID"] = this.state.lastEventId;
      const controller = new AbortController();
      this._controller = controller;
      this._setStatus(this.state.status === "connecting" ? "connecting" : "retrying", { reason: "connecting" });
      let response;
      try {
        response = await this._fetch(this.url, { headers, signal: controller.signal, cache: "no-store" });
      } catch (error) {
        if (this._closed) return;
        if (this._dropped) { this._dropped = false; this.state.reconnects += 1; continue; }
        await pause("network", backoff(), { message: String(error?.message ?? error) });
        this.state.reconnects += 1;
        continue;
      }

      const status = response.status;
      if (status === 200) {
        refreshed = false;
        const before = this.state.lastEventId;
        const outcome = await this._read(response, controller);
        if (outcome === "finished" || this._closed) return;
        if (this.state.lastEventId !== before) { attempt = 0; troubleSince = null; }
        this.state.reconnects += 1;
        if (outcome === "dropped") continue; // asked for: reconnect at once
        await pause(outcome, backoff(), outcome === "connection_error" ? { message: this.state.lastError?.message } : {});
        continue;
      }
      const body = await readJson(response);
      if (status === 204) {
        // A resume past all_complete: the stream is done.
        this._finish();
        return;
      }
      if (status === 401) {
        if (refreshed || !options.getToken) {
          throw new CandleStreamError("unauthenticated", body?.message ?? "401", { status });
        }
        refreshed = true;
        token = await this._getToken(true);
        this.state.tokenRefreshes += 1;
        continue;
      }
      if (status === 429 || status === 503 || status === 502 || status === 504) {
        // Retry-After when given (a little jitter so that many clients do not return at once).
        const seconds = retryAfterSeconds(response.headers.get("Retry-After"));
        const delay = seconds === null ? backoff() : seconds * 1000 * (1 + Math.random() * 0.2);
        await pause(body?.error ?? `http_${status}`, delay, { status, message: body?.message });
        this.state.reconnects += 1;
        continue;
      }
      throw new CandleStreamError(body?.error ?? `http_${status}`, body?.message ?? `HTTP ${status}`, { status });
    }
  }

  async _getToken(forceRefresh) {
    try {
      const token = await this.options.getToken(forceRefresh);
      if (typeof token !== "string" || !token) throw new TypeError("getToken() must return a non-empty string");
      return token;
    } catch (error) {
      throw new CandleStreamError("token_error", `getToken failed: ${error?.message ?? error}`, { cause: error });
    }
  }

  /** Read one connection; returns finished | ended | dropped | network | connection_error. */
  async _read(response, controller) {
    this._setStatus("open");
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let connectionError = false;
    const parser = new SSEParser((event) => {
      if (event.retry !== null) this.retryMs = event.retry;
      if (!event.event) return; // a lone retry:
      if (event.id !== null) this.state.lastEventId = event.id;
      if (event.event === "error") {
        const payload = safeJson(event.data);
        if (payload?.error === "connection_error") connectionError = true;
      }
      this._onEvent(event);
    });
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        parser.feed(decoder.decode(value, { stream: true }));
        if (this._finished) {
          controller.abort();
          return "finished";
        }
      }
      parser.feed(decoder.decode());
      if (this._finished) return "finished";
      return connectionError ? "connection_error" : "ended";
    } catch (error) {
      if (this._finished || this._closed) return "finished";
      if (this._dropped) { this._dropped = false; return "dropped"; }
      this.state.lastError = { reason: "network", message: String(error?.message ?? error) };
      return "network";
    } finally {
      reader.releaseLock?.();
    }
  }

  _onEvent(raw) {
    const data = safeJson(raw.data);
    const name = raw.event;
    const state = this.state;
    if (data && typeof data === "object") this._apply(name, data);
    const event = { event: name, data, id: raw.id };
    try {
      this.options.onEvent?.(event, state);
    } catch (error) {
      // An app's handler must not break the stream; report it where the app looks.
      (this.options.onHandlerError ?? console.error)(error);
    }
    if (name === "all_complete") this._finish();
    else if (name === "error" && FATAL_ERRORS.includes(data?.error)) {
      this._fail(new CandleStreamError(data.error, data.message, { event: data }));
    }
  }

  _apply(name, data) {
    const state = this.state;
    const interval = data.interval != null ? this._interval(data.interval) : null;
    if ("job_id" in data) state.jobId = data.job_id;
    if ("backtest_id" in data) state.backtestId = data.backtest_id;
    if ("job_status" in data) state.jobStatus = data.job_status;
    if ("current_bar" in data) state.currentBar = data.current_bar;
    if ("is_partial" in data) state.isPartial = data.is_partial;
    const common = (target) => {
      if ("job_status" in data) target.jobStatus = data.job_status;
      if ("current_bar" in data) target.currentBar = data.current_bar;
      if ("is_partial" in data) target.isPartial = data.is_partial;
    };
    switch (name) {
      case "interval_start":
        state.symbol = data.symbol;
        state.exchange = data.exchange;
        Object.assign(interval, {
          status: "streaming", index: data.interval_index, totalPoints: data.total_points,
          totalChunks: data.total_chunks,
        });
        common(interval);
        if (data.total_points === 0) interval.progress = { total_points: 0, total_chunks: 0, chunks_sent: 0, points_sent: 0 };
        break;
      case "data_chunk":
        if (this.options.keepPoints) for (const point of data.data_points) interval.points.push(point);
        interval.pointsSent = data.points_sent;
        interval.chunksReceived = data.chunk_index + 1;
        interval.totalPoints = data.total_points;
        if (interval.status === "complete" || interval.status === "waiting") interval.status = "live";
        common(interval);
        state.progress = data.progress;
        for (const [other, counts] of Object.entries(data.progress?.overall_progress ?? {})) {
          this._interval(other).progress = counts;
        }
        break;
      case "interval_complete":
        // A followed, still active job's empty interval is not done: its first candle is yet to come.
        interval.status = this.options.follow && data.is_partial && data.points_sent === 0 ? "waiting" : "complete";
        interval.totalPoints = data.total_points;
        interval.pointsSent = data.points_sent;
        common(interval);
        if (!state.completedIntervals.includes(data.interval)) state.completedIntervals.push(data.interval);
        break;
      case "job_status":
        for (const each of Object.values(state.intervals)) common(each);
        break;
      case "all_complete": {
        // The job's last word: every interval shows it, so nothing stays "running" after the end.
        const isPartial = ACTIVE_STATUSES.includes(data.job_status);
        state.isPartial = isPartial;
        state.completedIntervals = [...data.completed_intervals];
        state.totalPoints = data.total_points;
        for (const each of Object.values(state.intervals)) {
          if (each.status === "live" || each.status === "streaming" || each.status === "waiting") each.status = "complete";
          each.jobStatus = data.job_status;
          each.isPartial = isPartial;
          if (state.currentBar !== null) each.currentBar = state.currentBar;
        }
        break;
      }
      case "error":
        if (interval && !FATAL_ERRORS.includes(data.error) && data.error !== "connection_error") {
          interval.status = "failed";
          interval.error = { error: data.error, message: data.message, points_sent: data.points_sent ?? null };
        }
        if (data.error === "connection_error") {
          state.lastError = { reason: "connection_error", message: data.message };
        }
        break;
      default:
        break; // new event names may come; they reach onEvent untouched
    }
  }

  _interval(name) {
    const intervals = this.state.intervals;
    intervals[name] ??= newIntervalState(name, Object.keys(intervals).length);
    return intervals[name];
  }

  _finish() {
    if (this._finished) return;
    this._finished = true;
    this._setStatus("complete");
    this._resolve(this.state);
  }

  _fail(error) {
    if (this._finished) return;
    this._finished = true;
    this.state.error = { code: error.code, message: error.message, status: error.status };
    this._setStatus("failed", { code: error.code, message: error.message });
    this._controller?.abort();
    this._reject(error);
  }

  _setStatus(status, details = {}) {
    this.state.status = status;
    try {
      this.options.onStatus?.(status, details, this.state);
    } catch (error) {
      (this.options.onHandlerError ?? console.error)(error);
    }
  }

  _sleep(ms) {
    return new Promise((resolve) => {
      const timer = setTimeout(() => { this._sleepAbort = null; resolve(); }, ms);
      this._sleepAbort = () => { clearTimeout(timer); resolve(); };
    });
  }
}

function retryAfterSeconds(header) {
  if (header == null) return null;
  if (/^\s*[0-9]+\s*$/.test(header)) return Number(header);
  const date = Date.parse(header); // the HTTP-date form
  return Number.isNaN(date) ? null : Math.max(0, (date - Date.now()) / 1000);
}

async function readJson(response) {
  try {
    const text = await response.text();
    return text ? JSON.parse(text) : null;
  } catch {
    return null;
  }
}

function safeJson(text) {
  try {
    return JSON.parse(text);
  } catch {
    return null;
  }
}
