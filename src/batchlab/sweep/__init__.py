"""Plan, execute and persist runs: sweep specs, the SQLite store, executors."""
