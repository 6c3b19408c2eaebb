// Compiled (never run) by tests/test_js_client.py with `tsc --noEmit --strict`: the README's usage
// type-checks against index.d.ts and the generated events.d.ts.
import { candleStream, CandleStreamError, openCandleStream, type DataChunk, type StreamState } from "../src/index.js";

const stream = openCandleStream({
  url: "https://candles.example.com",
  id: "fWroZTP6KfwS3ZjTEFa3",
  intervals: ["day", "minute"],
  limit: 5000,
  follow: true,
  getToken: async (forceRefresh: boolean) => (forceRefresh ? "fresh" : "cached"),
  onEvent(event, state: StreamState) {
    if (event.event === "data_chunk") {
      const chunk: DataChunk = event.data;
      const closes: number[] = chunk.data_points.map((point) => point.close);
      const total: number = state.intervals[chunk.interval].points.length + closes.length;
      void total;
    } else if (event.event === "error" && event.data.interval !== null) {
      const code: "job_not_found" | "job_error" | "interval_not_found" | "data_error" | "connection_error" = event.data.error;
      void code;
    }
  },
});
stream.dropConnection();
stream.done.then((state) => state.intervals["day"].jobStatus, (error: unknown) => {
  if (error instanceof CandleStreamError) return error.code;
  return null;
});

async function iterate(): Promise<number> {
  let points = 0;
  for await (const event of candleStream({ id: "bt_1737530000.123", intervals: "day", token: "t" })) {
    if (event.event === "data_chunk") points += event.data.data_points.length;
  }
  return points;
}
void iterate;
