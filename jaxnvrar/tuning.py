"""The policy per call: which algorithm "auto" runs, and which kernel configuration (width;
one-shot or not on one node; LL cells or bulk) the kernel runs, per message size.

`jaxnvrar-bench tune` measures, once per (GPU kind, topology, dtype), psum and the kernel at
several kernel configurations (thread blocks; bulk; on one node one-shot) for each size bucket,
checks each one's result against psum, and writes the winners to a JSON
file ($JAXNVRAR_TUNING_FILE, default ~/.cache/jaxnvrar/tuning.json). `jaxnvrar.initialize()`
loads it on process 0 and shares it through jax.distributed, so every rank lowers the same
choices (ranks that disagreed on nvrar-vs-psum would deadlock). Then:

- `"auto"` takes the measured winner of the message's size bucket;
- the kernel runs the bucket's best configuration.

Without a table entry, the built-in table shipped for the GPU kind applies
(jaxnvrar/defaults/tuning.json, measured on 2 x H200), and without that the documented
heuristic (`choose_algorithm`): on one node NVRAR up to `AUTO_NVRAR_MAX_BYTES`
($JAXNVRAR_AUTO_MAX_BYTES), across nodes the cost model's projection; 128 blocks ($JAXNVRAR_MAX_BLOCKS), the full schedule
and LL cells ($JAXNVRAR_ONE_SHOT=1, $JAXNVRAR_BULK=1 to change). An explicit setting wins over the
table, and `set_max_blocks` / `kernel_config_override` win over the settings.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp

from jaxnvrar import cost_model, distributed, runtime, settings
from jaxnvrar.schedule import DENSE_REGION_BYTES, MAX_BLOCKS_LIMIT, KernelConfig, Topology

TUNING_FILE_ENV = "JAXNVRAR_TUNING_FILE"
FORMAT_VERSION = 1
_KV_KEY = "jaxnvrar/tuning_table"


def default_path() -> pathlib.Path:
    """The tuning file: as read at initialize() once the runtime is up, else from
    $JAXNVRAR_TUNING_FILE now; ~/.cache/jaxnvrar/tuning.json without either."""
    snapshot = runtime.settings()
    chosen = snapshot.tuning_file if snapshot is not None else settings.get(TUNING_FILE_ENV)
    return pathlib.Path(chosen or pathlib.Path.home() / ".cache" / "jaxnvrar" / "tuning.json")


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
    config: KernelConfig  # the kernel's fastest configuration for this bucket


class Table:
    """Measured choices: entries[key][bucket] = {"algorithm", "max_blocks", "one_shot", "bulk",
    "dense", "pull", "nvrar_us", "psum_us", "nvrar_us_by_launch"} (a missing "dense", "pull" or
    "one_shot" is False: tables from before them)."""

    def __init__(self, entries: dict | None = None):
        self.entries = entries or {}

    def record(self, key: str, nbytes: int, *, psum_us: float, nvrar_us_by_config: dict) -> Choice:
        """Keep the faster of psum and the fastest kernel configuration (keys: `KernelConfig`)."""
        config, nvrar_us = min(nvrar_us_by_config.items(), key=lambda item: item[1])
        algorithm = "nvrar" if nvrar_us < psum_us else "psum"
        # "nvrar_us_by_launch": the file format's name, kept so that older tables still load.
        self.entries.setdefault(key, {})[str(bucket_of(nbytes))] = {
            "algorithm": algorithm, "max_blocks": config.max_blocks, "one_shot": config.one_shot,
            "bulk": config.bulk, "dense": config.dense, "pull": config.pull,
            "nvrar_us": nvrar_us, "psum_us": psum_us,
            "nvrar_us_by_launch": {c.label: t for c, t in sorted(nvrar_us_by_config.items(),
                                                                 key=lambda item: item[0].label)}}
        return Choice(algorithm, config)

    def lookup(self, key: str, nbytes: int, *, dense: bool = True) -> Choice | None:
        """The choice measured for this message's bucket; past the largest bucket measured, that
        one's (large messages behave alike); below the smallest, the smallest's. With
        `dense=False` (no dense inboxes in this process) the fastest of the other measured
        configurations, against psum again."""
        buckets = self.entries.get(key)
        if not buckets:
            return None
        measured = sorted(int(b) for b in buckets)
        wanted = bucket_of(nbytes)
        bucket = next((b for b in measured if b >= wanted), measured[-1])
        e = buckets[str(bucket)]
        if e.get("dense") and not dense:
            others = {label: us for label, us in e.get("nvrar_us_by_launch", {}).items()
                      if not KernelConfig.parse(label).dense}
            if not others:  # nothing else measured: the same width and shot, as bulk
                return Choice(e["algorithm"], KernelConfig(int(e["max_blocks"]), bool(e.get("one_shot", False)), True))
            label, nvrar_us = min(others.items(), key=lambda item: item[1])
            return Choice("nvrar" if nvrar_us < e["psum_us"] else "psum", KernelConfig.parse(label))
        return Choice(e["algorithm"], KernelConfig(int(e["max_blocks"]), bool(e.get("one_shot", False)),
                                                   bool(e.get("bulk", False)), bool(e.get("dense", False)),
                                                   bool(e.get("pull", False))))

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
    if jax.process_count() == 1:
        table = Table.load()
    else:
        client = distributed.kv_client()
        if jax.process_index() == 0:
            try:
                table = Table.load()
            except ValueError as err:  # the others hear why at once, not after the store's timeout
                client.key_value_set(_KV_KEY, json.dumps({"load_error": str(err)}))
                raise
            client.key_value_set(_KV_KEY, table.to_json())
        else:
            text = client.blocking_key_value_get(_KV_KEY, distributed.KV_TIMEOUT_MS)
            failure = json.loads(text).get("load_error")
            if failure is not None:
                raise ValueError(f"process 0 could not load the tuning table every process uses: {failure}")
            table = Table.from_json(text, "process 0's tuning table")
    use(table)
    return table


# Choices shipped with the package, measured on the GPU kinds at hand (the file names its
# source): what a user who never runs `tune` gets. Measured with bfloat16; applied by message
# bytes to every dtype.
BUILTIN_PATH = pathlib.Path(__file__).with_name("defaults") / "tuning.json"
_BUILTIN_DTYPE = "bfloat16"
_builtin: Table | None = None


def builtin() -> Table:
    global _builtin
    if _builtin is None:
        _builtin = Table.from_json(BUILTIN_PATH.read_text(), str(BUILTIN_PATH))
    return _builtin


def tuned_choice(topology: Topology, dtype_name: str, nbytes: int) -> Choice | None:
    """The tuning table's choice for this call (`jaxnvrar-bench tune`), else None."""
    return _active.lookup(entry_key(jax.devices()[0].device_kind, topology, dtype_name), nbytes, dense=dense_inboxes())


def builtin_choice(topology: Topology, nbytes: int) -> Choice | None:
    """The built-in table's choice for this GPU kind and topology, else None."""
    return builtin().lookup(entry_key(jax.devices()[0].device_kind, topology, _BUILTIN_DTYPE), nbytes,
                            dense=dense_inboxes())


def choice_for(topology: Topology, dtype_name: str, nbytes: int) -> Choice | None:
    """The measured choice for this call: the tuning table's, else the built-in one."""
    return tuned_choice(topology, dtype_name, nbytes) or builtin_choice(topology, nbytes)


# ---------------------------------------------------------------- the algorithm "auto" runs

# Measured crossover on 2 x H200 (docs/results/allreduce_2xH200_2026-11-23.txt): the kernel
# wins up to 4 MB (1.10x there) and loses to psum from 8 MB on. Override with
# $JAXNVRAR_AUTO_MAX_BYTES.
AUTO_NVRAR_MAX_BYTES = 4 << 20


def choose_algorithm(num_elements: int, dtype, topology: Topology) -> str:
    """What algorithm="auto" runs. "nvrar" needs the CUDA runtime up and the message to fit the
    workspace; then the measured winner for the message's size bucket decides (the tuning table
    of `jaxnvrar-bench tune`, else, unless $JAXNVRAR_AUTO_MAX_BYTES is set, the built-in table
    for this GPU kind), or without one: on one
    node, "nvrar" up to AUTO_NVRAR_MAX_BYTES ($JAXNVRAR_AUTO_MAX_BYTES); across nodes, the cost
    model's projection. Otherwise "psum"."""
    dtype = jnp.dtype(dtype)
    nbytes = num_elements * dtype.itemsize
    if not (runtime.is_initialized() and jax.default_backend() == "gpu"
            and runtime.fits_workspace(num_elements, dtype.itemsize, topology)):
        return "psum"
    # The user's own measurements, then the user's explicit limit, then the built-in table.
    snapshot = runtime.settings()
    choice = tuned_choice(topology, dtype.name, nbytes)
    if choice is None and snapshot.auto_max_bytes is None:
        choice = builtin_choice(topology, nbytes)
    if choice is not None:
        return choice.algorithm
    if snapshot.auto_max_bytes is not None or topology.num_nodes == 1:
        limit = AUTO_NVRAR_MAX_BYTES if snapshot.auto_max_bytes is None else snapshot.auto_max_bytes
        return "nvrar" if nbytes <= limit else "psum"
    # Several nodes, not measured: the cost model's projection of the NCCL-like baseline
    # against NVRAR (network preset $JAXNVRAR_NETWORK, default InfiniBand NDR).
    faster = cost_model.nvrar_predicted_faster(nbytes, topology.num_nodes, topology.gpus_per_node, snapshot.network)
    return "nvrar" if faster else "psum"


# ---------------------------------------------------------------- the kernel configuration

# Set by set_max_blocks / kernel_config_override, over the settings: field -> value (None: the
# tuning table's choice).
_overrides: dict = {}


def _explicit() -> dict:
    snapshot = runtime.settings()
    if snapshot is None:
        return {"max_blocks": None, "one_shot": None, "bulk": None, "dense": None, "pull": None}
    as_bool = lambda value: None if value is None else bool(value)  # noqa: E731
    return {"max_blocks": snapshot.max_blocks, "one_shot": as_bool(snapshot.one_shot),
            "bulk": as_bool(snapshot.bulk), "dense": None, "pull": None, **_overrides}


def kernel_config_for(topology: Topology, dtype_name: str, num_elements: int, itemsize: int) -> KernelConfig:
    """The kernel configuration of a call lowered now. Each field: the explicit setting
    ($JAXNVRAR_MAX_BLOCKS, $JAXNVRAR_ONE_SHOT, $JAXNVRAR_BULK, `kernel_config_override`,
    `set_max_blocks`), else the tuning table's, else 128 blocks, LL cells and the full schedule.
    One-shot only where possible (one node); both only where the workspace holds them, else the
    default configuration, which computes the same bits."""
    explicit = _explicit()
    measured = KernelConfig()
    if None in explicit.values():
        choice = choice_for(topology, dtype_name, num_elements * itemsize)
        measured = choice.config if choice else measured
    fields = {field: measured_value if explicit[field] is None else explicit[field]
              for field, measured_value in dataclasses.asdict(measured).items()}
    # Dense is a kind of bulk: an explicit JAXNVRAR_BULK=0 ends it. (Without the dense inboxes
    # the table's lookup already chose among the other configurations.)
    fields["dense"] = fields["dense"] and fields["bulk"] and dense_inboxes()
    fields["pull"] = fields["pull"] and fields["bulk"] and not fields["dense"]  # likewise a kind of bulk
    config = KernelConfig(**fields)
    config = config.possible_for(topology)
    if runtime.fits_workspace(num_elements, itemsize, topology, config):
        return config
    return KernelConfig(config.max_blocks)


def dense_inboxes() -> bool:
    """Whether this process has (or, before jaxnvrar.initialize(), will have) the dense kernel's
    inboxes: JAXNVRAR_DENSE_BYTES > 0 (opt-in)."""
    return runtime.settings_or_environment().dense_bytes > 0


def check_dense_inboxes(config: KernelConfig) -> None:
    """A ValueError naming the setting where `config` is dense and this process has no dense inboxes."""
    if config.dense and not dense_inboxes():
        raise ValueError(f"kernel configuration {config.label} needs the dense kernel's inboxes (opt-in): set "
                         f"JAXNVRAR_DENSE_BYTES (e.g. {DENSE_REGION_BYTES}) on every process before "
                         "jaxnvrar.initialize()")


def _needs_runtime(what: str) -> None:
    if not runtime.is_initialized():
        raise RuntimeError(f"jaxnvrar.tuning.{what}() needs jaxnvrar.initialize() first")


def set_max_blocks(blocks: int | None) -> None:
    """Fix the kernel width of programs lowered from now on (compiled ones keep theirs);
    None goes back to the tuning table's choice (or the default)."""
    _needs_runtime("set_max_blocks")
    if blocks is not None and not 1 <= int(blocks) <= MAX_BLOCKS_LIMIT:
        raise ValueError(f"max_blocks must be in [1, {MAX_BLOCKS_LIMIT}], got {blocks}")
    _overrides["max_blocks"] = None if blocks is None else int(blocks)


@contextlib.contextmanager
def kernel_config_override(config: KernelConfig | str):
    """Within the block, programs lowered run the kernel as `config` (a KernelConfig or its
    label, e.g. "128-1shot"; benchmarks and the tuner compare configurations this way); the
    settings before it come back afterwards. Every process must make the same override."""
    _needs_runtime("kernel_config_override")
    if isinstance(config, str):
        config = KernelConfig.parse(config)
    if not isinstance(config, KernelConfig):
        raise TypeError(f"kernel_config_override takes a jaxnvrar.KernelConfig or its label, got {config!r}")
    check_dense_inboxes(config)
    saved = dict(_overrides)
    _overrides.update(dataclasses.asdict(config))
    try:
        yield
    finally:
        _overrides.clear()
        _overrides.update(saved)
