"""The heartbeat benchmark (`make bench`, `python -m bench --help`); see docs/performance.md."""
