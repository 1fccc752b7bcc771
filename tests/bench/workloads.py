"""Deterministic workloads, generated once into a cache dir and reused.

Plain files come from tests/gen_events.py (same arguments, same bytes). The processor's inputs
are *journals*: the plain file sent through the real `evtool send` -> `evtool serve`, so every
line carries the `eventId` (`<source>:<line>`) that a real journal has. Delete the cache dir to
regenerate (e.g. after a change to what `serve` writes).
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

from ..conftest import free_port
from .procs import PY, ROOT, child_env, evtool_cmd, run, serving

GEN_EVENTS = ROOT / "tests" / "gen_events.py"
DEFAULT_CACHE = ROOT / ".evtool" / "bench-cache"


@dataclass(frozen=True)
class Workload:
    """One generated file and what a correct run must end with."""

    path: Path
    events: int
    users: int
    seed: int

    @property
    def expected(self) -> dict:
        return json.loads(Path(f"{self.path}.expected.json").read_text())


@dataclass(frozen=True)
class Sizes:
    """Workload sizes, all derived from the base event count (1M; --quick 100k)."""

    events: int

    @property
    def many_users(self) -> int:
        return max(1000, self.events // 10)

    @property
    def small(self) -> int:
        return self.events // 10

    @property
    def bulk(self) -> int:
        return self.events // 5

    @property
    def single(self) -> int:
        return self.events // 50

    @property
    def big(self) -> int:
        """The big workload (issue 11): 10x the base events over as many users as base events."""
        return self.events * 10

    @property
    def big_users(self) -> int:
        return self.events

    def as_dict(self) -> dict[str, int]:
        return {"events": self.events, "many_users": self.many_users, "rss_small": self.small,
                "send_bulk": self.bulk, "send_single": self.single, "chain_files": CHAIN_FILES,
                "big": self.big, "big_users": self.big_users}


CHAIN_FILES = 10


class Cache:
    """Creates workloads on demand under `root`."""

    def __init__(self, root: Path = DEFAULT_CACHE) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def plain(self, n: int, users: int, seed: int) -> Workload:
        """A gen_events file: `{"userId", "name", "value"}` lines, no ids."""
        path = self.root / f"plain-n{n}-u{users}-s{seed}.jsonl"
        expected = Path(f"{path}.expected.json")
        if not expected.exists():
            tmp = path.with_suffix(".tmp")
            run([PY, str(GEN_EVENTS), str(tmp), str(n), "--users", str(users), "--seed", str(seed)]
                ).check("gen_events")
            tmp.rename(path)
            Path(f"{tmp}.expected.json").rename(expected)
        return Workload(path, n, users, seed)

    def plain_uuids(self, n: int, users: int, seed: int) -> Workload:
        """The plain file with an opaque client `eventId` (a UUID, seeded) on every line."""
        source = self.plain(n, users, seed)
        path = self.root / f"uuids-n{n}-u{users}-s{seed}.jsonl"
        expected = Path(f"{path}.expected.json")
        if not expected.exists():
            rng = random.Random(f"uuids-{seed}")
            tmp = path.with_suffix(".tmp")
            with open(source.path, "rb") as src, open(tmp, "wb") as dst:
                for line in src:
                    eid = uuid.UUID(int=rng.getrandbits(128), version=4)
                    dst.write(line.rstrip(b"\r\n")[:-1] + f', "eventId": "{eid}"}}\n'.encode())
            tmp.rename(path)
            shutil.copyfile(f"{source.path}.expected.json", expected)
        return Workload(path, n, users, seed)

    def journal(self, n: int, users: int, seed: int, uuids: bool = False) -> Workload:
        """The plain file as `evtool serve` journals it after `evtool send` (ids on every line).

        With `uuids`, the source lines carry opaque client ids, which serve keeps as they are;
        otherwise `evtool send` gives each line its structured `<source>:<line>` id.
        """
        source = self.plain_uuids(n, users, seed) if uuids else self.plain(n, users, seed)
        kind = "journal-uuids" if uuids else "journal"
        path = self.root / f"{kind}-n{n}-u{users}-s{seed}.jsonl"
        expected = Path(f"{path}.expected.json")
        if not expected.exists():
            work = Path(tempfile.mkdtemp(prefix="evtool-bench-gen-", dir=self.root))
            try:
                tmp = work / "journal.jsonl"
                env = child_env(EVTOOL_HOME=str(work / "home"))
                port = free_port()
                serve = evtool_cmd("serve", "--port", str(port), "--journal", str(tmp), "--fsync", "off")
                with serving(serve, port, env=env, cwd=work) as url:
                    sent = run(evtool_cmd("send", str(source.path), "--url", url, "--json"), env=env,
                               cwd=work).check("evtool send")
                if json.loads(sent.stdout)["sent"] != n:
                    raise RuntimeError(f"evtool send delivered {sent.stdout.strip()}, expected {n}")
                tmp.rename(path)
                shutil.copyfile(f"{source.path}.expected.json", expected)
            finally:
                shutil.rmtree(work, ignore_errors=True)
        return Workload(path, n, users, seed)

    def chain(self, sizes: Sizes, uuids: bool = False) -> list[Workload]:
        """CHAIN_FILES journals of `sizes.events` each over 1k users; the first is the cold 1k one.

        With `uuids`, every line carries an opaque client id (a digest row each in the processor).
        """
        seeds = [1] + [100 + i for i in range(2, CHAIN_FILES + 1)]
        return [self.journal(sizes.events, 1000, s, uuids) for s in seeds]
