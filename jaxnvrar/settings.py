"""Every JAXNVRAR_* setting read from the environment, once: name, parser, default, and whether
it changes how programs are lowered (those must be equal on every process).

`read()` takes one frozen snapshot; `jaxnvrar.initialize()` checks that snapshot across the
processes and keeps it, and everything after (the kernel configuration, "auto") reads the
snapshot, never `os.environ` again.
"""

from __future__ import annotations

import dataclasses
import os

from jaxnvrar.cost_model import NETWORKS
from jaxnvrar.schedule import DENSE_REGION_BYTES, MAX_BLOCKS_LIMIT

DEFAULT_WORKSPACE_BYTES = 512 << 20
MIN_WORKSPACE_BYTES = 1 << 20
DEFAULT_TIMEOUT_S = 10.0
MIN_DENSE_BYTES = 1 << 20
MAX_GROUPINGS = 16


@dataclasses.dataclass(frozen=True)
class Setting:
    name: str           # the environment variable
    field: str          # its field in Settings
    kind: type          # int, float or str
    default: object
    lowering: bool      # changes the compiled program: must be equal on every process
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] | None = None
    help: str = ""
    zero_means_none: bool = False  # 0 is accepted below the minimum: "none of it"
    agree: bool = False  # read at run time, but every process must have the same (the kernels of a call depend on it)

    def parse(self, raw: str | None):
        """The value of `raw` (the default when None); a ValueError naming the variable and
        what it accepts otherwise."""
        if raw is None:
            return self.default
        if self.kind is str:
            if self.choices is not None and raw not in self.choices:
                raise ValueError(f"{self.name}={raw!r}: choose one of {list(self.choices)}")
            return raw
        try:
            value = self.kind(raw)
        except ValueError:
            value = None
        if value == 0 and self.zero_means_none:
            return value
        if value is None or (self.minimum is not None and value < self.minimum) or (
                self.maximum is not None and value > self.maximum):
            bound = (f"in [{self.minimum}, {self.maximum}]" if self.maximum is not None
                     else f">= {self.minimum}" if self.minimum is not None else "")
            if self.zero_means_none:
                bound = f"0 (none) or {bound}"
            raise ValueError(f"{self.name}={raw!r}: expected a {self.kind.__name__} {bound}".rstrip())
        return value



SETTINGS = (
    Setting("JAXNVRAR_WORKSPACE_BYTES", "workspace_bytes", int, DEFAULT_WORKSPACE_BYTES, True,
            minimum=MIN_WORKSPACE_BYTES, help="NVSHMEM workspace per GPU: bounds the largest nvrar message"),
    Setting("JAXNVRAR_GROUPINGS", "groupings", int, 1, True, minimum=1, maximum=MAX_GROUPINGS,
            help="groupings of ranks (mesh axes) that nvrar all-reduces run over in one process, e.g. 2 for "
                 "both axes of a 2-D mesh; each gets its own 1/N of the workspace; one more is refused under "
                 "'nvrar' and runs psum under 'auto'"),
    Setting("JAXNVRAR_TIMEOUT_S", "timeout_s", float, DEFAULT_TIMEOUT_S, False, minimum=0.001,
            help="bound on every wait inside the kernel, then a timeout report"),
    Setting("JAXNVRAR_FORCE_PUT", "force_put", int, 0, False, minimum=0, maximum=1,
            help="1: the inter-node phase through NVSHMEM puts even over NVLink (tests the put path)"),
    Setting("JAXNVRAR_MAX_BLOCKS", "max_blocks", int, None, True, minimum=1, maximum=MAX_BLOCKS_LIMIT,
            help="thread blocks per all-reduce (default: the tuning table's, else 128)"),
    Setting("JAXNVRAR_ONE_SHOT", "one_shot", int, None, True, minimum=0, maximum=1,
            help="1/0: one-shot kernels on one node always/never (default: the tuning table's)"),
    Setting("JAXNVRAR_BULK", "bulk", int, None, True, minimum=0, maximum=1,
            help="1/0: bulk kernels (raw data, a flag per block) always/never (default: the tuning table's)"),
    Setting("JAXNVRAR_DENSE_BYTES", "dense_bytes", int, 0, True, minimum=MIN_DENSE_BYTES, zero_means_none=True,
            help=f"the dense kernel's inboxes per GPU (0: none, the dense kernel is opt-in; "
                 f"{DENSE_REGION_BYTES}: messages up to 16 MiB on 2 GPUs)"),
    Setting("JAXNVRAR_CHECK_CALLS", "check_calls", int, 1, True, minimum=0, maximum=1,
            help="0: ranks do not compare call signatures"),
    Setting("JAXNVRAR_FUSED_NORM", "fused_norm", int, 0, True, minimum=0, maximum=1,
            help="1: all_reduce_rms_norm's add and norm in the all-reduce kernel (default 0: XLA's, after it; "
                 "see docs/design.md for why)"),
    Setting("JAXNVRAR_TIMING", "timing", int, 0, False, minimum=0, maximum=1,
            help="1: every kernel call stamps its phases (jaxnvrar.timing; benchmarks report them)"),
    Setting("JAXNVRAR_FIRST_CALL", "first_call", int, 0, False, minimum=0, agree=True,
            help="testing: start the call counter here (flag wrap-around)"),
    Setting("JAXNVRAR_AUTO_MAX_BYTES", "auto_max_bytes", int, None, True, minimum=0,
            help='"auto" without a tuning table: nvrar up to this size'),
    Setting("JAXNVRAR_NETWORK", "network", str, "ndr", True, choices=tuple(sorted(NETWORKS)),
            help='"auto" across nodes without a tuning table: the cost model\'s network'),
    Setting("JAXNVRAR_TUNING_FILE", "tuning_file", str, None, False,
            help="the tuning table (default ~/.cache/jaxnvrar/tuning.json); process 0's is shared"),
)
_BY_NAME = {s.name: s for s in SETTINGS}


@dataclasses.dataclass(frozen=True)
class Settings:
    workspace_bytes: int = DEFAULT_WORKSPACE_BYTES
    groupings: int = 1
    timeout_s: float = DEFAULT_TIMEOUT_S
    force_put: int = 0
    max_blocks: int | None = None
    one_shot: int | None = None
    bulk: int | None = None
    dense_bytes: int = 0  # opt-in until its NVLink soak has run (docs/gpu-testing.md)
    check_calls: int = 1
    fused_norm: int = 0
    timing: int = 0
    first_call: int = 0
    auto_max_bytes: int | None = None
    network: str = "ndr"
    tuning_file: str | None = None

    def lowering(self) -> dict:
        """The settings that change how programs are lowered, by variable name."""
        return {s.name: getattr(self, s.field) for s in SETTINGS if s.lowering}

    def agreed(self) -> dict:
        """The settings every process must share, by variable name: those that change how programs
        are lowered, and the run-time ones that the kernels of one call depend on (the call
        counter's start, from which the flags come: peers started apart wait for flags that never
        come)."""
        return {s.name: getattr(self, s.field) for s in SETTINGS if s.lowering or s.agree}


def read(environ=None) -> Settings:
    """A snapshot of every setting; a ValueError for the first invalid one."""
    environ = os.environ if environ is None else environ
    return Settings(**{s.field: s.parse(environ.get(s.name)) for s in SETTINGS})


def get(name: str, environ=None):
    """One setting's value, parsed (a ValueError naming it when invalid)."""
    environ = os.environ if environ is None else environ
    return _BY_NAME[name].parse(environ.get(name))


def problems(environ=None) -> dict[str, str]:
    """Each invalid setting, by name, with what is wrong (`python -m jaxnvrar` lists them)."""
    environ = os.environ if environ is None else environ
    found = {}
    for s in SETTINGS:
        try:
            s.parse(environ.get(s.name))
        except ValueError as err:
            found[s.name] = str(err)
    return found
