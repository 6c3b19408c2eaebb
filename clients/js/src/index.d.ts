// Types of the candle stream client. The payload types (events.d.ts) are generated from the
// gateway's own event structs; this file types the client around them.

import type { Candle, EventPayloads, IntervalProgress, JobStatus, Progress } from "./events.js";

export type * from "./events.js";

export type EventName = keyof EventPayloads;

/** One event as the client delivers it: the name, the parsed payload and the event id. */
export type CandleEvent = {
  [Name in EventName]: { event: Name; data: EventPayloads[Name]; id: string | null };
}[EventName];

export interface CandleStreamOptions {
  /** The gateway's origin, e.g. "https://candles.example.com"; "" (the default) for the page's own. */
  url?: string;
  /** A job id, or a completed backtest id (bt_...). */
  id: string;
  /** Interval names, streamed in this order (or one comma-separated string). */
  intervals: string[] | string;
  /** Points per interval, 1..50000 (server default 1000). */
  limit?: number;
  /** Points per data_chunk, 1..5000 (server default 500). */
  chunkSize?: number;
  /** Keep a running job's stream open and receive new points live. */
  follow?: boolean;
  order?: "sequential" | "interleaved";
  /**
   * The Firebase ID token. Called once at the start with false, and with true after a 401 (the token
   * expired): return a fresh one, e.g. `(force) => auth.currentUser.getIdToken(force)`.
   */
  getToken?: (forceRefresh: boolean) => string | Promise<string>;
  /** A fixed token, when there is no getToken (a 401 is then fatal). */
  token?: string;
  /** Start after this event id (resume a stream an earlier page saw). */
  lastEventId?: string;
  /** Called for every event, after `state` took it in. */
  onEvent?: (event: CandleEvent, state: StreamState) => void;
  /** Called when the connection's status changes (connecting, open, retrying with a reason, ...). */
  onStatus?: (status: StreamStatus, details: StatusDetails, state: StreamState) => void;
  /** Where exceptions thrown by onEvent/onStatus go (default console.error); they never stop the stream. */
  onHandlerError?: (error: unknown) => void;
  /** Keep every interval's points in state.intervals[name].points (default true). */
  keepPoints?: boolean;
  /** Give up (CandleStreamError "unavailable") after this long without a working connection (default 120000). */
  giveUpAfterMs?: number;
  /** Longest wait between attempts when the server gives no Retry-After (default 30000). */
  maxBackoffMs?: number;
  /** First back-off step until the server's retry: arrives (default 1000). */
  initialRetryMs?: number;
  /** A fetch implementation (default globalThis.fetch). */
  fetch?: typeof fetch;
}

export type StreamStatus = "connecting" | "open" | "retrying" | "complete" | "failed" | "closed";

export interface StatusDetails {
  reason?: string;
  delayMs?: number;
  status?: number;
  message?: string;
  code?: string;
}

export type IntervalStatus = "pending" | "streaming" | "waiting" | "complete" | "live" | "failed";

export interface IntervalState {
  interval: string;
  index: number;
  /**
   * pending: nothing yet; streaming: the snapshot is arriving; waiting: a followed interval of an active job
   * whose snapshot was empty, waiting for its first live candle; complete: the snapshot (or the stream) is
   * done; live: a followed interval receiving live candles; failed: interval_not_found or data_error.
   */
  status: IntervalStatus;
  /** Fixed by interval_start; in follow mode it grows with the live points. */
  totalPoints: number | null;
  totalChunks: number | null;
  pointsSent: number;
  chunksReceived: number;
  /** Every point received, ascending in time (empty with keepPoints: false). */
  points: Candle[];
  /** This interval's counts in the last progress.overall_progress. */
  progress: IntervalProgress | null;
  isPartial: boolean | null;
  jobStatus: JobStatus | null;
  currentBar: number | null;
  /** interval_not_found or data_error for this interval. */
  error: { error: string; message: string; points_sent: number | null } | null;
}

export interface StreamState {
  status: StreamStatus;
  intervals: Record<string, IntervalState>;
  jobId: string | null;
  backtestId: string | null;
  symbol: string | null;
  exchange: string | null;
  jobStatus: JobStatus | null;
  currentBar: number | null;
  isPartial: boolean | null;
  progress: Progress | null;
  completedIntervals: string[];
  totalPoints: Record<string, number> | null;
  lastEventId: string | null;
  reconnects: number;
  tokenRefreshes: number;
  lastError: { reason: string; status?: number; message?: string } | null;
  error: { code: string; message: string; status: number | null } | null;
}

export interface CandleStream {
  readonly state: StreamState;
  readonly url: string;
  /** Resolves with the state after all_complete (or a 204, or close()); rejects with a CandleStreamError. */
  readonly done: Promise<StreamState>;
  /** Stop for good. */
  close(): void;
  /** Cut the connection as a network failure would: the stream resumes exactly after the last event. */
  dropConnection(): void;
}

export class CandleStreamError extends Error {
  /** invalid_request | unauthenticated | unavailable | job_not_found | job_error | token_error | http_<status> */
  readonly code: string;
  readonly status: number | null;
  readonly event: EventPayloads["error"] | null;
}

export const ACTIVE_STATUSES: readonly JobStatus[];
export const FATAL_ERRORS: readonly string[];
export const STREAM_PATH: string;

export function openCandleStream(options: CandleStreamOptions): CandleStream;
export function candleStream(options: CandleStreamOptions): AsyncGenerator<CandleEvent, void, undefined>;
export function streamUrl(options: Omit<CandleStreamOptions, "getToken" | "onEvent">): string;

export interface SSEEvent {
  event: string;
  data: string;
  id: string | null;
  retry: number | null;
}

export class SSEParser {
  constructor(onEvent: (event: SSEEvent) => void);
  lastEventId: string | null;
  feed(text: string): void;
}
