"""The one private entry of google-cloud-bigquery the gateway uses; its contract test is
tests/test_warehouse_cost.py (``test_contract_...``), which fails loudly when an upgrade moves it.

``jobs.query`` answers with the first page of the result, its row count, its
job and what BigQuery billed. The client's public ways to run it hide that
answer: ``query_and_wait`` makes one more round trip (``jobs.get``) before it
hands back a result with more pages, and before the answer's row count, and
``Client.query`` cannot ask for a first page of a chosen size. The stream's
first chunk waits for every requested interval's count, so that round trip
is on its path (measured: docs/PERFORMANCE.md, "One query per interval");
and the billed bytes (``totalBytesBilled``) are in the answer alone, with no
job to ask for them when BigQuery answered without one. So the gateway posts
``jobs.query`` itself, through the client's own authorised transport,
retries and error mapping (``Client._call_api``), and reads the answer's rows
with the client's public ``RowIterator``.
"""

from __future__ import annotations

from typing import Any

from google.api_core.retry import Retry
from google.cloud import bigquery


def post_query(client: bigquery.Client, body: dict[str, Any], *, retry: Retry, timeout: float) -> dict[str, Any]:
    """``jobs.query`` with this request body; the answer as BigQuery sent it (``QueryResponse``)."""
    answer: dict[str, Any] = client._call_api(
        retry,
        span_name="BigQuery.query",
        span_attributes={"path": f"/projects/{client.project}/queries"},
        method="POST",
        path=f"/projects/{client.project}/queries",
        data=body,
        timeout=timeout,
    )
    return answer
