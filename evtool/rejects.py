"""`evtool rejects --reapply`: apply rejected lines that the current rules accept, exactly once.

Each batch is one transaction that first locks the journal's progress row (`FOR UPDATE`), so it
serializes with `evtool process` on that journal and with another reapply. A line that is now
valid is applied under the same identity rules as the processor (design section 3):

- a sender id `<16 hex>:<line>[:<chain>]`: the source's applied_lines cells (locked, checked, extended);
- any other client id: its digest in applied_events (the same id with other content stays rejected);
- no id, or a receiver-made `~` id: a digest of (journal fingerprint, byte offset) in
  applied_events, so a second reapply cannot apply the line again.

An event whose identity was already applied counts as a duplicate. Either way the reject row
is kept and marked (`reapplied_at`, `reapply_outcome`), and the journal's counters move from
rejected to applied/duplicates. Lines still invalid stay rejected, with their reason updated
when the rules now give another one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import events, eventtime, identity, parser
from .errors import InvalidEvent
from .mapping import Mapping
from .reports import reject_filter
from .store import Store, copy_rows

BATCH_ROWS = 1000


@dataclass
class ReapplyReport:
    applied: int = 0
    duplicates: int = 0
    still_invalid: int = 0
    reasons_updated: int = 0
    users: set[str] = field(default_factory=set)
    lines: list[tuple[str, int, str]] = field(default_factory=list)  # (path, line, outcome), first ones


MAX_LINES_KEPT = 50


def reapply(store: Store, *, reason: str | None = None, path: Path | None = None, strict: bool = False,
            batch_rows: int = BATCH_ROWS, mapping: Mapping | None = None) -> ReapplyReport:
    """Re-validate pending rejected lines (optionally filtered, and read under `mapping` when
    given: lines of a shape it declares) and apply those now valid."""
    report = ReapplyReport()
    conds, params = reject_filter(reason, path)
    where = " AND ".join(conds)
    with store.transaction():
        fingerprints = store.rejected_fingerprints(where, params)
    for fp in fingerprints:
        after = -1
        while True:
            with store.transaction():
                after = _batch(store, fp, after, where, params, strict, batch_rows, report, mapping)
            if after is None:
                break
    return report


def _batch(store: Store, fp: bytes, after: int, where: str, params: list[Any], strict: bool,
           limit: int, report: ReapplyReport, mapping: Mapping | None = None) -> int | None:
    """One transaction: up to `limit` pending rejects of journal `fp` after offset `after`.

    Returns the last offset handled, or None when there was nothing left.
    """
    rows = store.lock_rejects(fp, after, where, params, limit)
    if not rows:
        return None
    valid: list[tuple[int, int, str, events.Event]] = []  # offset, line, path, event
    new_reasons: list[tuple[str, bytes, int]] = []
    for offset, line_no, path, raw, old_reason in rows:
        try:
            if mapping is None:
                ev = events.parse_line(bytes(raw), allow_reserved=True, strict=strict)
            else:
                view = mapping.view(events.parse_json(bytes(raw)), bytes(raw), strict)
                ev = events.validate(view, allow_reserved=True, strict=strict)
        except InvalidEvent as exc:
            report.still_invalid += 1
            if exc.reason != old_reason:
                new_reasons.append((exc.reason, fp, offset))
            continue
        valid.append((offset, line_no, path, ev))

    # Decide each valid line's identity, then claim it: the processor's rules (see identity).
    keys: list[tuple[str, int, bytes] | bytes] = []  # (source, line, chain) or a digest
    for offset, _, _, ev in valid:
        kind, m = identity.classify(ev.event_id)
        if m is not None:
            keys.append((m[1], int(m[2]), identity.chain_of(m)))
        elif kind is identity.Kind.POSITION:
            keys.append(identity.position_digest(fp, offset))
        else:
            keys.append(identity.event_digest(ev.event_id))
    cells: dict[str, set[int]] = {}
    for k in keys:
        if isinstance(k, tuple):
            cells.setdefault(k[0], set()).add(identity.cell_of(k[1]))
    claim = identity.Claim(store, cells)
    opaque = [(k, identity.content_digest(ev.user_id, ev.name == "add_revenue", ev.value),
               (fp, line_no, path))
              for (_, line_no, path, ev), k in zip(valid, keys, strict=True) if isinstance(k, bytes)]
    claimed = iter(claim.digests([d for d, _, _ in opaque], [c for _, c, _ in opaque],
                                 [o for _, _, o in opaque]))
    sums: parser.Sums = {}
    outcomes: list[tuple[str, bytes, int]] = []
    for (offset, line_no, path, ev), key in zip(valid, keys, strict=True):
        fresh = claim.line(*key) if isinstance(key, tuple) else next(claimed)
        if fresh is None:  # its id names another event: it stays rejected, for the operator
            report.still_invalid += 1
            continue
        if fresh:
            parser.add(sums, (ev.user_id, eventtime.minute_key(ev.time)), ev.name == "add_revenue", ev.value)
            report.applied += 1
            report.users.add(ev.user_id)
        else:
            report.duplicates += 1
        outcome = "applied" if fresh else "duplicate"
        outcomes.append((outcome, fp, offset))
        if len(report.lines) < MAX_LINES_KEPT:
            report.lines.append((path, line_no, outcome))
    copied = copy_rows(sums)
    store.add_to_totals([copied], len(sums), len(copied))
    claim.record()
    store.mark_reapplied(fp, outcomes, new_reasons)
    report.reasons_updated += len(new_reasons)
    return rows[-1][0]
