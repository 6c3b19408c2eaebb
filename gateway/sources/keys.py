"""Every Redis key the gateway reads or writes, one function each.

All keys of one job (or backtest) share the hash tag ``{<id>}`` so that they
live in one slot of a Redis Cluster and can be read in one pipeline. Callers
pass ids and interval names that ``gateway.params`` already validated.
"""

from __future__ import annotations


def job_key(job_id: str) -> str:
    """The job hash written by workers (SPEC 6)."""
    return f"job:{{{job_id}}}"


def candles_key(job_id: str, interval: str) -> str:
    """One list of JSON candles per interval, appended with RPUSH (SPEC 6)."""
    return f"job:{{{job_id}}}:candles:{interval}"


def events_channel(job_id: str) -> str:
    """The pub/sub channel on which workers note appends and status changes."""
    return f"job:{{{job_id}}}:events"


def backtest_meta_key(backtest_id: str) -> str:
    """Cached warehouse metadata of a completed backtest (a msgspec JSON blob)."""
    return f"bt:{{{backtest_id}}}:meta"


def backtest_candles_key(backtest_id: str, interval: str) -> str:
    """Cached candles of one completed backtest interval (a list, like a job's)."""
    return f"bt:{{{backtest_id}}}:candles:{interval}"


def backtest_complete_key(backtest_id: str) -> str:
    """Hash of interval -> candle count, set when that interval's cached list is complete."""
    return f"bt:{{{backtest_id}}}:complete"


def backtest_staging_key(backtest_id: str, interval: str) -> str:
    """The list the one warehouse read of an interval fills, page by page, before it is renamed into place."""
    return f"bt:{{{backtest_id}}}:staging:{interval}"


def backtest_fill_key(backtest_id: str, interval: str) -> str:
    """Hash of that read's progress: ``count`` (the interval's rows, known first) and ``error``."""
    return f"bt:{{{backtest_id}}}:fill:{interval}"


def backtest_fill_lock_key(backtest_id: str, interval: str) -> str:
    """Held (short TTL, refreshed) by the one replica reading the interval from the warehouse."""
    return f"bt:{{{backtest_id}}}:fill-lock:{interval}"


def backtest_missing_key(backtest_id: str) -> str:
    """Set for a while after the warehouse said this backtest id does not exist."""
    return f"bt:{{{backtest_id}}}:missing"


def job_backtest_missing_key(job_id: str) -> str:
    """Set for a while after the warehouse said no backtest came from this job id."""
    return f"bt-of-job:{{{job_id}}}:missing"


def job_backtest_key(job_id: str) -> str:
    """The id of the backtest a job produced, as the warehouse said (a cached lookup)."""
    return f"bt-of-job:{{{job_id}}}:backtest"


def warehouse_lookups_key(user_id: str) -> str:
    """Warehouse metadata lookups one user caused in the current second (a counter)."""
    return f"gateway:bq-lookups:{{{user_id}}}"


def user_streams_key(user_id: str) -> str:
    """Sorted set of one user's open streams across replicas (score: expiry)."""
    return f"gateway:streams:{{{user_id}}}"


def replica_liveness_key(replica_id: str) -> str:
    """Set by a replica every second with a 3 s expiry: while it exists, that replica's stream slots count."""
    return f"gateway:replica:{{{replica_id}}}"


def user_cancelled_streams_key(user_id: str) -> str:
    """Sorted set of slot members whose acquire was given up (score: expiry); one landing late takes no slot."""
    return f"gateway:streams-cancelled:{{{user_id}}}"
