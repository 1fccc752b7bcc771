"""evtool: revenue events from JSONL files into PostgreSQL, exactly once."""

__version__ = "0.1.0"
