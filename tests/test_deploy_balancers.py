"""deploy/haproxy.cfg and deploy/nginx.conf: load balancers in front of several receivers.

Checked by the programs themselves (`haproxy -c`, `nginx -t`) when installed, and against
evtool's own receiver: the health check asks a route `serve` answers without a token, and
nginx lets through a body as large as the receiver accepts (else bulks get 413 from nginx).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from evtool.receiver import ServeSettings, make_app

from .conftest import ROOT

HAPROXY = ROOT / "deploy" / "haproxy.cfg"
NGINX = ROOT / "deploy" / "nginx.conf"
SIZES = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def receiver_routes(tmp_path: Path) -> set[str]:
    app = make_app(ServeSettings(journal=tmp_path / "j.jsonl"))
    return {r.resource.canonical for r in app.router.routes() if r.method == "GET"}


def test_haproxy_checks_a_probe_route_of_every_receiver(tmp_path):
    text = HAPROXY.read_text()
    (path,) = re.findall(r"^\s*option httpchk GET (\S+)$", text, re.M)
    assert path in {"/healthz", "/readyz"} and path in receiver_routes(tmp_path), path
    servers = re.findall(r"^\s*server \S+ (\S+) check$", text, re.M)
    assert len(servers) >= 2, "a balancer in front of one receiver balances nothing"


def test_nginx_lets_through_the_largest_bulk_a_receiver_accepts(tmp_path):
    text = NGINX.read_text()
    (size,) = re.findall(r"^\s*client_max_body_size (\d+)([kmg]?);", text, re.M | re.I)
    allowed = int(size[0]) * SIZES[size[1].lower()]
    assert allowed >= ServeSettings(journal=tmp_path / "j.jsonl").max_body
    assert len(re.findall(r"^\s*server 127\.0\.0\.1:\d+", text, re.M)) >= 2


@pytest.mark.skipif(shutil.which("haproxy") is None,
                    reason="haproxy is not installed (apt-get install haproxy)")
def test_haproxy_accepts_the_configuration():
    checked = subprocess.run(["haproxy", "-c", "-f", str(HAPROXY)], capture_output=True, text=True,
                             timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr


@pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx is not installed (apt-get install nginx)")
def test_nginx_accepts_the_configuration(tmp_path):
    # -p: temp directories under tmp_path, so the check needs no system paths; -e: no error.log file.
    checked = subprocess.run(["nginx", "-t", "-c", str(NGINX), "-p", f"{tmp_path}/", "-e", "stderr"],
                             capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
