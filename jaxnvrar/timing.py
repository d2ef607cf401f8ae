"""Where the kernel's time goes, call by call (JAXNVRAR_TIMING=1).

With the setting on, every kernel call leaves globaltimer stamps (ns) in a ring of
`RECORDS` records on its GPU (csrc/device_common.cuh, TimingField): block 0's entry, the end of
its first phase's sends, the moment it holds its reduced units (waiting for the peers' data
included), the end of the all-reduce, the end of the fused norm, and the end of the grid's last
block. `jaxnvrar.runtime.timing_records()` reads them back (`reset_timing()` clears them);
`summary()` turns them into medians per call, so that a
call's time splits into: its own sends, waiting for peers + the transfer, the all-gather, the
fused epilogue, the rest of the grid, and the gap from the previous call's end (other kernels
in a decode step; launch overhead in a chain of all-reduces).
"""

from __future__ import annotations

import numpy as np

RECORDS = 4096  # csrc/nvshmem_runtime.h kTimingRecords
FIELDS = ("call", "entry", "sent", "reduced", "all_reduced", "normed", "last_block", "shape")

# (name in the report, from field, to field)
PHASES = (
    ("own sends", "entry", "sent"),
    ("wait for peers + transfer", "sent", "reduced"),
    ("all-gather", "reduced", "all_reduced"),
    ("fused add + norm", "all_reduced", "normed"),
    ("rest of the grid", "normed", "last_block"),
    ("kernel, entry to last block", "entry", "last_block"),
)


def parse(raw: bytes) -> np.ndarray:
    """The ring's bytes as a structured array of the calls it holds, in call order."""
    words = np.frombuffer(raw, dtype="<u8")
    if words.size % len(FIELDS):
        raise ValueError(f"timing records: {words.size} words is not a whole number of {len(FIELDS)}-word records")
    table = words.reshape(-1, len(FIELDS))
    table = table[table[:, 0] != 0]
    table = table[np.argsort(table[:, 0], kind="stable")]
    return np.rec.fromarrays(table.T, names=list(FIELDS)) if table.size else np.rec.fromarrays(
        [np.zeros(0, np.uint64)] * len(FIELDS), names=list(FIELDS))


def summary(records: np.ndarray) -> dict:
    """Median microseconds per call of each phase (PHASES), of the gap between consecutive calls
    (previous last block to next entry), the blocks and elements seen, and the calls made:
    "calls" from the call counter (first to last record), "recorded" how many records the
    medians use (the ring keeps the last RECORDS)."""
    if not len(records):
        return {"calls": 0}
    out = {"calls": int(records["call"][-1] - records["call"][0]) + 1, "recorded": int(len(records))}
    for name, start, end in PHASES:
        span = records[end].astype(np.int64) - records[start].astype(np.int64)
        out[name] = float(np.median(span)) / 1e3
    consecutive = np.diff(records["call"].astype(np.int64)) == 1
    if consecutive.any():
        gaps = records["entry"][1:].astype(np.int64) - records["last_block"][:-1].astype(np.int64)
        out["gap from the previous call"] = float(np.median(gaps[consecutive])) / 1e3
    out["blocks"] = sorted({int(s) >> 32 for s in records["shape"]})
    out["elements"] = sorted({int(s) & 0xFFFFFFFF for s in records["shape"]})
    return out


def format_summary(label: str, stats: dict) -> str:
    if not stats.get("calls"):
        return f"  {label}: no kernel calls recorded"
    parts = [f"{name} {stats[name]:.2f}" for name, _, _ in PHASES if name in stats]
    if "gap from the previous call" in stats:
        parts.append(f"gap from the previous call {stats['gap from the previous call']:.2f}")
    kept = "" if stats["recorded"] == stats["calls"] else f" (medians of the last {stats['recorded']})"
    return (f"  {label}: {stats['calls']} calls{kept}, {stats['blocks']} blocks; median us per call: "
            + ", ".join(parts))
