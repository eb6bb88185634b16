"""A tamper-evident audit log: one JSON entry per line, each carrying the hash of the one before it.

    log = AuditLog(run_dir / "audit.jsonl")
    log.append(round=3, participants=[...], dropouts=[...], clip=1.0, noise_multiplier=1.1, epsilon=2.3, ...)
    problems = verify(run_dir)        # [] when intact; else one line per entry edited, removed or reordered

Entry k is ``{"seq": k, "prev": <hash of entry k-1>, ...fields, "hash": sha256(canonical JSON of the rest)}``
(the first entry's ``prev`` is 64 zeros). Canonical JSON: sorted keys, no spaces, UTF-8. Editing an entry breaks
its own hash; removing or reordering entries breaks the next entry's ``prev`` and the sequence numbers;
cutting entries off the end is caught by ``audit.head``, a second file holding the last entry's seq and hash.
Each append replaces the log, then the head, atomically (write, fsync, rename): a crash between the two
leaves the head one entry behind, which :func:`verify` reports and a resumed run's :class:`AuditLog`
repairs (the chain up to the extra entry is intact). The chain detects edits by anyone who does not
recompute it; against someone who rewrites the whole chain, compare the head hash with a copy kept elsewhere
(the run's summary and log print it). ``edgeray audit verify DIR`` runs :func:`verify`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from edgeray.atomic import write_atomic
from edgeray.errors import EdgerayError

GENESIS = "0" * 64
LOG_NAME = "audit.jsonl"
HEAD_NAME = "audit.head"


class AuditError(EdgerayError):
    """The audit log cannot be written or read."""


def _canonical(entry: dict[str, Any]) -> bytes:
    return json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def entry_hash(entry: dict[str, Any]) -> str:
    """The hash an entry carries: SHA-256 of its canonical JSON without the ``hash`` field."""
    return hashlib.sha256(_canonical({k: v for k, v in entry.items() if k != "hash"})).hexdigest()


def digest(obj: Any) -> str:
    """SHA-256 of ``obj``'s canonical JSON (a config), or of raw bytes: what entries record as a hash."""
    data = obj if isinstance(obj, bytes) else _canonical(obj)
    return hashlib.sha256(data).hexdigest()


class AuditLog:
    """Appends hash-chained entries to ``path`` (``audit.jsonl``) and keeps ``audit.head`` beside it."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.head_path = self.path.with_name(HEAD_NAME)
        self.entries: list[dict[str, Any]] = []
        if self.path.exists():
            problems = verify(self.path)
            entries = read_entries(self.path)
            if problems == [_behind(self.head_path, entries)]:  # an append interrupted before its head
                write_atomic(self.head_path, _head(entries[-1]))
                problems = []
            if problems:
                raise AuditError(f"audit: {self.path} fails verification, not appending to it: {problems[0]}")
            self.entries = entries

    def append(self, **fields: Any) -> dict[str, Any]:
        reserved = {"seq", "prev", "hash"} & set(fields)
        if reserved:
            raise AuditError(f"audit: fields {sorted(reserved)} are set by the log itself")
        prev = self.entries[-1]["hash"] if self.entries else GENESIS
        entry = {"seq": len(self.entries), "prev": prev, **fields}
        try:
            json.dumps(entry)
        except TypeError as exc:
            raise AuditError(f"audit: an entry must be JSON ({exc})") from None
        entry["hash"] = entry_hash(entry)
        lines = [_canonical(e).decode() for e in [*self.entries, entry]]
        write_atomic(self.path, "\n".join(lines) + "\n")
        write_atomic(self.head_path, _head(entry))
        self.entries.append(entry)
        return entry


def read_entries(path: str | Path) -> list[dict[str, Any]]:
    out = []
    for i, line in enumerate(Path(path).read_text().splitlines()):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise AuditError(f"audit: {path} line {i + 1} is not JSON ({exc.msg})") from None
    return out


def verify(run_dir: str | Path) -> list[str]:
    """Every problem found in ``run_dir``'s audit log, each naming the entry (by line and seq); [] if intact."""
    run_dir = Path(run_dir)
    path = run_dir / LOG_NAME if run_dir.is_dir() else run_dir
    if not path.exists():
        return [f"{path}: no audit log here"]
    try:
        entries = read_entries(path)
    except AuditError as exc:
        return [str(exc)]
    problems = []
    prev = GENESIS
    for line, e in enumerate(entries, start=1):
        seq = e.get("seq")
        where = f"line {line} (seq {seq})"
        if e.get("hash") != entry_hash(e):
            problems.append(f"{where}: edited (its hash does not match its contents)")
        if seq != line - 1:
            problems.append(f"{where}: out of place (expected seq {line - 1}: an entry before it was removed or "
                            "the entries were reordered)")  # fmt: skip
        if e.get("prev") != prev:
            problems.append(f"{where}: does not follow the entry before it (prev hash differs: an entry was "
                            "removed, inserted or reordered before it)")  # fmt: skip
        prev = e.get("hash", "")
    head_path = path.with_name(HEAD_NAME)
    if not head_path.exists():
        problems.append(f"{head_path}: missing (the log's last entry cannot be checked)")
    else:
        try:
            head = json.loads(head_path.read_text())
        except json.JSONDecodeError:
            head = {}
        last = entries[-1] if entries else {"seq": None, "hash": None}
        if head.get("seq") != last.get("seq") or head.get("hash") != last.get("hash"):
            behind = _behind(head_path, entries)
            if len(entries) >= 2 and head == {"seq": entries[-2]["seq"], "hash": entries[-2]["hash"]}:
                problems.append(behind)
            else:
                problems.append(
                    f"{head_path}: names seq {head.get('seq')} but the log ends at seq {last.get('seq')} "
                    "(entries were cut off the end, or the head was edited)"
                )
    return problems


def _head(entry: dict[str, Any]) -> str:
    return json.dumps({"seq": entry["seq"], "hash": entry["hash"]}) + "\n"


def _behind(head_path: Path, entries: list[dict[str, Any]]) -> str:
    last = entries[-1].get("seq") if entries else None
    return (
        f"{head_path}: one entry behind the log (seq {last} is past it): an append was interrupted before "
        "its head was written, or an entry was added by someone else"
    )
