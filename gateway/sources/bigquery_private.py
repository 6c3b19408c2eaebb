"""The one private attribute of google-cloud-bigquery the gateway reads; its contract test is
tests/test_bigquery_private.py, which fails loudly when an upgrade moves it.

``jobs.query`` answers with ``totalBytesBilled``, what BigQuery bills for the
query, but the client's ``RowIterator`` exposes only ``total_bytes_processed``.
The figure is in the response the iterator keeps as its first page. The
public alternative, ``jobs.get`` on the query's job, costs a round trip per
query and does not exist for a query BigQuery answered without a job
(``JOB_CREATION_OPTIONAL``): every metadata lookup and every small interval.
"""

from __future__ import annotations

from typing import Any


def bytes_billed(rows: Any) -> int | None:
    """The bytes BigQuery billed for the query behind ``rows`` (from ``query_and_wait``), if it said.

    Read it before iterating ``rows``: the iterator lets go of the answer with its first page.
    """
    response = getattr(rows, "_first_page_response", None)
    if not isinstance(response, dict):
        return None
    value = response.get("totalBytesBilled")
    return None if value is None else int(value)
