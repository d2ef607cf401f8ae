"""Launch tuning: which NVRAR launch (width; one-shot or not on one node; LL cells or bulk), and
whether NVRAR at all, per message size.

`jaxnvrar-bench tune` measures, once per (GPU kind, topology, dtype), psum and the kernel at
several launches (thread blocks; bulk; on one node one-shot) for each size bucket, checks each
launch's result against psum, and writes the winners to a JSON
file ($JAXNVRAR_TUNING_FILE, default ~/.cache/jaxnvrar/tuning.json). `jaxnvrar.initialize()`
loads it on process 0 and shares it through jax.distributed, so every rank lowers the same
choices (ranks that disagreed on nvrar-vs-psum would deadlock). Then:

- `"auto"` takes the measured winner of the message's size bucket;
- the kernel launches as the bucket's best launch did.

Without a table entry, the documented heuristic applies (`api.choose_algorithm`): on one node
NVRAR up to `api.AUTO_NVRAR_MAX_BYTES` (the 2 x H200 crossover, $JAXNVRAR_AUTO_MAX_BYTES), across
nodes the cost model's projection; 128 blocks ($JAXNVRAR_MAX_BLOCKS), the full schedule
and LL cells ($JAXNVRAR_ONE_SHOT=1, $JAXNVRAR_BULK=1 to change). An explicit setting wins over the
table.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib

from jaxnvrar.runtime import Launch
from jaxnvrar.schedule import Topology

TUNING_FILE_ENV = "JAXNVRAR_TUNING_FILE"
FORMAT_VERSION = 1
_KV_KEY = "jaxnvrar/tuning_table"


def default_path() -> pathlib.Path:
    return pathlib.Path(os.environ.get(TUNING_FILE_ENV, pathlib.Path.home() / ".cache" / "jaxnvrar" / "tuning.json"))


def bucket_of(nbytes: int) -> int:
    """The size bucket of a message: the next power of two of its bytes (at least 1 KB)."""
    bucket = 1024
    while bucket < nbytes:
        bucket *= 2
    return bucket


def entry_key(device_kind: str, topology: Topology, dtype_name: str) -> str:
    return f"{device_kind}|{topology.num_nodes}x{topology.gpus_per_node}|{dtype_name}"


@dataclasses.dataclass(frozen=True)
class Choice:
    algorithm: str    # "nvrar" or "psum": the faster one measured for this bucket
    launch: Launch    # the kernel's fastest launch for this bucket


class Table:
    """Measured choices: entries[key][bucket] = {"algorithm", "max_blocks", "one_shot", "bulk",
    "nvrar_us", "psum_us", "nvrar_us_by_launch"}."""

    def __init__(self, entries: dict | None = None):
        self.entries = entries or {}

    def record(self, key: str, nbytes: int, *, psum_us: float, nvrar_us_by_launch: dict) -> Choice:
        """Keep the faster of psum and the fastest launch (keys: `runtime.Launch`)."""
        launch, nvrar_us = min(nvrar_us_by_launch.items(), key=lambda item: item[1])
        algorithm = "nvrar" if nvrar_us < psum_us else "psum"
        self.entries.setdefault(key, {})[str(bucket_of(nbytes))] = {
            "algorithm": algorithm, "max_blocks": launch.max_blocks, "one_shot": launch.one_shot,
            "bulk": launch.bulk,
            "nvrar_us": nvrar_us, "psum_us": psum_us,
            "nvrar_us_by_launch": {l.label: t for l, t in sorted(nvrar_us_by_launch.items(),
                                                                 key=lambda item: item[0].label)}}
        return Choice(algorithm, launch)

    def lookup(self, key: str, nbytes: int) -> Choice | None:
        """The choice measured for this message's bucket; past the largest bucket measured, that
        one's (large messages behave alike); below the smallest, the smallest's."""
        buckets = self.entries.get(key)
        if not buckets:
            return None
        measured = sorted(int(b) for b in buckets)
        wanted = bucket_of(nbytes)
        bucket = next((b for b in measured if b >= wanted), measured[-1])
        e = buckets[str(bucket)]
        return Choice(e["algorithm"], Launch(int(e["max_blocks"]), bool(e.get("one_shot", False)), bool(e.get("bulk", False))))

    def to_json(self) -> str:
        return json.dumps({"version": FORMAT_VERSION, "entries": self.entries}, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str = "tuning table") -> Table:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{source} is not valid JSON ({err}); delete it or run jaxnvrar-bench tune again") from None
        if not isinstance(data, dict) or data.get("version") != FORMAT_VERSION:
            raise ValueError(f"{source} has format version {data.get('version') if isinstance(data, dict) else None}, "
                             f"expected {FORMAT_VERSION}; run jaxnvrar-bench tune again")
        return cls(data["entries"])

    def save(self, path: pathlib.Path | None = None) -> pathlib.Path:
        path = pathlib.Path(path or default_path())
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(self.to_json())
        tmp.replace(path)  # atomic: a concurrent reader sees the old or the new table
        return path

    @classmethod
    def load(cls, path: pathlib.Path | None = None) -> Table:
        path = pathlib.Path(path or default_path())
        if not path.exists():
            return cls()
        return cls.from_json(path.read_text(), str(path))


_active = Table()


def active() -> Table:
    return _active


def use(table: Table) -> None:
    global _active
    _active = table


def load_shared() -> Table:
    """Process 0's table, the same on every process (called by `jaxnvrar.initialize()`)."""
    import jax

    if jax.process_count() == 1:
        table = Table.load()
    else:
        from jaxnvrar.runtime import _KV_TIMEOUT_MS, _distributed_client

        client = _distributed_client()
        if jax.process_index() == 0:
            table = Table.load()
            client.key_value_set(_KV_KEY, table.to_json())
        else:
            table = Table.from_json(client.blocking_key_value_get(_KV_KEY, _KV_TIMEOUT_MS), "process 0's tuning table")
    use(table)
    return table


def choice_for(topology: Topology, dtype_name: str, nbytes: int) -> Choice | None:
    import jax

    kind = jax.devices()[0].device_kind
    return _active.lookup(entry_key(kind, topology, dtype_name), nbytes)
