// A frontend's code, compiled against the packed tarball's types and run against a real gateway by
// tests/test_js_package.py: the installed package streams a job and a follow stream exactly.
import {
  candleStream, CandleStreamError, openCandleStream,
  type Candle, type CandleEvent, type IntervalStatus, type StreamState,
} from "@candle-gateway/client";

declare const process: { env: Record<string, string | undefined>; exitCode: number };

const GATEWAY = process.env.GATEWAY_URL ?? "";
const CONTROL = process.env.CONTROL_URL ?? "";
const JOB = process.env.JOB_ID ?? "";

async function getToken(forceRefresh: boolean): Promise<string> {
  const response = await fetch(`${CONTROL}/token?uid=consumer&lifetime=3600`);
  if (!response.ok) throw new Error(`token: ${response.status} (refresh: ${forceRefresh})`);
  return response.text();
}

async function main(): Promise<void> {
  // The callback form: every interval's points, the statuses each went through.
  const statuses: Record<string, IntervalStatus[]> = {};
  const stream = openCandleStream({
    url: GATEWAY, id: JOB, intervals: ["day", "minute"], chunkSize: 50, limit: 5000, getToken,
    onEvent(event: CandleEvent, state: StreamState) {
      if (event.event === "data_chunk") {
        const interval: string = event.data.interval;
        (statuses[interval] ??= []).push(state.intervals[interval].status);
      }
    },
  });
  const state = await stream.done;
  const times = (points: Candle[]) => points.map((point) => Date.parse(point.time));

  // The iterator form, over the same job.
  let iterated = 0;
  for await (const event of candleStream({ url: GATEWAY, id: JOB, intervals: "day,minute", getToken })) {
    if (event.event === "data_chunk") iterated += event.data.data_points.length;
  }

  // A missing job: a typed, fatal error.
  const missing = await openCandleStream({ url: GATEWAY, id: "no-such-job", intervals: "day", getToken }).done
    .then(() => "resolved", (error: unknown) => (error instanceof CandleStreamError ? error.code : String(error)));

  console.log(JSON.stringify({
    status: state.status,
    points: { day: state.intervals.day.points.length, minute: state.intervals.minute.points.length },
    minuteTimes: times(state.intervals.minute.points),
    statuses,
    iterated,
    missing,
  }));
}

main().catch((error: unknown) => {
  console.error(error);
  process.exitCode = 1;
});
