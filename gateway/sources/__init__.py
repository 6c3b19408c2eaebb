"""Where candles come from: running jobs in Redis, backtests in BigQuery, the cache."""
