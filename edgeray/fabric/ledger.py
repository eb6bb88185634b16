"""The ledger: one row per transfer the fabric performed, saved as Parquet.

Columns: op, group, src, dst, link_class, bytes (what went on the wire, after codecs), retransmitted_bytes,
modelled_s (the link model's time), measured_s (wall time the transfer took in this run), notice_s (the
link's one-way latency, which the bytes wait for gloo's ready notice when the receiver posts as the sender
sends; 0 for messages outside the fabric's transport).
"""

from __future__ import annotations

import os
import threading
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from edgeray.fabric.links import Transfer

SCHEMA = pa.schema(
    [
        ("op", pa.string()),
        ("group", pa.string()),
        ("src", pa.string()),
        ("dst", pa.string()),
        ("link_class", pa.string()),
        ("bytes", pa.int64()),
        ("retransmitted_bytes", pa.int64()),
        ("modelled_s", pa.float64()),
        ("measured_s", pa.float64()),
        ("notice_s", pa.float64()),
    ]
)


class Ledger:
    """Thread-safe list of transfer records; :meth:`merge` combines ledgers gathered from actors."""

    def __init__(self, rows: Iterable[dict[str, Any]] = ()) -> None:
        self._rows: list[dict[str, Any]] = list(rows)
        self._lock = threading.Lock()

    def record(
        self, op: str, group: str, transfer: Transfer, measured_s: float, *, notice_s: float = 0.0
    ) -> None:
        with self._lock:
            self._rows.append(
                {
                    "op": op,
                    "group": group,
                    "src": transfer.src,
                    "dst": transfer.dst,
                    "link_class": transfer.link_class.value,
                    "bytes": transfer.nbytes,
                    "retransmitted_bytes": transfer.retransmitted_bytes,
                    "modelled_s": transfer.seconds,
                    "measured_s": measured_s,
                    "notice_s": notice_s,
                }
            )

    def extend(self, rows: Iterable[dict[str, Any]]) -> None:
        with self._lock:
            self._rows.extend(rows)

    def rows(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._rows)

    def clear(self) -> None:
        with self._lock:
            self._rows.clear()

    @staticmethod
    def merge(parts: Iterable[Iterable[dict[str, Any]]]) -> Ledger:
        return Ledger(row for part in parts for row in part)

    def bytes_by_class(self, op: str | None = None) -> dict[str, int]:
        """Total wire bytes per link class (optionally for one op)."""
        out: dict[str, int] = defaultdict(int)
        for row in self.rows():
            if op is None or row["op"] == op:
                out[row["link_class"]] += row["bytes"]
        return dict(out)

    def to_table(self) -> pa.Table:
        return pa.Table.from_pylist(self.rows(), schema=SCHEMA)

    def save(self, path: str | Path) -> Path:
        """Write Parquet atomically (temp file + rename); returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        pq.write_table(self.to_table(), tmp)
        os.replace(tmp, path)
        return path


def modelled_critical_path(ledgers: Iterable[Iterable[dict[str, Any]]]) -> float:
    """Modelled seconds of one collective from each participant's ledger rows: the sum over (op, step) of
    the slowest participant's transfer, its ready notice included (participants send in parallel within a
    step, each receiver posting as it sends, as a ring step does: edgeray.fabric.links.departure)."""
    steps: dict[tuple[str, int], float] = defaultdict(float)
    for rows in ledgers:
        seen: dict[str, int] = defaultdict(int)
        for row in rows:
            key = (row["op"], seen[row["op"]])
            seen[row["op"]] += 1
            steps[key] = max(steps[key], row.get("notice_s", 0.0) + row["modelled_s"])
    return sum(steps.values())
