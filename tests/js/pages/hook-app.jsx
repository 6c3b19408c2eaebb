// A React app of two candlestick charts fed by useCandleStream, bundled by esbuild for
// tests/js/hook.test.mjs (React and the chart library from frontend/package-lock.json). It runs in
// StrictMode (development build), so the hook meets React's double mount. window.app drives it;
// window.probe is what the test reads.
import { StrictMode, useEffect, useRef } from "react";
import { createRoot } from "react-dom/client";
import { CandlestickSeries, createChart } from "lightweight-charts";
import { useCandleStream } from "@candle-gateway/client/react";

const probe = (window.probe = { commits: 0, frames: 0, events: 0, tokenCalls: [], view: null, stale: 0 });
const countFrames = () => { probe.frames += 1; requestAnimationFrame(countFrames); };
requestAnimationFrame(countFrames);

const toBar = (p) => ({ time: Date.parse(p.time) / 1000, open: p.open, high: p.high, low: p.low, close: p.close });

function Chart({ view }) {
  const box = useRef(null);
  const series = useRef(null);
  const drawn = useRef(0);
  useEffect(() => {
    const chart = createChart(box.current, { autoSize: true, timeScale: { timeVisible: view.interval !== "day" } });
    series.current = chart.addSeries(CandlestickSeries, {});
    drawn.current = 0;
    return () => { chart.remove(); series.current = null; };
  }, []);
  useEffect(() => {
    // Only the new candles go to the chart.
    const fresh = view.candles.slice(drawn.current);
    if (drawn.current === 0) series.current.setData(fresh.map(toBar));
    else for (const candle of fresh) series.current.update(toBar(candle));
    drawn.current = view.candles.length;
    // What the chart holds, for the test (React does not manage this attribute).
    box.current.parentElement.dataset.chartPoints = String(series.current.data().length);
  }, [view.candles]);
  return (
    <section className="chart" data-interval={view.interval} data-status={view.status}
      data-count={view.candles.length} data-progress={view.progress}>
      <h2>{view.interval}: {view.status}, {view.candles.length} candles</h2>
      <div ref={box} style={{ height: 180 }} />
    </section>
  );
}

function App({ args }) {
  const view = useCandleStream({
    ...args,
    getToken: (force) => { probe.tokenCalls.push(force); return window.testToken(args.uid); },
    onEvent: () => { probe.events += 1; },
  });
  probe.view = view;
  // A view holding an interval these arguments did not ask for is an earlier stream's: never shown.
  if (Object.keys(view.intervals).some((name) => !args.intervals.includes(name))) probe.stale += 1;
  useEffect(() => { probe.commits += 1; });
  return (
    <main id="app" data-status={view.status} data-job-status={view.jobStatus ?? ""}>
      {Object.values(view.intervals).map((interval) => <Chart key={`${args.id}/${interval.interval}`} view={interval} />)}
    </main>
  );
}

let root = null;
const element = document.createElement("div");
document.body.appendChild(element);
window.app = {
  render(args) {
    root ??= createRoot(element);
    root.render(<StrictMode><App args={args} /></StrictMode>);
  },
  unmount() { root?.unmount(); root = null; },
};
