// A streaming parser of text/event-stream, as the HTML standard's EventSource parses it
// (https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation).
// Feed it text as it arrives; it calls back once per complete event.

/**
 * @typedef {{ event: string, data: string, id: string | null, retry: number | null }} SSEEvent
 */

export class SSEParser {
  /** @param {(event: SSEEvent) => void} onEvent */
  constructor(onEvent) {
    this.onEvent = onEvent;
    this.buffer = "";
    this.sawFirstChunk = false;
    this.pendingCR = false;
    this.reset();
    // The last event id persists across events, and across reconnects (the caller keeps it).
    this.lastEventId = null;
  }

  reset() {
    this.eventType = "";
    this.data = "";
    this.hasData = false;
    this.retry = null;
    this.idSeen = false;
  }

  /** @param {string} text the next piece of the decoded stream, cut anywhere */
  feed(text) {
    if (!this.sawFirstChunk) {
      this.sawFirstChunk = true;
      if (text.charCodeAt(0) === 0xfeff) text = text.slice(1); // one leading BOM is ignored
    }
    if (this.pendingCR && text.startsWith("\n")) text = text.slice(1); // a CRLF cut between feeds
    this.pendingCR = false;
    this.buffer += text;
    let start = 0;
    for (;;) {
      let end = -1;
      for (let i = start; i < this.buffer.length; i++) {
        const c = this.buffer.charCodeAt(i);
        if (c === 10 || c === 13) { end = i; break; }
      }
      if (end === -1) break;
      const line = this.buffer.slice(start, end);
      if (this.buffer.charCodeAt(end) === 13) {
        if (end + 1 === this.buffer.length) this.pendingCR = true;
        else if (this.buffer.charCodeAt(end + 1) === 10) end++;
      }
      start = end + 1;
      this.line(line);
    }
    this.buffer = this.buffer.slice(start);
  }

  /** @param {string} line */
  line(line) {
    if (line === "") return this.dispatch();
    if (line.startsWith(":")) return; // a comment (": ping")
    const colon = line.indexOf(":");
    let field = line, value = "";
    if (colon !== -1) {
      field = line.slice(0, colon);
      value = line.slice(colon + 1);
      if (value.startsWith(" ")) value = value.slice(1);
    }
    if (field === "data") {
      this.data += value + "\n";
      this.hasData = true;
    } else if (field === "event") {
      this.eventType = value;
    } else if (field === "id") {
      if (!value.includes("\0")) { this.lastEventId = value; this.idSeen = true; }
    } else if (field === "retry") {
      if (/^[0-9]+$/.test(value)) this.retry = Number(value);
    }
  }

  dispatch() {
    const retry = this.retry;
    if (!this.hasData) {
      // No data: nothing is dispatched, but a retry: on its own still counts.
      if (retry !== null) this.onEvent({ event: "", data: "", id: this.lastEventId, retry });
      this.reset();
      return;
    }
    const event = {
      event: this.eventType || "message",
      data: this.data.slice(0, -1),
      id: this.lastEventId,
      retry,
    };
    this.reset();
    this.onEvent(event);
  }
}
