"""A declared mapping: how a client's own event shape becomes an event (README "Inputs of any shape").

A small TOML file, given to `send`, `serve` and `process` alike (`--mapping FILE`, or
EVTOOL_MAPPING), names where each part of an event comes from, and which of the client's event
names mean `add_revenue` and `subtract_revenue`:

    [fields]
    user  = ["client_id", "customer.id"]   # dotted paths reach into nested objects
    name  = "type"
    value = ["amount", "payload.amount"]
    time  = "at"
    id    = "txn_id"

    [names]
    add_revenue      = ["purchase", "order"]
    subtract_revenue = "refund"

Each part has candidates: the mapped paths, then the built-in fields (`userId` and, unless
strict, `user_id`; `name`; `value`; the event-time fields of eventtime; `eventId`). Candidates
that are present must agree (times: name the same instant), else the event is rejected as
ambiguous, naming the two fields. An id field whose value is null counts as absent, as
`"eventId": null` always has. The journal keeps the client's text: a mapping is applied where
a line is read (`view`), never written back.

A mapping that only renames top-level fields is also compiled into a few dictionary lookups
(`Mapping.accessor`), so the processor's parse loop pays little for it.
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

from . import eventtime
from .errors import ConfigError, InvalidEvent

PARTS = ("user", "name", "value", "time", "id")
# The view's keys: the common shape events.validate reads.
KEYS = {"user": "userId", "name": "name", "value": "value", "time": eventtime.STAMP_FIELD, "id": "eventId"}
NAMES = ("add_revenue", "subtract_revenue")
MAX_PATHS = 16  # candidates a part may name: a mapping is small
_MISSING = object()
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS_FROM = int(eventtime.MS_FROM)  # epoch integers from here on are milliseconds
_MS_MAX = 253402300799001  # after 9999-12-31T23:59:59Z in epoch milliseconds: eventtime's error

Path_ = tuple[str, ...]


class MappingError(ConfigError):
    """A mapping file that cannot be used, with the reason (one line)."""


def builtins(strict: bool) -> dict[str, tuple[str, ...]]:
    """The built-in candidates of each part (the documented aliases), after the mapped ones."""
    return {"user": ("userId",) if strict else ("userId", "user_id"), "name": ("name",),
            "value": ("value",), "time": eventtime.FIELDS, "id": ("eventId",)}


@dataclass(frozen=True)
class Mapping:
    """A loaded mapping: mapped paths per part, source names per event name, its digest.

    Picklable (the processor's workers receive it); `digest` names it in the database.
    """

    paths: dict[str, tuple[Path_, ...]]
    names: dict[str, str]  # source name -> add_revenue | subtract_revenue
    digest: str
    source: str = ""  # the file it came from, for messages and status
    _views: dict = field(default_factory=dict, compare=False, repr=False)

    def __getstate__(self) -> dict:
        return {"paths": self.paths, "names": self.names, "digest": self.digest, "source": self.source}

    def __setstate__(self, state: dict) -> None:
        for k, v in state.items():
            object.__setattr__(self, k, v)
        object.__setattr__(self, "_views", {})

    @property
    def label(self) -> str:
        """How status shows it: digest and file name."""
        return f"{self.digest} ({Path(self.source).name})" if self.source else self.digest

    def candidates(self, strict: bool) -> list[tuple[str, tuple[tuple[Path_, str], ...]]]:
        """(part, ((path, its text), ...)) for every part: mapped paths first, then the built-ins."""
        out = []
        for part, builtin in builtins(strict).items():
            seen: dict[Path_, str] = {}
            for p in (*self.paths.get(part, ()), *((b,) for b in builtin)):
                seen.setdefault(p, ".".join(p))
            out.append((part, tuple(seen.items())))
        return out

    def view(self, obj: object, raw: bytes | str | None = None, strict: bool = False) -> dict:
        """The event `obj` stands for under this mapping, in the common shape (userId, name,
        value, and eventId / timestamp when given); InvalidEvent with the reason when it is none.

        `raw` is the JSON text of `obj`, read again only for a fractional amount (exactly, as
        Decimal). A time from any other field than a canonical `timestamp` is parsed here, so a
        bad one is reported under the field's own name, and written as canonical UTC text.
        """
        if not isinstance(obj, dict):
            raise InvalidEvent("an event must be a JSON object")
        out: dict = {}
        exact: list = []  # the text parsed with exact decimals, once, when needed
        for part, cands in self._candidates(strict):
            found: object = _MISSING
            src = ""
            times: list[tuple[str, object]] = []
            for path, text in cands:
                v = _get(obj, path)
                if v is _MISSING or (v is None and part == "id"):
                    continue
                if part == "time":
                    times.append((text, v))
                    continue
                if part == "name" and type(v) is str:
                    v = self.names.get(v, v)
                elif part == "value" and type(v) is float:
                    v = _exact(raw, path, exact)
                if found is _MISSING:
                    found, src = v, text
                elif type(v) is not type(found) or v != found:
                    raise InvalidEvent(f"ambiguous {part}: {src} and {text} are both given and differ")
            if part == "time":
                if times:
                    out[KEYS[part]] = _time(times)
                continue
            if found is _MISSING:
                if part == "id":
                    continue
                shown = ", ".join(t for _, t in cands)
                raise InvalidEvent(f"no {part} field: the event has none of {shown} (mapping {self.label})")
            if part == "name" and found not in NAMES and self.names:
                raise InvalidEvent(
                    f"name {json.dumps(found)[:60]} (from {src}) is not add_revenue, subtract_revenue "
                    f"or a name the mapping gives ({', '.join(sorted(self.names))})")
            out[KEYS[part]] = found
        return out

    def _candidates(self, strict: bool):
        got = self._views.get(strict)
        if got is None:
            got = self._views[strict] = self.candidates(strict)
        return got

    def accessor(self, strict: bool) -> Callable[[object], dict | None]:
        """A fast `view` for the parse loop: the view of a dict, or None when the line needs the
        full `view` (a reject, an ambiguity, a fractional amount, a time to parse...).

        Compiled from the candidates into one function of dictionary lookups (cached per
        process), so a mapping that renames top-level fields costs a few lookups per line.
        """
        key = ("accessor", strict)
        got = self._views.get(key)
        if got is None:
            got = self._views[key] = _compile(self, strict)
        return got


    def float_values(self, obj: dict, strict: bool) -> list[Path_]:
        """The paths of the value candidates present in `obj` as floats (orjson's reading of a
        fractional number, which only the JSON text gives exactly)."""
        cands = dict(self._candidates(strict))["value"]
        return [p for p, _ in cands if type(_get(obj, p)) is float]

    def write_exact(self, obj: dict, value: object, strict: bool) -> None:
        """Put the exact `value` (events.value_fragment) where `obj` holds it as a float, so
        re-serialising `obj` keeps the amount's digits."""
        for path in self.float_values(obj, strict):
            at = obj
            for k in path[:-1]:
                at = at[k]
            at[path[-1]] = value


def _get(obj: dict, path: Path_) -> object:
    """The value at `path` (a tuple of keys), or _MISSING when any step is absent or not an object."""
    v: object = obj
    for k in path:
        if type(v) is not dict:
            return _MISSING
        v = v.get(k, _MISSING)  # type: ignore[union-attr]
        if v is _MISSING:
            return _MISSING
    return v


def _exact(raw: bytes | str | None, path: Path_, cache: list) -> Decimal:
    """The exact Decimal of the number at `path`, from the JSON text (orjson gave a float)."""
    if raw is None:
        raise InvalidEvent("value must be given as JSON text to be read exactly")
    if not cache:
        cache.append(json.loads(raw, parse_float=Decimal))
    v = _get(cache[0], path)
    assert isinstance(v, Decimal)
    return v


def _parse_time(v: object, src: str) -> datetime:
    """eventtime.parse, with a shortcut for epoch seconds or milliseconds given as JSON integers:
    the same arithmetic (one correctly rounded float of the seconds), without its Decimal."""
    if type(v) is int and 0 <= v < _MS_MAX:
        return _EPOCH + timedelta(seconds=v if v < _MS_FROM else v / 1000)
    return eventtime.parse(v, src)


def _time(times: list[tuple[str, object]]) -> str:
    """The canonical UTC text of the event time given by the present time candidates."""
    if len(times) == 1 and times[0][0] == eventtime.STAMP_FIELD and type(times[0][1]) is str:
        text = times[0][1]
        if eventtime.fast_minute({eventtime.STAMP_FIELD: text}):  # canonical already: as it is
            return text
    first = ""
    found = None
    for src, v in times:
        t = _parse_time(v, src)
        if found is None:
            found, first = t, src
        elif t != found:
            raise InvalidEvent(f"ambiguous time: {first} and {src} are both given and differ")
    assert found is not None
    frac = f".{found.microsecond:06d}" if found.microsecond else ""
    return (f"{found.year:04d}-{found.month:02d}-{found.day:02d}T{found.hour:02d}:{found.minute:02d}:"
            f"{found.second:02d}{frac}Z")


def _compile(m: Mapping, strict: bool) -> Callable[[object], dict | None]:
    """Generate the accessor: for each part, its candidates looked up in order, and the line
    sent to the full view whenever anything but the simple case shows (two candidates present,
    a nested path's first key, a time that does not parse)."""
    lines = ["def accessor(obj):", "    if type(obj) is not dict:", "        return None",
             "    get = obj.get", "    out = {}"]
    for part, cands in m.candidates(strict):
        key = KEYS[part]
        tops = [p for p, _ in cands if len(p) == 1]
        nested = [p for p, _ in cands if len(p) > 1]
        if part == "time":
            # one time field present: `timestamp` as it is (the parse loop reads the canonical
            # form), any other parsed here into it; two or more: the full view compares them
            if nested:
                lines.append("    if " + " or ".join(f"{p[0]!r} in obj" for p in nested) + ": return None")
            lines.append("    t = None")
            for p in tops:
                lines += [f"    w = get({p[0]!r}, MISSING)",
                          "    if w is not MISSING:",
                          "        if t is not None: return None",
                          f"        t = ({p[0]!r}, w)"]
            lines += ["    if t is not None:",
                      f"        if t[0] == {eventtime.STAMP_FIELD!r} and type(t[1]) is str:",
                      f"            out[{key!r}] = t[1]",
                      "        else:",
                      "            try:",
                      f"                out[{key!r}] = time_text([t])",
                      "            except InvalidEvent:",
                      "                return None"]
            continue
        if nested:  # a nested candidate's first key present: the full view decides
            lines.append("    if " + " or ".join(f"{p[0]!r} in obj" for p in nested) + ": return None")
        lines.append("    v = MISSING")
        for p in tops:
            lines += [f"    w = get({p[0]!r}, MISSING)",
                      "    if w is not MISSING" + (" and w is not None" if part == "id" else "") + ":",
                      "        if v is not MISSING: return None",
                      "        v = w"]
        if part == "name":
            lines.append("    if type(v) is str: v = names.get(v, v)")
        if part == "id":
            lines += ["    if v is not MISSING:", f"        out[{key!r}] = v"]
        else:
            lines += ["    if v is MISSING: return None", f"    out[{key!r}] = v"]
    lines.append("    return out")
    scope: dict = {"MISSING": _MISSING, "names": dict(m.names), "time_text": _time,
                   "InvalidEvent": InvalidEvent}
    exec(compile("\n".join(lines), f"<mapping {m.digest}>", "exec"), scope)  # noqa: S102 - our own text
    return scope["accessor"]


def _paths(where: str, value: object) -> tuple[Path_, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(isinstance(i, str) for i in items):
        raise MappingError(f"{where} must be a field path or a list of them (e.g. \"payload.amount\")")
    if len(items) > MAX_PATHS:
        raise MappingError(f"{where} names more than {MAX_PATHS} fields")
    out = []
    for text in items:
        path = tuple(text.split("."))
        if not all(path):
            raise MappingError(f"{where}: {text!r} is not a field path (names joined by single dots)")
        out.append(path)
    return tuple(dict.fromkeys(out))


def parse(text: str, source: str = "") -> Mapping:
    """A Mapping from the text of a mapping file; MappingError says what is wrong."""
    where = f"mapping {source}" if source else "mapping"
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise MappingError(f"{where} is not valid TOML: {exc}") from None
    unknown = sorted(set(doc) - {"fields", "names"})
    if unknown:
        raise MappingError(f"{where}: unknown table or key {unknown[0]!r} "
                           "(a mapping has [fields] and [names])")
    fields_ = doc.get("fields", {})
    names_ = doc.get("names", {})
    if not isinstance(fields_, dict) or not isinstance(names_, dict):
        raise MappingError(f"{where}: [fields] and [names] must be tables")
    bad = sorted(set(fields_) - set(PARTS))
    if bad:
        raise MappingError(f"{where}: unknown field {bad[0]!r} in [fields] (known: {', '.join(PARTS)})")
    bad = sorted(set(names_) - set(NAMES))
    if bad:
        raise MappingError(f"{where}: unknown name {bad[0]!r} in [names] (known: {', '.join(NAMES)})")
    if not fields_ and not names_:
        raise MappingError(f"{where} maps nothing: give a [fields] or [names] table")
    paths = {part: _paths(f"{where}: fields.{part}", v) for part, v in fields_.items()}
    names: dict[str, str] = {}
    for target in NAMES:
        if target not in names_:
            continue
        for p in _paths(f"{where}: names.{target}", names_[target]):
            src = ".".join(p)
            if src in NAMES and src != target:
                raise MappingError(f"{where}: {src!r} cannot mean {target}")
            if names.get(src, target) != target:
                raise MappingError(f"{where}: {src!r} is given for both add_revenue and subtract_revenue")
            names[src] = target
    # The digest is of the meaning, not the text: comments and order do not change it.
    canon = json.dumps({"fields": {k: [".".join(p) for p in v] for k, v in sorted(paths.items())},
                        "names": dict(sorted(names.items()))}, sort_keys=True)
    digest = hashlib.sha256(canon.encode()).hexdigest()[:12]
    return Mapping(paths, names, digest, source)


def load(path: str | Path) -> Mapping:
    """Read a mapping file; MappingError (one line) when it cannot be read or used."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MappingError(f"mapping file {path} does not exist") from None
    except IsADirectoryError:
        raise MappingError(f"mapping file {path} is a directory") from None
    except UnicodeDecodeError:
        raise MappingError(f"mapping file {path} is not UTF-8 text") from None
    except OSError as exc:
        raise MappingError(f"mapping file {path} cannot be read: {exc.strerror or exc}") from None
    return parse(text, str(path))
