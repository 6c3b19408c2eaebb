"""A local BigQuery emulator (``bqemulator``, backed by DuckDB) for tests and development.

The emulator runs as a subprocess of this interpreter, in memory, on a free
loopback port, with its log in a file under its state directory. The
official client talks to it anonymously through ``api_endpoint``. Rows are
written with ``insert_rows_json`` (the emulator rejects the client's
multipart load uploads).
"""

from __future__ import annotations

import atexit
import contextlib
import http.client
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from datetime import date
from importlib.resources import as_file, files
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self

from google.api_core import exceptions as google_exceptions
from google.auth.credentials import AnonymousCredentials
from google.cloud import bigquery

from gateway.config import BigQuerySettings
from gateway.sources.warehouse import make_client as gateway_client

log = logging.getLogger(__name__)

BACKTESTS_SCHEMA: Final = (
    bigquery.SchemaField("backtest_id", "STRING"),
    bigquery.SchemaField("user_id", "STRING"),
    bigquery.SchemaField("symbol", "STRING"),
    bigquery.SchemaField("exchange", "STRING"),
    bigquery.SchemaField("intervals", "STRING", mode="REPEATED"),
    bigquery.SchemaField("from_date", "DATE"),
    bigquery.SchemaField("to_date", "DATE"),
    bigquery.SchemaField("job_id", "STRING"),
    bigquery.SchemaField("created_at", "TIMESTAMP"),
)
CANDLES_SCHEMA: Final = (
    bigquery.SchemaField("backtest_id", "STRING"),
    bigquery.SchemaField("interval", "STRING"),
    bigquery.SchemaField("time", "TIMESTAMP"),
    bigquery.SchemaField("open", "FLOAT64"),
    bigquery.SchemaField("high", "FLOAT64"),
    bigquery.SchemaField("low", "FLOAT64"),
    bigquery.SchemaField("close", "FLOAT64"),
    bigquery.SchemaField("volume", "INT64"),
)

# The layout docs/OPERATIONS.md asks of the real tables: each query reads one backtest's
# blocks (and one interval's), not the table. Clustering, not partitioning: the queries
# filter on these columns, never on a date (docs/DECISIONS.md).
BACKTESTS_CLUSTERING: Final = ("backtest_id",)
CANDLES_CLUSTERING: Final = ("backtest_id", "interval")

_POLL_S: Final = 0.05
_LOG_NAME: Final = "bqemulator.log"


class BigQueryEmulator:
    """One ``bqemulator`` process; ``start()`` blocks until it answers (1 to 2 s)."""

    def __init__(self, state_dir: Path, project: str = "demo-candles", port: int | None = None) -> None:
        # Absolute: the emulator runs with its cwd and HOME inside it.
        self.state_dir = state_dir.resolve()
        self.project = project
        self._requested_port = port or 0
        self._port: int | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self.startup_s: float | None = None

    @property
    def endpoint(self) -> str:
        if self._port is None:
            raise RuntimeError("the BigQuery emulator is not running")
        return f"http://127.0.0.1:{self._port}"

    @property
    def log_path(self) -> Path:
        return self.state_dir / _LOG_NAME

    def start(self, timeout_s: float = 60) -> str:
        """Start the emulator and return its endpoint."""
        if self._process is not None:
            raise RuntimeError("the BigQuery emulator is already running")
        started = time.monotonic()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        home = self.state_dir / "home"
        _install_spatial_extension(home)
        env = {key: value for key, value in os.environ.items() if not key.startswith("BQEMU_")}
        env |= {
            # DuckDB finds the spatial extension (which the emulator requires) under $HOME/.duckdb.
            "HOME": str(home),
            "PYTHONUNBUFFERED": "1",
            # Avro is optional, and installing it means a download attempt at every start.
            "BQEMU_ENABLE_FORMAT_EXTENSIONS": "false",
            "BQEMU_UPLOAD_STAGING_DIR": str(self.state_dir / "uploads"),
        }
        command = [
            sys.executable, "-m", "bqemulator", "start", "--ephemeral",
            "--rest-host", "127.0.0.1", "--rest-port", str(self._requested_port),
            # The gRPC (Storage API) port is unused, but must not clash with another emulator's.
            "--grpc-host", "127.0.0.1", "--grpc-port", "0",
            "--project", self.project, "--log-format", "json", "--log-level", "info",
        ]  # fmt: skip
        with self.log_path.open("wb") as log_file:
            # Its own session, so stop() can signal the whole process group; cwd so no
            # stray .bqemu.toml is read.
            self._process = subprocess.Popen(  # noqa: S603
                command,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                cwd=self.state_dir,
                env=env,
                start_new_session=True,
            )
        # A safety net for a caller that never stops it (no help against SIGKILL, though).
        atexit.register(self.stop)
        try:
            self._port = self._wait_until_ready(started + timeout_s)
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.monotonic() - started
        log.info("BigQuery emulator at %s (started in %.2f s)", self.endpoint, self.startup_s)
        return self.endpoint

    def stop(self, timeout_s: float = 10) -> None:
        """Terminate the emulator and anything it started; idempotent."""
        process, self._process, self._port = self._process, None, None
        atexit.unregister(self.stop)
        if process is None or process.returncode is not None:
            return
        _signal_group(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        # Wait without reaping it: while it is a zombie, its process group id cannot be
        # reused, so the SIGKILL below reaches only what is left of its own group.
        while not _has_exited(process.pid) and time.monotonic() < deadline:
            time.sleep(_POLL_S)
        _signal_group(process.pid, signal.SIGKILL)
        process.wait()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _wait_until_ready(self, deadline: float) -> int:
        assert self._process is not None
        port = None
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(
                    f"the BigQuery emulator exited with status {self._process.returncode}:\n" + _tail(self.log_path)
                )
            # It binds port 0 itself and logs the real port: no race for a free port.
            port = port or _listening_port(self.log_path)
            if port is not None and _is_ready(port):
                return port
            time.sleep(_POLL_S)
        raise TimeoutError(f"the BigQuery emulator did not answer in time:\n{_tail(self.log_path)}")


def loading_client(project: str, endpoint: str) -> bigquery.Client:
    """A client for the emulator: anonymous, pointed at ``endpoint`` only, failed queries raising."""
    client = bigquery.Client(
        project=project,
        credentials=AnonymousCredentials(),
        client_options={"api_endpoint": endpoint},
    )
    raise_query_errors(client)
    return client


def emulator_client(settings: BigQuerySettings) -> bigquery.Client:
    """The gateway's own client, made to raise for failed queries as BigQuery does.

    For ``create_app(settings, bigquery_client=emulator_client)``.
    """
    client = gateway_client(settings)
    raise_query_errors(client)
    return client


def raise_query_errors(client: bigquery.Client) -> None:
    """Make ``client`` raise for a failed ``jobs.query``, as it does against BigQuery.

    bqemulator answers a failed query (syntax error, unknown table, missing
    parameter, ...) with HTTP 200, ``jobComplete`` and a top-level ``errors``
    list, which the client turns into an empty result. This response hook
    rewrites such answers into the 400/404 error BigQuery sends.
    """
    client._http.hooks["response"].append(_query_error_hook)


def _query_error_hook(response: Any, *args: Any, **kwargs: Any) -> Any:
    request = response.request
    if (
        response.status_code == 200
        and request.method == "POST"
        and request.path_url.partition("?")[0].endswith("/queries")
    ):
        # Cheap test first: result pages can be large.
        errors = b'"errors"' in response.content and response.json().get("errors")
        if errors:
            code = 404 if errors[0].get("reason") == "notFound" else 400
            error = {"code": code, "message": errors[0].get("message", ""), "errors": errors}
            response.status_code = code
            response._content = json.dumps({"error": error}).encode()
    return response


def create_warehouse(
    client: bigquery.Client, dataset: str, backtests_table: str = "backtests", candles_table: str = "candles"
) -> None:
    """Create the dataset and both tables if they are missing, clustered as in production."""
    client.create_dataset(f"{client.project}.{dataset}", exists_ok=True)
    for name, schema, clustering in (
        (backtests_table, BACKTESTS_SCHEMA, BACKTESTS_CLUSTERING),
        (candles_table, CANDLES_SCHEMA, CANDLES_CLUSTERING),
    ):
        table = bigquery.Table(f"{client.project}.{dataset}.{name}", list(schema))
        table.clustering_fields = list(clustering)
        client.create_table(table, exists_ok=True)


def insert_backtest(client: bigquery.Client, dataset: str, table: str, row: Mapping[str, Any]) -> None:
    """Insert one ``backtests`` row; ``date``/``datetime`` values may be given as such."""
    _insert(client, f"{client.project}.{dataset}.{table}", BACKTESTS_SCHEMA, [row])


def insert_candles(
    client: bigquery.Client,
    dataset: str,
    table: str,
    rows: Sequence[Mapping[str, Any]],
    batch_rows: int = 5000,
) -> None:
    """Insert ``candles`` rows in batches of ``batch_rows`` (one request each)."""
    table_id = f"{client.project}.{dataset}.{table}"
    for start in range(0, len(rows), batch_rows):
        _insert(client, table_id, CANDLES_SCHEMA, rows[start : start + batch_rows])


def _insert(
    client: bigquery.Client,
    table_id: str,
    schema: Sequence[bigquery.SchemaField],
    rows: Sequence[Mapping[str, Any]],
) -> None:
    # The emulator silently drops unknown fields (BigQuery rejects them): a typo would insert NULLs.
    columns = {field.name for field in schema}
    unknown = {key for row in rows for key in row} - columns
    if unknown:
        raise ValueError(f"{table_id} has no columns {sorted(unknown)}")
    payload = [{key: _json_value(value) for key, value in row.items()} for row in rows]
    try:
        # retry=None: the emulator answers a value it cannot convert with a 500, which the
        # default retry would repeat for ten minutes. No insertIds: it does not deduplicate.
        errors = client.insert_rows_json(
            table_id,
            payload,
            row_ids=[None] * len(payload),
            retry=None,  # type: ignore[arg-type]  # documented, but typed as Retry only
        )
    except google_exceptions.InternalServerError as exc:
        raise RuntimeError(f"inserting into {table_id} failed (a value of the wrong type?): {exc}") from exc
    if errors:
        raise RuntimeError(f"inserting into {table_id} failed: {errors[:5]}")


def _json_value(value: Any) -> Any:
    # datetime is a date too.
    return value.isoformat() if isinstance(value, date) else value


def _install_spatial_extension(home: Path) -> None:
    """Copy the ``duckdb-extension-spatial`` wheel's extension where DuckDB looks for it offline."""
    import duckdb

    version = f"v{duckdb.__version__}"
    with duckdb.connect() as connection:
        row = connection.execute("PRAGMA platform").fetchone()
    assert row is not None
    target = home / ".duckdb" / "extensions" / version / str(row[0]) / "spatial.duckdb_extension"
    packaged = files("duckdb_extension_spatial") / "extensions" / version / "spatial.duckdb_extension"
    if not packaged.is_file():
        raise RuntimeError(f"duckdb-extension-spatial has no extension for DuckDB {version}")
    with as_file(packaged) as source:
        if target.is_file() and target.stat().st_size == source.stat().st_size:
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(f".{os.getpid()}.partial")
        shutil.copyfile(source, partial)
        partial.replace(target)


def _listening_port(log_path: Path) -> int | None:
    """The port of the emulator's ``rest.listen`` JSON log line, if it has been written."""
    for line in log_path.read_bytes().splitlines():
        if b'"rest.listen"' in line:
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if record.get("event") == "rest.listen":
                    return int(record["port"])
    return None


def _is_ready(port: int) -> bool:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        connection.request("GET", "/readyz")
        return connection.getresponse().status == 200
    except OSError:
        return False
    finally:
        connection.close()


def _has_exited(pid: int) -> bool:
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _signal_group(pid: int, signum: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signum)


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
