"""All-reduce latency per algorithm over a sweep of message sizes, in the style of nccl-tests.

Each measurement runs a jitted shard_map program of --chain dependent all-reduces on a
donated buffer (stable addresses, as in a decode loop) and divides by the chain length.
"pipelined": --iters executions queued back to back, then one wait (device-bound).
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxnvrar
from jaxnvrar.distributed import default_topology
from jaxnvrar.runtime import fits_workspace
from jaxnvrar.schedule import KernelConfig, Topology, one_shot_possible
from jaxnvrar.tuning import kernel_config_override
from jaxnvrar import runtime, timing, tuning
from jaxnvrar.bench import breakdown
from jaxnvrar.bench.setup import bring_up, is_printer

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def parse_bytes(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().rstrip("B")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def add_arguments(parser) -> None:
    parser.add_argument("--min-bytes", type=parse_bytes, default=8 << 10, help="smallest message (8K)")
    parser.add_argument("--max-bytes", type=parse_bytes, default=8 << 20, help="largest message (8M)")
    parser.add_argument("--factor", type=int, default=None, help="size step (default 2 on GPU, 4 on CPU)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--algorithms", default=None,
                        help="comma-separated, from psum,reference,nvrar (default: all available)")
    parser.add_argument("--gpus-per-node", type=int, default=None, help="ranks per node (default: per host)")
    parser.add_argument("--chain", type=int, default=None, help="all-reduces per program (16 GPU, 4 CPU)")
    parser.add_argument("--iters", type=int, default=None, help="timed executions (50 GPU, 5 CPU)")
    parser.add_argument("--repeats", type=int, default=5, help="timed batches; the median is reported")
    parser.add_argument("--device-time", metavar="DIR", default=None,
                        help="also trace a few executions with jax.profiler into DIR and report the median "
                             "all-reduce kernel time (device us) next to the wall time per call")
    parser.add_argument("--scan", action="store_true",
                        help="put the chain's all-reduce in a lax.fori_loop body instead of unrolling it")
    parser.add_argument("--peers", choices=["torch"], default=None,
                        help="also time NCCL (torch.distributed) and torch's symmetric-memory one-/two-shot "
                             "all-reduce, each replayed in a CUDA graph, in the same job")
    parser.add_argument("--kernel-configs", "--launches", "--max-blocks", dest="kernel_configs", default=None,
                        help="comma-separated kernel configurations to compare for nvrar, each "
                             "BLOCKS[-1shot][-bulk|-dense|-pull]: at most BLOCKS thread blocks; one-shot (one node "
                             "only); bulk data (a flag per block); dense (one node: raw data, no flags); pull (bulk "
                             "whose reduce-scatter loads the peers' staged slices); "
                             "e.g. 128,128-1shot,128-bulk (columns nvrar/128, ...); "
                             "default: the tuning policy's choice (--launches: the old spelling)")
    parser.add_argument("--rms-norm", type=int, default=None, metavar="HIDDEN",
                        help="time jaxnvrar.all_reduce_rms_norm over rows of HIDDEN elements instead (the "
                             "decode step's all-reduce + residual add + RMSNorm; nvrar: the fused kernel with "
                             "JAXNVRAR_FUSED_NORM=1); sizes must be whole rows")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")
    parser.add_argument("--plot", metavar="PNG", help="draw latency vs size (needs matplotlib)")
    parser.add_argument("--replot", metavar="JSON", help="with --plot: draw a saved --json file instead of measuring")


def _available_algorithms() -> list[str]:
    algorithms = ["psum", "reference"]
    if jaxnvrar.is_initialized():
        algorithms.append("nvrar")
    return algorithms


def _chain_program(mesh, algorithm, chain, gpus_per_node, scan=False, rms_norm=None):
    # Only the all-reduces, back to back, as the peers' CUDA graphs hold only theirs: the carried
    # value is zero (`measure`), so it needs no rescaling kernel between calls; pcast only
    # retypes the sum as a per-rank value (no device work).
    def one(x):
        if rms_norm:  # the residual is x itself (varying): the normalized rows stay varying
            rows = x.reshape(-1, rms_norm)
            normed, _ = jaxnvrar.all_reduce_rms_norm(rows, rows, jnp.ones(rms_norm, x.dtype), "x",
                                                     algorithm=algorithm, gpus_per_node=gpus_per_node)
            return normed.reshape(x.shape)
        return lax.pcast(jaxnvrar.all_reduce(x, "x", algorithm=algorithm, gpus_per_node=gpus_per_node),
                         "x", to="varying")

    def body(x):
        if scan:  # one all-reduce in a loop body, as a scanned layer stack has it
            return lax.fori_loop(0, chain, lambda i, v: one(v), x)
        for _ in range(chain):
            x = one(x)
        return x

    fn = jax.shard_map(body, mesh=mesh, in_specs=P("x"), out_specs=P("x"))
    return jax.jit(fn, donate_argnums=0)


def measure(mesh, algorithm, count, dtype, *, chain, iters, repeats, gpus_per_node,
            trace_dir: str | None = None, scan: bool = False,
            rms_norm: int | None = None) -> tuple[float, float | None, dict | None]:
    """Median microseconds per all-reduce of `count` elements per rank, wall and (with
    trace_dir) device kernel time, and (JAXNVRAR_TIMING=1) the kernel's own stamps of the
    timed calls (`jaxnvrar.timing.summary`). "nvrar/LABEL": nvrar run as `KernelConfig.parse(LABEL)`."""
    num_ranks = mesh.devices.size
    algorithm, config = split_config(algorithm)
    program = _chain_program(mesh, algorithm, chain, gpus_per_node, scan, rms_norm)
    sharding = NamedSharding(mesh, P("x"))
    x = jax.device_put(jnp.zeros((num_ranks * count,), dtype), sharding)  # stays zero along the chain
    with jax.set_mesh(mesh), _configured(config):
        for _ in range(3):
            x = program(x)
        x.block_until_ready()
        runtime.reset_timing()
        batches = []
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(iters):
                x = program(x)
            x.block_until_ready()
            batches.append((time.perf_counter() - start) / (iters * chain))
        stamped = runtime.timing_summary()
        device_us = None
        if trace_dir is not None:
            with breakdown.traced(trace_dir):
                for _ in range(3):
                    x = program(x)
                x.block_until_ready()
            durations = [end - start for name, start, end in breakdown.device_kernels(breakdown.read_trace(trace_dir))
                         if breakdown.classify(name) == "communication"]
            # The median kernel is an all-reduce's time only where each is one kernel: not the
            # reference's (many permutes and adds), nor psum's under --rms-norm with the fused
            # kernel on (psum's add and norm run in XLA's kernels after it, the kernel's inside).
            fused = bool(rms_norm) and runtime.settings_or_environment().fused_norm
            one_kernel_each = not algorithm.startswith("reference") and not (fused and algorithm == "psum")
            device_us = statistics.median(durations) if durations and one_kernel_each else None
    return statistics.median(batches) * 1e6, device_us, stamped


def parse_kernel_configs(text: str, topology: Topology, option: str) -> list[KernelConfig]:
    """Comma-separated kernel configuration labels; a one-line error (SystemExit) for a bad
    label, or for one-shot where the topology has several nodes (it would run as the default
    configuration under the wrong name)."""
    try:
        configs = [KernelConfig.parse(label.strip()) for label in text.split(",")]
        for config in configs:
            tuning.check_dense_inboxes(config)
    except ValueError as err:
        raise SystemExit(f"jaxnvrar-bench {option}: {err}") from None
    for config in configs:
        if config.one_shot and not one_shot_possible(topology):
            raise SystemExit(f"jaxnvrar-bench {option}: {config.label} needs one node of several GPUs, but "
                             f"the topology is {topology.num_nodes} node(s) of {topology.gpus_per_node}; drop -1shot "
                             "or change --gpus-per-node")
        if config.dense and not one_shot_possible(topology):
            raise SystemExit(f"jaxnvrar-bench {option}: {config.label} runs on one node of several GPUs, but the "
                             f"topology is {topology.num_nodes} node(s) of {topology.gpus_per_node} (it would run as "
                             "bulk under the wrong name); use -bulk or change --gpus-per-node")
        if config.pull and topology.gpus_per_node == 1:
            raise SystemExit(f"jaxnvrar-bench {option}: {config.label} pulls from the other GPUs of a node, but "
                             f"the topology has nodes of one GPU (it would run as bulk under the wrong name); use "
                             "-bulk or change --gpus-per-node")
    return configs


def split_config(algorithm: str) -> tuple[str, KernelConfig | None]:
    """"nvrar/128-1shot" -> ("nvrar", KernelConfig(128, True)); "psum" -> ("psum", None)."""
    name, _, label = algorithm.partition("/")
    return name, KernelConfig.parse(label) if label else None


def _configured(config: KernelConfig | None):
    return kernel_config_override(config) if config is not None else contextlib.nullcontext()


def max_error_against_psum(mesh, algorithm, count, dtype, *, gpus_per_node) -> float:
    """Largest |algorithm - psum| / (1 + |psum|) on random inputs: how the tuner makes sure a
    configuration computes the all-reduce before it times it."""
    name, config = split_config(algorithm)
    spec = P("x")
    num_ranks = mesh.devices.size

    def program(which):
        reduce = lambda a: jaxnvrar.all_reduce(a, "x", algorithm=which, gpus_per_node=gpus_per_node)  # noqa: E731
        return jax.jit(jax.shard_map(lambda a: lax.pcast(reduce(a), "x", to="varying"), mesh=mesh,
                                     in_specs=spec, out_specs=spec))

    x = jax.random.normal(jax.random.key(count), (num_ranks * count,), dtype)
    x = jax.device_put(x, NamedSharding(mesh, spec))
    with jax.set_mesh(mesh):
        with _configured(config):
            got = program(name)(x)
        want = program("psum")(x)
        error = jnp.max(jnp.abs(got.astype(jnp.float32) - want.astype(jnp.float32))
                        / (1 + jnp.abs(want.astype(jnp.float32))))
    return float(error)


def message_sizes(min_bytes, max_bytes, factor, itemsize):
    size, sizes = max(min_bytes, itemsize), []
    while size <= max_bytes:
        sizes.append(size)
        size *= factor
    return sizes


def _header(algorithms, device_time: bool) -> str:
    head = f"{'size(B)':>10} {'count':>9} {'type':>8}"
    for a in algorithms:
        head += f" | {a + ' us':>12}" + (f" {'dev us':>7}" if device_time else "")
        head += f" {'algbw':>7} {'busbw':>7}" + (f" {'x psum':>6}" if a != "psum" else "")
    return head + "\n" + "-" * len(head)


def _row_line(row, algorithms, device_time: bool) -> str:
    line = f"{row['bytes']:>10} {row['count']:>9} {row['dtype']:>8}"
    for a in algorithms:
        r = row["results"].get(a)
        if r is None:  # did not fit the NVSHMEM workspace
            line += f" | {'n/a':>12}" + (f" {'':>7}" if device_time else "")
            line += f" {'':>7} {'':>7}" + (f" {'':>6}" if a != "psum" else "")
            continue
        line += f" | {r['us']:>12.2f}"
        if device_time:
            line += f" {r['device_us']:>7.2f}" if r["device_us"] is not None else f" {'-':>7}"
        line += f" {r['algbw_gbs']:>7.2f} {r['busbw_gbs']:>7.2f}"
        if a != "psum":
            line += f" {r['speedup_vs_psum']:>6.2f}"
    return line


def _print_against_peers(rows, ours, peers) -> None:
    """nvrar against the fastest peer kernel at each size."""
    if not ours or not peers:
        return
    print(f"\n{'size(B)':>10} {'ours':>12} {'us':>8} {'best peer':>14} {'us':>8} {'speed-up':>8}")
    for row in rows:
        mine = [(row["results"][a]["us"], a) for a in ours if a in row["results"]]
        theirs = [(row["results"][p]["us"], p) for p in peers if p in row["results"]]
        if mine and theirs:
            (us, name), (peer_us, peer) = min(mine), min(theirs)
            print(f"{row['bytes']:>10} {name:>12} {us:>8.2f} {peer:>14} {peer_us:>8.2f} {peer_us / us:>8.2f}")


def _plot(rows, algorithms, path, title):
    """Latency vs size of each column; several kernel configurations are drawn as one curve, the
    fastest of them at each size (what the tuning table picks), not one curve each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = [a for a in algorithms if a.startswith("nvrar/")]
    curves = {a: [(r["bytes"], r["results"][a]["us"]) for r in rows if a in r["results"]]
              for a in algorithms if len(configs) < 2 or a not in configs}
    if len(configs) >= 2:
        best = [(r["bytes"], min(r["results"][a]["us"] for a in configs if a in r["results"]))
                for r in rows if any(a in r["results"] for a in configs)]
        curves = {"nvrar (fastest configuration)": best, **curves}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, points in curves.items():
        if points:
            ax.plot(*zip(*points), marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("message size (bytes)")
    ax.set_ylabel("time per all-reduce (us)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def replot(args) -> int:
    """--replot JSON --plot PNG: the plot of an earlier run's --json file."""
    if not args.plot:
        raise SystemExit("jaxnvrar-bench allreduce --replot needs --plot PNG")
    try:
        with open(args.replot) as f:
            saved = json.load(f)
        rows = saved["rows"]
    except (OSError, ValueError, KeyError) as err:
        raise SystemExit(f"jaxnvrar-bench allreduce --replot {args.replot}: not a --json file of this bench ({err})")
    columns = list(dict.fromkeys(a for r in rows for a in r["results"]))
    dtype = rows[0]["dtype"] if rows else ""
    _plot(rows, columns, args.plot, f"jaxnvrar all-reduce, {dtype}: {saved.get('devices', '')}")
    return 0


def run(args) -> int:
    if args.replot:
        return replot(args)
    description = bring_up()
    on_gpu = jax.default_backend() == "gpu"
    factor = args.factor or (2 if on_gpu else 4)
    chain = args.chain or (16 if on_gpu else 4)
    iters = args.iters or (50 if on_gpu else 5)
    available = _available_algorithms()
    algorithms = args.algorithms.split(",") if args.algorithms else available
    for a in algorithms:
        if a not in available:
            raise SystemExit(f"jaxnvrar-bench: algorithm {a!r} is not available here (available: {available})")
    algorithms = ["psum"] + [a for a in algorithms if a != "psum"]  # every speed-up is against psum
    dtype = DTYPES[args.dtype]
    itemsize = jnp.dtype(dtype).itemsize
    if args.rms_norm is not None and (args.rms_norm < 1 or args.min_bytes % (args.rms_norm * itemsize)):
        raise SystemExit(f"jaxnvrar-bench allreduce: --rms-norm {args.rms_norm}: messages must be whole rows "
                         f"({args.rms_norm * itemsize} B of {args.dtype}); --min-bytes is {args.min_bytes}")
    mesh = jax.make_mesh((jax.device_count(),), ("x",))
    num_ranks = jax.device_count()
    if num_ranks < 2:  # psum compiles to nothing there: its "speed-ups" would compare a copy with nothing
        raise SystemExit("jaxnvrar-bench allreduce: one rank, and a one-rank all-reduce moves nothing; run one process "
                         "per GPU (jaxnvrar-launch -n N -- jaxnvrar-bench allreduce)")
    topology = (Topology(num_ranks, args.gpus_per_node) if args.gpus_per_node
                else default_topology(num_ranks))
    if args.kernel_configs and "nvrar" in algorithms:
        at = algorithms.index("nvrar")
        configs = parse_kernel_configs(args.kernel_configs, topology, "allreduce --kernel-configs")
        algorithms[at:at + 1] = [f"nvrar/{config.label}" for config in configs]
    if is_printer():
        print(f"# jaxnvrar-bench allreduce: {description}")
        loop = "in a loop" if args.scan else "unrolled"
        print(f"# chain {chain} all-reduces per program ({loop}), {iters} executions per batch, median of "
              f"{args.repeats} batches; gpus_per_node={args.gpus_per_node or 'per host'}")
        if args.rms_norm:
            print(f"# each all-reduce is all_reduce_rms_norm over rows of {args.rms_norm} (+ residual add + "
                  f"RMSNorm; fused kernel for nvrar: JAXNVRAR_FUSED_NORM="
                  f"{runtime.settings_or_environment().fused_norm})")
    peers = None
    if args.peers:
        from jaxnvrar.bench.peers import PEERS, TorchPeers

        peers = TorchPeers()
        columns = algorithms + [p for p in PEERS if p not in peers.unavailable]
    else:
        columns = algorithms
    if is_printer():
        print(_header(columns, args.device_time is not None), flush=True)
    rows = []
    for nbytes in message_sizes(args.min_bytes, args.max_bytes, factor, itemsize):
        count = nbytes // itemsize
        row = {"bytes": count * itemsize, "count": count, "dtype": args.dtype, "results": {}}
        timings = {}
        for a in algorithms:
            # n/a where the workspace does not hold it (it would fall back to the default configuration)
            if a.startswith("nvrar") and not fits_workspace(count, itemsize, topology, split_config(a)[1]):
                continue
            trace_dir = None if args.device_time is None else os.path.join(
                args.device_time, f"{a.replace('/', '_')}_{nbytes}_rank{jax.process_index()}")
            timings[a] = measure(mesh, a, count, dtype, chain=chain, iters=iters, repeats=args.repeats,
                                 gpus_per_node=args.gpus_per_node, trace_dir=trace_dir, scan=args.scan,
                                 rms_norm=args.rms_norm)
        for p in columns[len(algorithms):]:
            us = peers.measure(p, count, args.dtype, chain=chain, iters=iters, repeats=args.repeats)
            if us is not None:
                timings[p] = (us, None)
        for a, (us, device_us, *stamped) in timings.items():
            algbw = row["bytes"] / (us * 1e-6) / 1e9
            row["results"][a] = {"us": us, "device_us": device_us, "kernel_timing": (stamped or [None])[0],
                                 "algbw_gbs": algbw,
                                 "busbw_gbs": algbw * 2 * (num_ranks - 1) / num_ranks,
                                 "speedup_vs_psum": timings["psum"][0] / us if a != "psum" else 1.0}
        rows.append(row)
        if is_printer():
            print(_row_line(row, columns, args.device_time is not None), flush=True)
            for a, result in row["results"].items():
                if result["kernel_timing"]:
                    print(timing.format_summary(f"{a} {row['bytes']} B kernel stamps", result["kernel_timing"]))
    if peers is not None:
        if is_printer():
            for p, reason in peers.unavailable.items():
                print(f"# {p}: not measured ({reason})")
            _print_against_peers(rows, [a for a in algorithms if a.startswith("nvrar")],
                                 [p for p in columns[len(algorithms):]])
        peers.close()
    if is_printer():
        print(f"algbw = size / time, busbw = algbw * 2(P-1)/P with P = {num_ranks}; GB/s; "
              "x psum = psum time / this time; n/a: larger than the NVSHMEM workspace"
              + ("; dev us: median all-reduce kernel time in a profiler trace (- where an all-reduce is not one "
                 "kernel's work: the reference; psum under --rms-norm with JAXNVRAR_FUSED_NORM=1)"
                 if args.device_time else ""))
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"devices": description, "chain": chain, "iters": iters, "rows": rows}, f, indent=1)
        if args.plot:
            _plot(rows, columns, args.plot, f"jaxnvrar all-reduce, {args.dtype}: {description}")
    return 0
