// useCandleStream: the client (./index.js) as a React hook. React is a peer dependency of this entry only.
//
// One stream per set of arguments: it opens after mount, closes on unmount, and is replaced when an
// argument that shapes the stream changes (url, id, intervals, limit, chunkSize, follow, order,
// lastEventId). getToken, fetch and onEvent are read through refs: a new function each render
// neither reopens the stream nor goes stale. Events update the client's state at once, but the
// component re-renders at most once per animation frame, however fast chunks arrive.

import { useEffect, useRef, useState } from "react";
import { openCandleStream } from "./index.js";

/** What the hook returns before the stream has said anything, and when it is disabled. */
function initialView(intervals, status) {
  const views = {};
  for (const name of intervalNames(intervals)) views[name] = emptyInterval(name);
  return {
    status, intervals: views, jobId: null, backtestId: null, symbol: null, exchange: null, jobStatus: null,
    currentBar: null, isPartial: null, reconnects: 0, tokenRefreshes: 0, retry: null, lastError: null,
    error: null, lastEventId: null,
  };
}

function emptyInterval(name) {
  return {
    interval: name, status: "pending", candles: [], pointsSent: 0, totalPoints: null, progress: 0,
    isPartial: null, jobStatus: null, currentBar: null, error: null,
  };
}

function intervalNames(intervals) {
  const names = Array.isArray(intervals) ? intervals : String(intervals ?? "").split(",");
  return [...new Set(names.filter(Boolean))];
}

/** The fraction of an interval's snapshot received: 1 once it is complete or live. */
function fraction(interval) {
  if (interval.status === "complete" || interval.status === "live") return 1;
  const total = interval.progress?.total_points ?? interval.totalPoints ?? 0;
  const sent = interval.progress?.points_sent ?? interval.pointsSent;
  return total ? Math.min(1, sent / total) : 0;
}

/** A new view of the client's state; an interval's candles get a new array only when they grew. */
function viewOf(state, previous, retry) {
  const intervals = {};
  for (const [name, interval] of Object.entries(state.intervals)) {
    const before = previous.intervals[name];
    const candles = before && before.candles.length === interval.points.length ? before.candles : interval.points.slice();
    intervals[name] = {
      interval: name, status: interval.status, candles, pointsSent: interval.pointsSent,
      totalPoints: interval.totalPoints, progress: fraction(interval), isPartial: interval.isPartial,
      jobStatus: interval.jobStatus, currentBar: interval.currentBar, error: interval.error,
    };
  }
  return {
    status: state.status, intervals, jobId: state.jobId, backtestId: state.backtestId, symbol: state.symbol,
    exchange: state.exchange, jobStatus: state.jobStatus, currentBar: state.currentBar, isPartial: state.isPartial,
    reconnects: state.reconnects, tokenRefreshes: state.tokenRefreshes, retry, lastError: state.lastError,
    error: state.error, lastEventId: state.lastEventId,
  };
}

const nextFrame = typeof requestAnimationFrame === "function"
  ? (callback) => { const id = requestAnimationFrame(callback); return () => cancelAnimationFrame(id); }
  : (callback) => { const id = setTimeout(callback, 16); return () => clearTimeout(id); };

/**
 * Stream a job's or backtest's candles into a component.
 * @param {import("./react.js").UseCandleStreamOptions} options
 * @returns {import("./react.js").CandleStreamView}
 */
export function useCandleStream(options) {
  const { url = "", id, intervals, limit, chunkSize, follow = false, order, lastEventId, enabled = true } = options;
  const names = intervalNames(intervals).join(",");
  // The latest callbacks, read when called: passing a new arrow function each render is fine.
  const callbacks = useRef(options);
  callbacks.current = options;
  const handle = useRef(null);
  // The view belongs to one set of arguments: the render that brings new ones (before the effect
  // below has run) shows the new stream's empty view, never the old stream's candles.
  const key = JSON.stringify([enabled, url, id, names, limit, chunkSize, follow, order, lastEventId]);
  const [state, setState] = useState(() => ({ key, view: initialView(names, enabled && id ? "connecting" : "idle") }));
  const view = state.key === key ? state.view : initialView(names, enabled && id ? "connecting" : "idle");

  useEffect(() => {
    const setView = (next) => setState({ key, view: next });
    if (!enabled || !id || !names) {
      setView(initialView(names, "idle"));
      return undefined;
    }
    let stream = null;
    let cancelFrame = null;
    let retry = null;
    let current = initialView(names, "connecting");
    setView(current);
    // Set by the cleanup: a closed stream's last callbacks (close() reports "closed") draw nothing,
    // so the next stream's view never shows this one's candles.
    let cancelled = false;
    const flush = () => {
      cancelFrame = null;
      if (cancelled) return;
      current = viewOf(stream.state, current, retry);
      setView(current);
    };
    const schedule = () => { if (!cancelled) cancelFrame ??= nextFrame(flush); };
    // Opened in a microtask, so that StrictMode's mount, unmount, mount (all in one commit) opens
    // one stream, not one closed at once and a second.
    queueMicrotask(() => {
      if (cancelled) return;
      stream = openCandleStream({
        url, id, intervals: names.split(","), limit, chunkSize, follow, order, lastEventId,
        // The caller's latest getToken; a fixed token when there is none (a 401 is then fatal).
        getToken: callbacks.current.getToken ? (forceRefresh) => callbacks.current.getToken(forceRefresh) : undefined,
        token: callbacks.current.token,
        fetch: (...args) => (callbacks.current.fetch ?? globalThis.fetch)(...args),
        onEvent(event, state) {
          callbacks.current.onEvent?.(event, state);
          schedule();
        },
        onStatus(status, details) {
          retry = status === "retrying" && details.delayMs !== undefined
            ? { reason: details.reason ?? "", delayMs: details.delayMs, status: details.status ?? null }
            : status === "retrying" ? retry : null;
          schedule();
        },
        onHandlerError: (error) => (callbacks.current.onHandlerError ?? console.error)(error),
        giveUpAfterMs: callbacks.current.giveUpAfterMs,
        maxBackoffMs: callbacks.current.maxBackoffMs,
        initialRetryMs: callbacks.current.initialRetryMs,
      });
      handle.current = stream;
      stream.done.then(schedule, schedule);
    });
    return () => {
      cancelled = true;
      cancelFrame?.();
      stream?.close();
      if (handle.current === stream) handle.current = null;
    };
  }, [key]); // key holds every argument that shapes the stream

  return {
    ...view,
    dropConnection: () => handle.current?.dropConnection(),
    close: () => handle.current?.close(),
  };
}
