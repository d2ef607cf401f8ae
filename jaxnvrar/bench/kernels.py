"""Kernels of one decode step, read from the program XLA compiles (no GPU needed).

    jaxnvrar-bench kernels --preset llama3.1-8b --batch 1,16 --algorithms psum,none [--list]

Compiles `llama.advance` (the step `decode` times) for an abstract model (shapes, no weights)
and counts, in the optimized HLO, the instructions that launch work on the device: fusions,
custom calls (cuBLAS, Triton, ours), collectives, copies, and anything left unfused; loop
bodies count once per known trip. Each kernel is put in the layer its metadata names (the
model's `layer<i>` scopes; one without a name, as some of XLA's GEMM fusions are, goes with the
next kernel that has one); the mean over the middle layers is the per-layer figure (XLA does not
fuse every layer alike), and `--list` names the kernels.

Targets: the job's GPUs when it has --tp of them (XLA autotunes as for a real run; under
`jaxnvrar-launch -n TP`, one process per GPU, nvrar's own kernel compiles too); else, with the
CUDA plugin installed (pip install "jax[cuda13]"), an H200 described to XLA's compiler without
a GPU (no autotuning: GEMM choices by heuristics, so counts may differ by about one per GEMM
from a GPU's); `--target cpu` compiles for the CPU (XLA:CPU's ops, not kernels: for tests).
On GPUs it also counts the host's launches per step: command buffers (one CUDA graph launch
each) and what runs outside them. A profile (`decode --profile`) stays the measurement of time.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import json
import os
import re
import tempfile

import jax

import jaxnvrar
from jaxnvrar.bench.setup import bring_up, is_printer, parse_ints
from jaxnvrar.distributed import ENV_NUM_PROCESSES
from jaxnvrar.info import installed_version

TARGETS = ("auto", "local", "h200", "cpu")

# Instructions that launch nothing (views, bookkeeping, the second half of an async pair).
_NO_LAUNCH = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all", "opt-barrier",
              "partition-id", "replica-id", "add-dependency", "domain", "all-reduce-done", "all-gather-done",
              "collective-permute-done", "copy-done", "async-done", "async-update", "send-done", "recv-done"}
_COLLECTIVES = {"all-reduce", "all-reduce-start", "all-gather", "all-gather-start", "reduce-scatter", "all-to-all",
                "collective-permute", "collective-permute-start", "collective-broadcast", "ragged-all-to-all",
                "send", "recv"}
_COMPUTATION = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*.*?\s([a-z][\w\-]*)\((.*)$")


@dataclasses.dataclass(frozen=True)
class Kernel:
    name: str  # the HLO instruction
    kind: str  # e.g. "fusion:kLoop", "gemm", "custom-call:__cublas$lt$matmul", "all-reduce"
    op_name: str  # the jax op it came from ("" when XLA kept no metadata)
    trips: int = 1  # launches per step (loop bodies: the known trip count)
    trips_known: bool = True  # False inside a loop whose trip count XLA did not know (counted once)


def parse_computations(hlo: str) -> tuple[dict[str, list[tuple[str, str, str]]], str | None]:
    """{computation: [(instruction, opcode, rest of the line)]} and the entry's name."""
    computations, entry, current = {}, None, None
    for line in hlo.splitlines():
        if current is None:
            match = _COMPUTATION.match(line)
            if match and not line.startswith("HloModule"):
                current = match.group(2)
                computations[current] = []
                entry = current if match.group(1) else entry
        elif line.strip() == "}":
            current = None
        elif match := _INSTRUCTION.match(line):
            computations[current].append(match.groups())
        elif line.strip():
            # A count that silently skips lines would be wrong without saying so.
            raise ValueError(f"kernels: cannot read this line of {current!r} in XLA's program (a new text "
                             f"format?): {line.strip()[:200]}")
    return computations, entry


def _called(rest: str, attribute: str) -> list[str]:
    match = re.search(attribute + r"=(?:\{([^}]*)\}|(%?[\w.\-]+))", rest)  # {a, b} or one name
    if not match:
        return []
    return [name.strip().lstrip("%") for name in (match.group(1) or match.group(2)).split(",") if name.strip()]


def kernel_kind(opcode: str, rest: str) -> str | None:
    """What an instruction launches, or None (nothing, or a container walked separately)."""
    if opcode in _NO_LAUNCH or opcode in ("while", "conditional", "call", "async-start"):
        return None
    if opcode == "fusion":
        backend = re.search(r'"kind":"(\w+)"', rest)
        if backend and "gemm" in backend.group(1):
            return "gemm"
        if backend:
            return f"fusion:{backend.group(1)}"
        kind = re.search(r"kind=(\w+)", rest)
        return f"fusion:{kind.group(1) if kind else '?'}"
    if opcode == "custom-call":
        target = re.search(r'custom_call_target="([^"]+)"', rest)
        return f"custom-call:{target.group(1) if target else '?'}"
    if opcode in _COLLECTIVES:
        return opcode.removesuffix("-start")
    if opcode == "copy-start":
        return "copy"
    return opcode  # an op XLA left unfused (on the CPU, most are)


def kernels_of(hlo: str) -> list[Kernel]:
    """The kernels of an optimized HLO module in schedule order: the entry's, and those of the
    loops, branches, calls and async ops it runs (fusion bodies are one kernel each). A loop's
    body counts once per known trip and its condition once more; of a conditional's branches,
    one runs: the one with the most kernels is counted."""
    computations, entry = parse_computations(hlo)

    def walk(name: str, trips: int, known: bool) -> list[Kernel]:
        found: list[Kernel] = []
        for instruction, opcode, rest in computations.get(name, []):
            if opcode == "while":
                count = re.search(r'"known_trip_count":\{"n":"(\d+)"', rest)
                n = int(count.group(1)) if count else 1
                for called in _called(rest, "condition"):
                    found += walk(called, trips * (n + 1 if count else 1), known and count is not None)
                for called in _called(rest, "body"):
                    found += walk(called, trips * n, known and count is not None)
            elif opcode == "conditional":
                branches = [walk(called, trips, known) for called in
                            _called(rest, "branch_computations") + _called(rest, "true_computation") +
                            _called(rest, "false_computation")]
                found += max(branches, key=lambda branch: sum(k.trips for k in branch), default=[])
            elif opcode in ("call", "async-start"):
                for called in _called(rest, "to_apply" if opcode == "call" else "calls"):
                    found += walk(called, trips, known)
            elif (kind := kernel_kind(opcode, rest)) is not None:
                op_name = re.search(r'op_name="([^"]*)"', rest)
                found.append(Kernel(instruction, kind, op_name.group(1) if op_name else "", trips, known))
        return found

    return walk(entry, 1, True) if entry is not None else []


def by_layer(kernels: list[Kernel], scope: str) -> list[int | None]:
    """The layer of each kernel (None: outside the layers): the `scope<i>` its op_name names;
    a kernel without metadata goes with the next kernel that has some (some of XLA's GEMM fusions
    keep none; what consumes a GEMM's output is in the same layer), the last ones with the one
    before."""
    pattern = re.compile(rf"(?:^|/){re.escape(scope)}(\d+)(?:/|$)")
    named = [(int(m.group(1)) if (m := pattern.search(k.op_name)) else None) if k.op_name else "?" for k in kernels]
    layers: list[int | None] = list(named)
    following: int | None | str = "?"
    for i in reversed(range(len(named))):
        if named[i] == "?":
            layers[i] = following
        else:
            following = named[i]
    previous: int | None = None
    for i, layer in enumerate(layers):
        if layer == "?":
            layers[i] = previous
        previous = layers[i]
    return layers


def step_report(kernels: list[Kernel], layers: list[int | None], num_layers: int) -> dict:
    """Launches per layer (loop trips included), outside the layers and in all; the per-layer
    figure is the mean over the middle layers (not the first, which follows the embedding, nor
    the last, which ends in the final norm): XLA does not fuse every layer alike (seen: the
    residual add fused into the norm in every other layer), so a single layer can mislead."""
    per_layer = [0] * num_layers
    all_reduces = [0] * num_layers
    outside = 0
    for kernel, layer in zip(kernels, layers):
        if layer is None or not 0 <= layer < num_layers:
            outside += kernel.trips
        else:
            per_layer[layer] += kernel.trips
            all_reduces[layer] += kernel.trips if is_all_reduce(kernel) else 0
    middle = range(1, num_layers - 1) if num_layers > 2 else range(num_layers)
    return {"total": sum(k.trips for k in kernels), "per_layer": per_layer, "middle_layers": list(middle),
            "per_layer_mean": sum(per_layer[i] for i in middle) / len(middle),
            "per_layer_range": [min(per_layer[i] for i in middle), max(per_layer[i] for i in middle)],
            "all_reduces_per_layer": sum(all_reduces[i] for i in middle) / len(middle), "outside_layers": outside,
            "trip_counts_known": all(k.trips_known for k in kernels)}


def is_all_reduce(kernel: Kernel) -> bool:
    """XLA's collective, or our kernel's custom call (plain or fused with the RMSNorm)."""
    return kernel.kind == "all-reduce" or kernel.kind.startswith("custom-call:jaxnvrar_nvrar_")


def compile_with_launches(lowered) -> tuple:
    """(the compiled program, its host launches per step or None): XLA:GPU's thunk sequence (from
    its dump) lists what the host launches, each command buffer (a CUDA graph) being one launch
    however many kernels it holds; a collective XLA keeps out of command buffers splits them.
    None where XLA writes no thunk sequence (the CPU)."""
    with tempfile.TemporaryDirectory() as dump:
        compiled = lowered.compile(compiler_options={"xla_dump_to": dump})
        # After XLA's thunk passes (which form the command buffers); without command buffers
        # there are no passes and the plain sequence is the final one.
        files = (glob.glob(os.path.join(dump, "*thunk_sequence_after_thunk_passes.txt"))
                 or glob.glob(os.path.join(dump, "*thunk_sequence.txt")))
        if len(files) != 1:
            return compiled, None
        with open(files[0]) as f:
            return compiled, launches_of(f.read())


def launches_of(thunk_sequence: str) -> dict:
    """Host launches from XLA:GPU's thunk sequence: its top-level (unindented) thunks, each
    command buffer one launch, the thunks inside it indented under it."""
    top_level = [line.split()[1] for line in thunk_sequence.splitlines() if re.match(r"^\d+:\s", line)]
    kinds = collections.Counter(top_level)
    return {"launches": len(top_level), "command_buffers": kinds.pop("kCommandBuffer", 0),
            "outside_command_buffers": dict(kinds)}


# ---------------------------------------------------------------- where to compile


# An H200 SXM as XLA's compiler sees a device (GpuTargetConfigProto, text format): compute
# capability 9.0, 132 SMs, 141 GB of HBM3e at 4.8 TB/s, 50 MiB of L2 (NVIDIA's data sheet).
_H200 = """gpu_device_info {{
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132 fpus_per_core: 128
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: 4800000000000 l2_cache_size: 52428800 clock_rate_ghz: 1.98
  device_memory_size: 150754820096 shared_memory_per_block_optin: 232448
  cuda_compute_capability {{ major: 9 minor: 0 }}
  registers_per_core_limit: 65536 registers_per_block_limit: 65536
  runtime_version: "{major}.{minor}.0" name: "NVIDIA H200" model_str: "NVIDIA H200"
  device_vendor: "NVIDIA Corporation"
}}
platform_name: "CUDA"
runtime_version {{ major: {major} minor: {minor} patch: 0 }}
dnn_version_info {{ major: {dnn_major} minor: {dnn_minor} patch: {dnn_patch} }}
device_description_str: "NVIDIA H200"
"""


def h200_target_config() -> str:
    """The H200 description, with the CUDA runtime and cuDNN versions of the installed wheels
    (the compiler checks what it may emit against them; 13.0 and 9.0 where none is installed)."""
    runtime = installed_version("nvidia-cuda-runtime") or installed_version("nvidia-cuda-runtime-cu13") or "13.0"
    dnn = installed_version("nvidia-cudnn-cu13") or "9.0.0"
    major, minor = (int(part) for part in runtime.split(".")[:2])
    dnn_major, dnn_minor, dnn_patch = (int(part) for part in (dnn.split(".") + ["0", "0"])[:3])
    return _H200.format(major=major, minor=minor, dnn_major=dnn_major, dnn_minor=dnn_minor, dnn_patch=dnn_patch)


def compile_devices(target: str, count: int) -> tuple[list, str]:
    """`count` devices to compile for, and a description of them."""
    from jaxnvrar.distributed import local_gpu_count

    if target == "local" or (target == "auto" and (local_gpu_count() >= count or ENV_NUM_PROCESSES in os.environ)):
        if ENV_NUM_PROCESSES in os.environ:  # one process per GPU: the job's devices, NVSHMEM up for nvrar
            bring_up(timed=False)
        gpus = [d for d in jax.devices() if d.platform == "gpu"]
        if len(gpus) < count:
            raise SystemExit(f"kernels: --target local needs {count} GPUs, this job sees {len(gpus)} "
                             "(or use --target h200 to compile without GPUs)")
        return gpus[:count], f"{count} x {gpus[0].device_kind} (this job's GPUs, autotuned)"
    if target in ("auto", "h200"):
        return _described_h200s(count), f"{count} x H200 described to XLA (no GPU; no autotuning)"
    from jax._src import xla_bridge

    if not xla_bridge.backends_are_initialized():
        jax.config.update("jax_num_cpu_devices", max(count, 8))
    cpus = jax.devices("cpu")
    if len(cpus) < count:
        raise SystemExit(f"kernels: --target cpu needs {count} CPU devices, jax has {len(cpus)} "
                         f"(XLA_FLAGS=--xla_force_host_platform_device_count={count})")
    return cpus[:count], f"{count} CPU devices (XLA:CPU ops, not GPU kernels)"


def _described_h200s(count: int) -> list:
    from jax._src import xla_bridge
    from jax.experimental import topologies

    # The CUDA plugin refuses to start as a backend without a GPU (it checks CUPTI and the
    # driver); as a compiler it needs neither: keep the backends to the CPU.
    if not xla_bridge.backends_are_initialized():
        jax.config.update("jax_platforms", "cpu")
    try:
        topology = topologies.get_topology_desc(platform="cuda", topology=f"1x1x{count}",
                                                target_config=h200_target_config())
    except Exception as error:  # no CUDA plugin, or one that cannot describe a device
        raise SystemExit("kernels: compiling for an H200 without a GPU needs jax's CUDA plugin "
                         f'(pip install "jax[cuda13]=={jax.__version__}"); it failed with: {error}. '
                         "--target cpu compiles for the CPU instead (XLA:CPU ops, not GPU kernels)") from None
    return list(topology.devices)[:count]


# ---------------------------------------------------------------- the command


def add_arguments(parser) -> None:
    parser.add_argument("--preset", default="llama3.1-8b", help="model shape (llama3.1-8b)")
    parser.add_argument("--layers", type=int, default=4,
                        help="layers to compile (4: the per-layer figure is the mean of the 2 middle ones)")
    parser.add_argument("--tp", type=int, default=2, help="tensor-parallel ranks (2)")
    parser.add_argument("--batch", type=parse_ints, default=[1, 16], help="batch sizes, comma-separated (1,16)")
    parser.add_argument("--context", type=int, default=1088, help="cache length: prompt + new tokens (1088)")
    parser.add_argument("--algorithms", default="psum,none",
                        help="all_reduce choices of the model (psum,none; nvrar under jaxnvrar-launch on the GPUs)")
    parser.add_argument("--target", choices=TARGETS, default="auto",
                        help="the job's GPUs, an H200 described to the compiler, or the CPU (auto: GPUs if any, "
                             "else h200)")
    parser.add_argument("--attention", choices=("xla", "kernel"), default="xla",
                        help="the decode step's attention: XLA's ops (xla) or the fused CUDA kernel (kernel: "
                             "on the GPUs, or an H200 described where the CUDA build is installed)")
    parser.add_argument("--list", action="store_true",
                        help="name the kernels of the first middle layer (and of any middle layer that differs)")
    parser.add_argument("--json", metavar="PATH", help="write the counts (and listings) as JSON")


def run(args) -> int:
    from jaxnvrar.models import llama
    from jaxnvrar.models.llama.modules import LAYER_SCOPE

    for option, value in (("--layers", args.layers), ("--tp", args.tp), ("--batch", min(args.batch)),
                          ("--context", args.context)):
        if value < 1:
            raise SystemExit(f"kernels: {option} must be >= 1, got {value}")
    algorithms = [a.strip() for a in args.algorithms.split(",") if a.strip()]
    for algorithm in algorithms:
        llama.check_all_reduce_choice(algorithm)
    kernel_wanted = [a for a in algorithms if a in ("nvrar", "auto")]
    if kernel_wanted and args.target in ("h200", "cpu"):
        raise SystemExit(_NO_KERNEL_HERE.format(algorithm=kernel_wanted[0], tp=args.tp))
    if args.attention == "kernel" and args.target == "cpu":
        raise SystemExit("kernels: --attention kernel compiles for CUDA GPUs only; use --attention xla with --target cpu")
    devices, described = compile_devices(args.target, args.tp)
    if kernel_wanted and not jaxnvrar.is_initialized():
        raise SystemExit(_NO_KERNEL_HERE.format(algorithm=kernel_wanted[0], tp=args.tp))
    mesh = jax.sharding.Mesh(devices, (llama.TP,))
    rows = []
    attention = llama.attention.implementation_text(args.attention)
    if is_printer():
        print(f"kernels of one decode step: {args.preset}, {args.layers} layers, TP {args.tp}, cache {args.context}, "
              f"compiled for {described}, jax {jax.__version__}; attention {attention}")
        print(f"{'algorithm':>10} {'batch':>5} {'per layer':>9} {'range':>7} {'all-reduces':>11} "
              f"{'per layer, each':>22} {'outside':>7} {'total':>5} {'host launches (graphs)':>23}")
    for algorithm in algorithms:
        model = llama.with_attention(llama.abstract_model(args.preset, mesh, all_reduce=algorithm,
                                                          num_layers=args.layers), args.attention)
        for batch in args.batch:
            compiled, launches = compile_with_launches(llama.lowered_advance(model, batch, args.context))
            kernels = kernels_of(compiled.as_text())
            layers = by_layer(kernels, LAYER_SCOPE)
            report = step_report(kernels, layers, args.layers)
            # The first middle layer, and any later one that differs from those listed.
            listed, listings = set(), {}
            for i in report["middle_layers"]:
                if report["per_layer"][i] not in listed:
                    listed.add(report["per_layer"][i])
                    listings[i] = [dataclasses.asdict(k) for k, layer in zip(kernels, layers) if layer == i]
            rows.append({"algorithm": algorithm, "batch": batch, **report, "host_launches": launches,
                         "listings": listings})
            if is_printer():
                low, high = report["per_layer_range"]
                print(f"{algorithm:>10} {batch:>5} {report['per_layer_mean']:>9.1f} {f'{low}-{high}':>7} "
                      f"{report['all_reduces_per_layer']:>11.1f} {','.join(map(str, report['per_layer']))[:22]:>22} "
                      f"{report['outside_layers']:>7} {report['total']:>5} "
                      f"{_launches_text(launches):>23}", flush=True)
                if not report["trip_counts_known"]:
                    print(f"{'':>12}(a loop without a known trip count was counted once)")
                for i, listing in listings.items() if args.list else ():
                    print(f"{'':>12}layer {i}: {len(listing)} kernels")
                    for k in listing:
                        print(f"{'':>12}{k['kind']:<34} {k['name']:<40} {k['op_name'][-60:]}")
    if args.json and is_printer():
        with open(args.json, "w") as f:
            json.dump({"preset": args.preset, "layers": args.layers, "tp": args.tp, "context": args.context,
                       "compiled_for": described, "jax": jax.__version__, "attention": attention, "rows": rows}, f, indent=1)
    return 0


def _launches_text(launches: dict | None) -> str:
    return "-" if launches is None else f"{launches['launches']} ({launches['command_buffers']})"


_NO_KERNEL_HERE = ("kernels: --algorithms {algorithm}: the kernel compiles only with its runtime up, one process per "
                   "GPU (jaxnvrar-launch -n {tp} -- jaxnvrar-bench kernels ... on the GPUs); here count psum, "
                   "whose all-reduces nvrar replaces one for one")
