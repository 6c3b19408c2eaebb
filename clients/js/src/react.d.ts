// Types of `@candle-gateway/client/react`. They name no React type, so a project type-checks them
// without @types/react; React itself (>= 18) is a peer dependency of this entry.

import type { Candle, CandleEvent, CandleStreamOptions, IntervalStatus, JobStatus, StreamState, StreamStatus } from "./index.js";

export interface UseCandleStreamOptions extends Omit<CandleStreamOptions, "onStatus" | "keepPoints"> {
  /** false: no stream (e.g. while the id is not known yet); the view's status is "idle". Default true. */
  enabled?: boolean;
}

/** One interval as a component draws it. */
export interface IntervalView {
  interval: string;
  status: IntervalStatus;
  /**
   * Every candle received, ascending in time. A new array whenever candles were added (at most once
   * per frame), the same array otherwise: use it as an effect's dependency. Do not mutate it.
   */
  candles: readonly Candle[];
  pointsSent: number;
  /** Fixed by interval_start; in follow mode it grows with the live candles. */
  totalPoints: number | null;
  /** The snapshot's fraction received, 0..1; 1 once complete or live; 0 while waiting. */
  progress: number;
  isPartial: boolean | null;
  jobStatus: JobStatus | null;
  currentBar: number | null;
  /** interval_not_found or data_error for this interval. */
  error: { error: string; message: string; points_sent: number | null } | null;
}

export interface CandleStreamView {
  /** The connection: idle (disabled or no id) or the client's status. */
  status: StreamStatus | "idle";
  intervals: Record<string, IntervalView>;
  jobId: string | null;
  backtestId: string | null;
  symbol: string | null;
  exchange: string | null;
  jobStatus: JobStatus | null;
  currentBar: number | null;
  isPartial: boolean | null;
  reconnects: number;
  tokenRefreshes: number;
  /** While status is "retrying": why, and the wait before the next attempt. */
  retry: { reason: string; delayMs: number; status: number | null } | null;
  /** The last transient problem (it was retried). */
  lastError: StreamState["lastError"];
  /** The fatal one: status is "failed". */
  error: StreamState["error"];
  lastEventId: string | null;
  /** Cut the connection as a network failure would (the stream resumes): to test a UI. */
  dropConnection(): void;
  /** Stop the stream for good (it reopens only when an argument changes). */
  close(): void;
}

/**
 * Stream a job's or a backtest's candles into a component: one stream per set of arguments (url, id,
 * intervals, limit, chunkSize, follow, order, lastEventId), opened after mount (once under StrictMode),
 * closed on unmount, reopened when one of them changes. getToken, token, fetch and onEvent are read when
 * called: a new function each render does not reopen the stream. Re-renders at most once per frame.
 */
export function useCandleStream(options: UseCandleStreamOptions): CandleStreamView;

export type { CandleEvent };
