"""deploy/: the systemd units parse, start real evtool commands, and agree with each other.

systemd itself cannot run here (no systemd as PID 1), so this checks what can be checked without
it: `systemd-analyze verify` (when installed) on the unit files, and every ExecStart run through
evtool's own option parser with the example environment file's extra options.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT

DEPLOY = ROOT / "deploy"
UNITS = {"serve": DEPLOY / "evtool-serve.service", "process": DEPLOY / "evtool-process.service"}
ENV_FILE = DEPLOY / "evtool.env"
STATE = "/var/lib"  # what systemd's %S is for a system unit


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """A unit file as {section: {key: [values...]}}: systemd allows a key more than once."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None and "=" in line, f"{path.name}:{number}: not a key=value line: {raw!r}"
        key, value = line.split("=", 1)
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def parse_env(path: Path) -> dict[str, str]:
    """An EnvironmentFile: KEY=VALUE lines, comments and blank lines ignored."""
    env = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            key, value = line.split("=", 1)
            env[key] = value
    return env


def exec_start(unit: dict, env: dict[str, str]) -> list[str]:
    """ExecStart as systemd would run it: %S expanded, `$VAR` split into words, `${VAR}` one word."""
    (command,) = unit["Service"]["ExecStart"]
    words: list[str] = []
    for word in shlex.split(command.replace("%S", STATE)):
        if re.fullmatch(r"\$[A-Za-z_][A-Za-z0-9_]*", word):
            words += env[word[1:]].split()
        else:
            words.append(re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", lambda m: env[m.group(1)], word))
    return words


@pytest.mark.parametrize("command", sorted(UNITS))
def test_unit_runs_a_real_evtool_command_under_a_dedicated_user(command):
    unit = parse_unit(UNITS[command])
    service = unit["Service"]
    env = parse_env(ENV_FILE)
    for key, want in {"Restart": "on-failure", "User": "evtool", "Group": "evtool",
                      "StateDirectory": "evtool", "EnvironmentFile": "/etc/evtool/evtool.env",
                      "KillMode": "mixed", "NoNewPrivileges": "yes", "ProtectSystem": "strict"}.items():
        assert service.get(key) == [want], f"{UNITS[command].name}: {key}={service.get(key)}"
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]

    argv = exec_start(unit, env)
    assert argv[0] == "/usr/local/bin/evtool" and argv[1] == command, argv
    # evtool's own parser: an unknown command or option is a usage error (exit 2) before --help
    # runs; every name known, --help answers 0.
    checked = subprocess.run([sys.executable, "-m", "evtool", *argv[1:], "--help"], capture_output=True,
                             text=True, timeout=60)
    assert checked.returncode == 0, checked.stderr
    assert checked.stdout.startswith(f"Usage: evtool {command}")


def test_units_share_one_journal_and_the_example_env_names_real_variables():
    serve, process = (exec_start(parse_unit(UNITS[c]), parse_env(ENV_FILE)) for c in ("serve", "process"))
    journal = serve[serve.index("--journal") + 1]
    assert journal == f"{STATE}/evtool/server-events.jsonl"
    assert journal in process, "the processor must read the journal the receiver writes"
    assert "--follow" in process

    env = parse_env(ENV_FILE)
    help_text = subprocess.run([sys.executable, "-m", "evtool", "serve", "--help"], capture_output=True,
                               text=True, timeout=60).stdout
    for name in ("EVTOOL_DSN", "EVTOOL_TOKEN"):
        assert name in env and f"env var: {name}" in help_text.replace("\n", " ")


def test_sysusers_file_creates_the_units_user():
    (line,) = [raw for raw in (DEPLOY / "evtool.sysusers.conf").read_text().splitlines()
               if raw.strip() and not raw.startswith("#")]
    kind, name, *_ = shlex.split(line)
    assert (kind, name) == ("u", "evtool")
    assert all(parse_unit(u)["Service"]["User"] == [name] for u in UNITS.values())


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verify_reports_nothing(tmp_path):
    """`systemd-analyze verify` exits 0 even for unknown keys, so any line about our units fails."""
    evtool = Path(sys.executable).parent / "evtool"
    assert evtool.exists(), "the test venv has no evtool script"
    for unit in UNITS.values():
        # verify insists the ExecStart binary exists: point it at this venv's.
        text = unit.read_text().replace("/usr/local/bin/evtool", str(evtool))
        (tmp_path / unit.name).write_text(text)
    paths = [str(tmp_path / u.name) for u in UNITS.values()]
    verified = subprocess.run(["systemd-analyze", "verify", *paths], capture_output=True, text=True,
                              timeout=60)
    about_ours = [line for line in (verified.stdout + verified.stderr).splitlines()
                  if any(u.name in line for u in UNITS.values())]
    assert verified.returncode == 0 and not about_ours, verified.stdout + verified.stderr


def test_grafana_dashboard_queries_name_metrics_that_exist(dsn, tmp_path):
    """Scrape a real `serve` and a real `process --follow --metrics`: every metric a dashboard
    query names is in one of the two expositions (a renamed metric would blank a panel)."""
    import json
    import signal
    import time
    import urllib.request

    from evtool.config import TOKEN

    from .conftest import Serve, event_line, evtool_cmd, free_port, http

    dashboard = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    exprs.append(dashboard["templating"]["list"][0]["query"])
    named = {m for e in exprs for m in re.findall(r"\b((?:evtool|process)_[a-z_]+)\b", e)}
    assert len(named) >= 15 and all(p["targets"] for p in dashboard["panels"])

    def names(url: str, token: str) -> set[str]:
        req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            text = resp.read().decode()
        return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and line[0] != "#"}

    port = free_port()
    with Serve(tmp_path, "--journal", str(tmp_path / "server-events.jsonl")) as serve:
        auth = {"Authorization": TOKEN}
        assert http(f"{serve.url}/liveEvent", "POST", event_line("u1", "1"), auth)[0] == 200
        assert http(f"{serve.url}/liveEvent", "POST", b'{"userId": ""}', auth)[0] == 422
        with open(tmp_path / "follow.log", "wb") as log:
            proc = subprocess.Popen(evtool_cmd("process", "--follow", "--metrics", f"127.0.0.1:{port}"),
                                    cwd=tmp_path, stdout=log, stderr=log)
        try:
            exposed: set[str] = set()
            for _ in range(3000):  # until the processor committed its first batch (a bound on polls)
                try:
                    exposed = names(f"http://127.0.0.1:{port}/metrics", "")
                except OSError:
                    exposed = set()
                if "evtool_process_batch_duration_seconds_bucket" in exposed and \
                        "evtool_process_lag_lines" in exposed:
                    break
                assert proc.poll() is None, (tmp_path / "follow.log").read_text()
                time.sleep(0.01)
            exposed |= names(f"{serve.url}/metrics", TOKEN)
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=60) == 0
    missing = sorted(n for n in named if n not in exposed)
    assert not missing, f"the dashboard names metrics nobody exposes: {missing}"
