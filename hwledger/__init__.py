"""hwledger: the controller app of hwledger-fleet (CLI, SQLite store, heartbeat/job server)."""

__version__ = "0.1.0"
