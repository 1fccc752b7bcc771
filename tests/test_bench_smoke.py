"""The bench runs end to end in a tiny mode: a table on stdout and a JSON file of the same figures.

No speed is asserted here (issue 4: nothing about speed goes into a timed test).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_tiny_run_prints_table_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "tests.bench.run", "--events", "10000", "--repeat", "1", "--only", "process",
         "--cache", str(tmp_path / "cache"), "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "evtool median (min-max)" in proc.stdout and "naive processor" in proc.stdout
    # The independent references ran beside evtool and their totals were checked (a wrong total
    # is an error, which would fail the run above).
    assert "DuckDB parse + aggregate" in proc.stdout and "psql COPY + GROUP BY" in proc.stdout
    result = json.loads(out.read_text())
    assert {"revision", "date", "seconds", "repeat", "sizes", "machine", "figures"} <= result.keys()
    keys = [f["key"] for f in result["figures"]]
    assert keys == ["process_cold_1k", "process_cold_1k.vs_naive", "process_cold_1k.vs_psql",
                    "process_cold_many", "process_cold_many.vs_duckdb", "process_cold_many.vs_psql"]
    for fig in result["figures"]:
        assert fig["error"] is None
        assert {"label", "unit", "evtool", "baseline", "ratio", "target", "met"} <= fig.keys()
        assert fig["evtool"]["median"] > 0 and fig["baseline"]["median"] > 0
        assert len(fig["evtool"]["samples"]) == len(fig["baseline"]["samples"]) == 1
