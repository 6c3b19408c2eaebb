"""A counting reverse proxy in front of the BigQuery emulator, for tests and ``make bench``.

Every request the gateway's BigQuery client sends goes through it to the
emulator and back, and is counted by what it costs on BigQuery:

- ``query``: ``jobs.query`` or ``jobs.insert``, billed; by purpose, read from
  its SQL: ``metadata`` (the ``backtests`` table), ``candles``, ``other``;
- ``page``: ``jobs.getQueryResults`` (a page of a result: free);
- ``job``: ``jobs.get`` (free); ``tabledata``: ``tabledata.list`` (free).

It can also do what the emulator does not: cut page requests for real (the
answer's headers and half its body go out, then the connection is aborted),
report bytes processed and billed per query as BigQuery would (the emulator
reports 0), answer small results without a job, as BigQuery's
``JOB_CREATION_OPTIONAL`` does (the emulator always makes one), and answer
a query as one still running (as BigQuery does past the request's
``timeoutMs``).
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Final

import aiohttp
from aiohttp import web

_HOP_BY_HOP: Final = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding", "host", "upgrade"}
)


@dataclass
class Seen:
    """One request the proxy passed on."""

    kind: str  # query | page | job | tabledata | other
    purpose: str | None  # for queries: metadata | candles | other
    method: str
    path: str
    query: dict[str, str]
    sql: str | None = None
    # A query's parameters (name: value); a query's job comes with its answer (None: answered without one).
    parameters: dict[str, str] = field(default_factory=dict)
    job_id: str | None = None


@dataclass
class Costs:
    """What to report a query of each purpose processed and billed (None: what the emulator said)."""

    processed: dict[str, int] = field(default_factory=dict)
    billed: dict[str, int] = field(default_factory=dict)


class CountingProxy:
    """``start()`` returns the address to give the gateway as ``bigquery.api_endpoint``."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.seen: list[Seen] = []
        # The next ``cut_pages`` page requests are cut half-way through their answer.
        self.cut_pages = 0
        self.cuts = 0
        self.costs = Costs()
        # Answer results that fit in the query's answer without a job (BigQuery's short query mode).
        self.jobless = False
        # Candle queries and result pages answer this much later (a slow warehouse).
        self.delay_s = 0.0
        # Answer queries as BigQuery answers one that outlives its timeoutMs: job still running, no rows.
        self.still_running = False
        self._purposes: dict[str, str] = {}  # job id -> purpose of its query
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self.url = ""

    async def start(self) -> str:
        app = web.Application(client_max_size=256 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._forward)
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120))
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        # Bound here, on a port the kernel picks: no race with other tests for a free one.
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        await web.SockSite(self._runner, sock).start()
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        return self.url

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    # -- what went through ----------------------------------------------------------

    def counts(self) -> Counter[str]:
        """``query:<purpose>``, ``page``, ``job``, ``tabledata``, ``other``: how many of each."""
        return Counter(f"query:{s.purpose}" if s.kind == "query" else s.kind for s in self.seen)

    def queries(self, purpose: str | None = None, **parameters: str) -> list[Seen]:
        """The queries (of ``purpose``, with these parameter values) in the order they came."""
        return [
            s
            for s in self.seen
            if s.kind == "query"
            and (purpose is None or s.purpose == purpose)
            and all(s.parameters.get(name) == value for name, value in parameters.items())
        ]

    def clear(self) -> None:
        self.seen.clear()

    # -- the proxy ---------------------------------------------------------------------

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        assert self._session is not None
        body = await request.read()
        seen = _classify(request, body)
        self.seen.append(seen)
        headers = {name: value for name, value in request.headers.items() if name.lower() not in _HOP_BY_HOP}
        async with self._session.request(
            request.method, self.upstream + request.rel_url.raw_path_qs, headers=headers, data=body or None
        ) as upstream:
            answer = await upstream.read()
            status = upstream.status
            answer_headers = {k: v for k, v in upstream.headers.items() if k.lower() not in _HOP_BY_HOP}
        if status == 200:
            answer = self._rewrite(seen, answer)
        if self.delay_s and (seen.kind == "page" or seen.purpose == "candles"):
            await asyncio.sleep(self.delay_s)
        if seen.kind == "page" and self.cut_pages > 0:
            self.cut_pages -= 1
            self.cuts += 1
            return await _cut(request, status, answer_headers, answer)
        return web.Response(status=status, body=answer, headers=answer_headers)

    def _rewrite(self, seen: Seen, answer: bytes) -> bytes:
        """Costs as BigQuery reports them, and jobless answers, where asked for."""
        if seen.kind == "query" and seen.purpose is not None:
            document = json.loads(answer)
            job = (document.get("jobReference") or {}).get("jobId")
            if job:
                self._purposes[job] = seen.purpose
            changed = _apply_costs(document, self.costs, seen.purpose)
            if self.still_running and job:
                for name in ("rows", "totalRows", "pageToken", "schema"):
                    document.pop(name, None)
                document["jobComplete"] = False
                seen.job_id = job
                return json.dumps(document).encode()
            if self.jobless and "pageToken" not in document and document.get("jobComplete"):
                document.pop("jobReference", None)
                document["queryId"] = f"jobless-{job}"
                changed = True
            else:
                seen.job_id = job
            return json.dumps(document).encode() if changed else answer
        if seen.kind == "job" and seen.job_id in self._purposes:
            document = json.loads(answer)
            statistics = document.setdefault("statistics", {})
            if _apply_costs(statistics, self.costs, self._purposes[seen.job_id]):
                _apply_costs(statistics.setdefault("query", {}), self.costs, self._purposes[seen.job_id])
                return json.dumps(document).encode()
        return answer


def _apply_costs(document: dict[str, Any], costs: Costs, purpose: str) -> bool:
    changed = False
    if purpose in costs.processed:
        document["totalBytesProcessed"] = str(costs.processed[purpose])
        changed = True
    if purpose in costs.billed:
        document["totalBytesBilled"] = str(costs.billed[purpose])
        changed = True
    return changed


async def _cut(request: web.Request, status: int, headers: dict[str, str], answer: bytes) -> web.StreamResponse:
    """Send the answer's status, headers and half its body, then abort the connection."""
    response = web.StreamResponse(status=status, headers=headers)
    response.content_length = len(answer)
    await response.prepare(request)
    await response.write(answer[: len(answer) // 2])
    assert request.transport is not None
    request.transport.abort()
    return response


def _classify(request: web.Request, body: bytes) -> Seen:
    path = request.path
    parts = path.rstrip("/").split("/")
    query = dict(request.query)
    if request.method == "POST" and (path.endswith("/queries") or path.endswith("/jobs")):
        document = json.loads(body or b"{}")
        sql = document.get("query") or document.get("configuration", {}).get("query", {}).get("query")
        if sql is not None:
            given = document.get("queryParameters") or document.get("configuration", {}).get("query", {}).get(
                "queryParameters", []
            )
            parameters = {p["name"]: p.get("parameterValue", {}).get("value") for p in given}
            return Seen("query", _purpose(sql), request.method, path, query, sql=sql, parameters=parameters)
    if request.method == "GET" and len(parts) >= 2 and parts[-2] == "queries":
        return Seen("page", None, request.method, path, query, job_id=parts[-1])
    if request.method == "GET" and len(parts) >= 2 and parts[-2] == "jobs":
        return Seen("job", None, request.method, path, query, job_id=parts[-1])
    if request.method == "GET" and path.endswith("/data"):
        return Seen("tabledata", None, request.method, path, query)
    return Seen("other", None, request.method, path, query)


def _purpose(sql: str) -> str:
    # The gateway's two queries: the metadata lookup selects user_id, the candle read volume.
    if "user_id" in sql:
        return "metadata"
    if "volume" in sql:
        return "candles"
    return "other"
