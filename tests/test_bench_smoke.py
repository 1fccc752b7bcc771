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


def test_bench_tiny_run_measures_the_floors_beside_their_targets(tmp_path: Path) -> None:
    """The rows that bound unmet targets (PostgreSQL's floor for the big batch's writes, the 10th
    UUID file's ceiling with a row per id) are measured in the same run as those targets."""
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "tests.bench.run", "--events", "2000", "--repeat", "1",
         "--only", "big,uuids10", "--cache", str(tmp_path / "cache"), "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures = {f["key"]: f for f in json.loads(out.read_text())["figures"]}
    assert {"process_big.db_floor", "process_10th_uuids.row_ceiling"} <= figures.keys()
    floor = figures["process_big.db_floor"]
    assert floor["error"] is None and floor["target"] == "-"
    assert set(floor["extra"]["floor_steps"]) == {"load", "sum", "users", "log", "minutes"}
    # the floor is the events over the sum of its steps' seconds, beside DuckDB's own samples
    steps = sum(v[0] for v in floor["extra"]["floor_steps"].values())
    assert abs(floor["evtool"]["median"] - 20_000 / steps) <= 1e-6 * floor["evtool"]["median"]
    assert floor["baseline"]["samples"] == figures["process_big.vs_duckdb"]["baseline"]["samples"]
    ceiling = figures["process_10th_uuids.row_ceiling"]
    assert ceiling["error"] is None and len(ceiling["extra"]["id_growth"]) == 1
    assert ceiling["baseline"]["samples"] == figures["process_10th_uuids"]["baseline"]["samples"]
