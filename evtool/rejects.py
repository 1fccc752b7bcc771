"""`evtool rejects --reapply`: apply rejected lines that the current rules accept, exactly once.

Each batch is one transaction that first locks the journal's progress row (`FOR UPDATE`), so it
serializes with `evtool process` on that journal and with another reapply. A line that is now
valid is applied under the same identity rules as the processor (design section 3):

- a sender id `<16 hex>:<line>`: the source's applied line ranges (locked, checked, extended);
- any other client id: its digest in applied_events;
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
            batch_rows: int = BATCH_ROWS) -> ReapplyReport:
    """Re-validate pending rejected lines (optionally filtered) and apply those now valid."""
    report = ReapplyReport()
    conds, params = reject_filter(reason, path)
    where = " AND ".join(conds)
    with store.transaction():
        fingerprints = store.rejected_fingerprints(where, params)
    for fp in fingerprints:
        after = -1
        while True:
            with store.transaction():
                after = _batch(store, fp, after, where, params, strict, batch_rows, report)
            if after is None:
                break
    return report


def _batch(store: Store, fp: bytes, after: int, where: str, params: list[Any], strict: bool,
           limit: int, report: ReapplyReport) -> int | None:
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
            ev = events.parse_line(bytes(raw), allow_reserved=True, strict=strict)
        except InvalidEvent as exc:
            report.still_invalid += 1
            if exc.reason != old_reason:
                new_reasons.append((exc.reason, fp, offset))
            continue
        valid.append((offset, line_no, path, ev))

    # Decide each valid line's identity, then claim it: the processor's rules (see identity).
    keys: list[tuple[str, int] | bytes] = []  # (source, line) or a digest
    for offset, _, _, ev in valid:
        kind, m = identity.classify(ev.event_id)
        if m is not None:
            keys.append((m[1], int(m[2])))
        elif kind is identity.Kind.POSITION:
            keys.append(identity.position_digest(fp, offset))
        else:
            keys.append(identity.event_digest(ev.event_id))
    claim = identity.Claim(store, {k[0] for k in keys if isinstance(k, tuple)})
    claimed = iter(claim.digests([k for k in keys if isinstance(k, bytes)]))
    sums: parser.Sums = {}
    outcomes: list[tuple[str, bytes, int]] = []
    for (offset, line_no, path, ev), key in zip(valid, keys, strict=True):
        fresh = claim.line(*key) if isinstance(key, tuple) else next(claimed)
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
    store.add_to_totals(copy_rows(sums))
    claim.record()
    store.mark_reapplied(fp, outcomes, new_reasons)
    report.reasons_updated += len(new_reasons)
    return rows[-1][0]
