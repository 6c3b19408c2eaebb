// The SSE parser alone: framing as the HTML standard defines it, text cut anywhere.
import { test } from "node:test";
import assert from "node:assert/strict";
import { SSEParser } from "../src/sse.js";

function parse(pieces) {
  const events = [];
  const parser = new SSEParser((event) => events.push(event));
  for (const piece of pieces) parser.feed(piece);
  return events;
}

const STREAM = 'id: a1\nevent: interval_start\ndata: {"interval":"day"}\nretry: 3000\n\n: ping\n\n'
  + 'id: a2\r\nevent: data_chunk\r\ndata: {"x":1}\r\n\r\n'
  + "id: a3\revent: all_complete\rdata: {}\r\r";

test("events, ids and retry, with LF, CRLF and CR line ends", () => {
  assert.deepEqual(parse([STREAM]), [
    { event: "interval_start", data: '{"interval":"day"}', id: "a1", retry: 3000 },
    { event: "data_chunk", data: '{"x":1}', id: "a2", retry: null },
    { event: "all_complete", data: "{}", id: "a3", retry: null },
  ]);
});

test("the same stream cut at every position gives the same events", () => {
  const whole = parse([STREAM]);
  for (let cut = 1; cut < STREAM.length; cut++) {
    assert.deepEqual(parse([STREAM.slice(0, cut), STREAM.slice(cut)]), whole, `cut at ${cut}`);
  }
  assert.deepEqual(parse([...STREAM]), whole, "one character at a time");
});

test("multi-line data, a field without a value, a leading BOM, unknown fields", () => {
  const events = parse(["\ufeffdata: one\ndata\ndata:three\nfoo: bar\n\n"]);
  assert.deepEqual(events, [{ event: "message", data: "one\n\nthree", id: null, retry: null }]);
});

test("an event without data is not dispatched, the last id carries over, a bad retry is ignored", () => {
  const events = parse(["id: 7\nevent: x\n\nretry: soon\ndata: d\n\n"]);
  assert.deepEqual(events, [{ event: "message", data: "d", id: "7", retry: null }]);
});

test("an incomplete last event is not dispatched", () => {
  assert.deepEqual(parse(["data: partial"]), []);
});
