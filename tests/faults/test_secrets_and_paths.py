"""Issue 9 item 6: no output, log or error body shows a password, whatever the DSN looks like;
a journal whose path is not UTF-8 is processed and shown like any other."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from evtool.config import mask_dsn, mask_secrets
from evtool.store import path_of_text, path_text

from ..conftest import Serve, evtool, http, totals

PASSWORD = "Zq7@pw:x/y"  # holds '@', ':' and '/'
MALFORMED = [
    f"postgresql://alice:{PASSWORD}@127.0.0.1:notaport/db",  # libpq splits at the first '@'
    f"postgresql://alice:{PASSWORD}@127.0.0.1:1/db?sslmode=bogus",
    "postgresql://alice:Zq7%40pw%3Ax@[::1/db",  # URL-encoded, and libpq quotes the whole URI
    f"host=127.0.0.1 port=abc password='{PASSWORD} q'",
    f"host=127.0.0.1 password='{PASSWORD}' bogus=1",
    f"postgresql://alice@127.0.0.1:1/db?password={PASSWORD.replace('@', '%40')}&sslmode=nope",
]
SECRETS = ("Zq7", "pw", "x/y", "%40")


def shows_no_secret(text: str) -> None:
    for s in SECRETS:
        assert s not in text, text


@pytest.mark.parametrize("dsn", [
    "postgresql://alice:Zq7@pw:x/y@db.example:5432/app?sslmode=require",
    "postgres://alice:Zq7%40pw%3Ax%2Fy@db.example/app",
    "host=db password='Zq7@pw:x/y \\' q' dbname=app",
    "host=db password=Zq7@pw:x/y dbname=app",
    "postgresql://alice@db/app?password=Zq7%40pw:x/y&sslmode=require",
])
def test_mask_dsn_masks_every_form_of_password(dsn):
    masked = mask_dsn(dsn)
    shows_no_secret(masked)
    assert "***" in masked and "db" in masked
    shows_no_secret(mask_secrets(f'could not parse "{dsn}" near Zq7@pw', dsn))


@pytest.mark.parametrize("dsn", MALFORMED)
def test_a_malformed_dsn_never_prints_its_password(dsn, tmp_path: Path):
    env = {"EVTOOL_DSN": dsn, "EVTOOL_HOME": str(tmp_path / "home")}
    (tmp_path / "server-events.jsonl").write_bytes(b'{"userId":"u","name":"add_revenue","value":1}\n')
    every = (["revenue", "u"], ["revenue", "--all", "--json"], ["report"], ["status", "--json"], ["status"],
             ["rejects"], ["process", "--retry-for", "0"], ["db", "status"], ["--verbose", "revenue", "u"])
    for args in every if dsn == MALFORMED[0] else every[:1] + every[3:4]:
        done = evtool(*args, cwd=tmp_path, env=env, timeout=60)
        out = done.stdout + done.stderr
        shows_no_secret(out)
        assert done.returncode in (0, 1), (args, out)
        if args[0] != "--verbose":
            assert "Traceback" not in out, (args, out)


def test_serve_never_logs_the_password_of_a_malformed_dsn(tmp_path: Path):
    dsn = MALFORMED[0]
    with Serve(tmp_path, env={"EVTOOL_DSN": dsn, "EVTOOL_HOME": str(tmp_path / "home")}) as serve:
        status, body, _ = http(serve.url + "/userEvents/u", headers={"Authorization": "Bearer secret"})
        assert status == 503
        shows_no_secret(json.dumps(body))
    shows_no_secret(serve.log.read_text())


def test_path_text_is_reversible():
    for raw in (b"/tmp/plain.jsonl", b"/tmp/j\xff\xfe.jsonl", b"/t/a\\b\\xff\xc3\xa9", b"/t/\\\\x41"):
        text = path_text(os.fsdecode(raw))
        text.encode("utf-8")  # always storable as PostgreSQL text
        assert os.fsencode(path_of_text(text)) == raw
    assert path_text("/tmp/plain.jsonl") == "/tmp/plain.jsonl"


@pytest.mark.skipif(sys.platform != "linux", reason="needs a filesystem that takes any bytes")
def test_a_journal_whose_path_is_not_utf8_is_processed(dsn, tmp_path: Path):
    name = b"server-\xff\xfe.jsonl"
    path = os.path.join(os.fsencode(tmp_path), name)
    with open(path, "wb") as f:
        f.write(b'{"userId":"u","name":"add_revenue","value":5}\nnot json\n')
    arg = os.fsdecode(name)
    env = {"PYTHONIOENCODING": "utf-8"}  # a plain UTF-8 terminal: surrogates cannot be printed raw
    done = subprocess.run([sys.executable, "-m", "evtool", "process", arg], cwd=tmp_path, capture_output=True,
                          env={**os.environ, **env}, timeout=120)
    out = (done.stdout + done.stderr).decode("utf-8", "replace")
    assert done.returncode == 0, out
    assert "Traceback" not in out
    assert totals(dsn) == {"u": 5}
    again = subprocess.run([sys.executable, "-m", "evtool", "process", arg], cwd=tmp_path,
                           capture_output=True, env={**os.environ, **env}, timeout=120)
    assert again.returncode == 0 and totals(dsn) == {"u": 5}  # found again under its name: nothing twice
    status = subprocess.run([sys.executable, "-m", "evtool", "status", "--json", arg], cwd=tmp_path,
                            capture_output=True, env={**os.environ, **env}, timeout=120)
    assert status.returncode in (0, 1), status.stderr
    doc = json.loads(status.stdout)
    shown = [j for j in doc["journals"] if "\\xff\\xfe" in j["path"]]
    assert shown and all(j["lag_bytes"] == 0 for j in shown), doc["journals"]
    rejects = subprocess.run([sys.executable, "-m", "evtool", "rejects", "--json"], cwd=tmp_path,
                             capture_output=True, env={**os.environ, **env}, timeout=120)
    assert rejects.returncode == 0, rejects.stderr
    assert b"\\\\xff\\\\xfe" in rejects.stdout  # shown escaped, as status shows it
