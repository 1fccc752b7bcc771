"""evtool as a user gets it: a wheel, installed into a fresh venv, run from another directory.

`make install` is editable, so it finds files next to the checkout that a wheel does not carry
(the migrations were such a file). This builds the wheel from a copy of the checkout, installs it
into a new venv (no system site-packages, no editable path), and runs the real commands there
against the test database, from a directory that is not the checkout.

Dependencies come from a wheelhouse kept beside the test venv (`.venv/wheelhouse`, or
$EVTOOL_TEST_WHEELHOUSE): offline when it already holds what is needed, filled from the package
index once when it does not, so repeated runs neither need nor wait for the network.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from .conftest import ROOT

# Not copied into the build: local state, caches and earlier build output.
_IGNORE = shutil.ignore_patterns(".git", ".venv", ".evtool", "build", "dist", "*.egg-info",
                                 "__pycache__", ".pytest_cache", ".ruff_cache", "server-events.jsonl",
                                 "bench-results*.json")


def _wheelhouse() -> Path:
    path = Path(os.environ.get("EVTOOL_TEST_WHEELHOUSE") or Path(sys.prefix) / "wheelhouse")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _run(args: list[str], *, cwd: Path, env: dict | None = None,
         timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `args`; nothing of the checkout's environment (PYTHONPATH, an active venv) leaks in."""
    full = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**full, **(env or {})})


def _offline(wheelhouse: Path) -> list[str]:
    return ["--no-index", "--find-links", str(wheelhouse)]


def _fill(wheelhouse: Path, requirements: list[str], *, cwd: Path) -> None:
    """Make the wheelhouse hold `requirements`: from itself when it can, else from the index."""
    args = [sys.executable, "-m", "pip", "download", "--dest", str(wheelhouse), *requirements]
    if _run([*args, *_offline(wheelhouse)], cwd=cwd).returncode == 0:
        return
    online = _run(args, cwd=cwd)
    assert online.returncode == 0, f"could not fill {wheelhouse}:\n{online.stdout}\n{online.stderr}"


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bin/ directory of a fresh venv holding evtool installed from its wheel."""
    base = tmp_path_factory.mktemp("wheel")
    wheelhouse = _wheelhouse()
    src = base / "src"
    shutil.copytree(ROOT, src, ignore=_IGNORE)
    build_requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    # pip builds in an isolated environment; it installs the build requirements from the wheelhouse.
    _fill(wheelhouse, build_requires, cwd=base)
    dist = base / "dist"
    built = _run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--wheel-dir", str(dist),
                  *_offline(wheelhouse)], cwd=base)
    assert built.returncode == 0, f"pip wheel failed:\n{built.stdout}\n{built.stderr}"
    (wheel,) = dist.glob("evtool-*.whl")

    venv = base / "venv"
    # A new venv without pip in it (ensurepip would add seconds and nothing evtool uses); this
    # venv's own pip installs into it with --python.
    made = _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=base)
    assert made.returncode == 0, made.stderr
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    _fill(wheelhouse, dependencies, cwd=base)
    # Offline: only the wheel and what its metadata asks for, from the wheelhouse.
    added = _run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install",
                  str(wheel), *_offline(wheelhouse)], cwd=base)
    assert added.returncode == 0, f"pip install failed:\n{added.stdout}\n{added.stderr}"
    return venv / "bin"


def test_wheel_installed_elsewhere_processes_and_answers_revenue(installed: Path, dsn: str, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {"EVTOOL_DSN": dsn, "EVTOOL_HOME": str(tmp_path / "home")}

    where = _run([str(installed / "python"), "-c", "import evtool; print(evtool.__file__)"],
                 cwd=elsewhere, env=env)
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()).is_relative_to(installed.parent), where.stdout
    assert not Path(where.stdout.strip()).is_relative_to(ROOT)
    # The wheel carries the C line loop (built where a compiler is, as here), not only the source.
    if shutil.which("cc") or shutil.which("gcc"):
        show = "from evtool import parser; print(parser._fastlines)"
        native = _run([str(installed / "python"), "-c", show], cwd=elsewhere, env=env)
        assert native.returncode == 0 and "_fastlines" in native.stdout, native.stdout + native.stderr
        assert not Path(native.stdout.split("from '")[-1].rstrip("'>\n")).is_relative_to(ROOT), native.stdout

    journal = elsewhere / "server-events.jsonl"
    journal.write_text(
        '{"userId": "user1", "name": "add_revenue", "value": 100.10}\n'
        '{"userId": "user1", "name": "subtract_revenue", "value": 0.05}\n'
        '{"userId": "user2", "name": "add_revenue", "value": 7}\n'
    )
    evtool = str(installed / "evtool")
    done = _run([evtool, "process", "--json"], cwd=elsewhere, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert '"applied":3' in done.stdout.replace(" ", "")

    revenue = _run([evtool, "revenue", "user1"], cwd=elsewhere, env=env, timeout=60)
    assert revenue.returncode == 0, revenue.stderr
    assert revenue.stdout.strip() == "100.05"

    unknown = _run([evtool, "revenue", "nobody"], cwd=elsewhere, env=env, timeout=60)
    assert unknown.returncode == 1
    assert "Traceback" not in unknown.stderr


def test_no_migration_lives_outside_the_package():
    """A migration added under the old top-level sql/ (e.g. by a branch made before the move) would
    be missing from every wheel: it belongs in evtool/sql/."""
    stray = sorted(p.relative_to(ROOT).as_posix() for p in ROOT.glob("sql/*.sql"))
    assert not stray, f"move {stray} to evtool/sql/"
