"""Project ring/tree (NCCL-like) vs NVRAR latency to many nodes with the alpha-beta cost model,
fitted to a measured single-node sweep. Prints its assumptions with the table."""

from __future__ import annotations

import json
import pathlib

from jaxnvrar import cost_model
from jaxnvrar.bench.allreduce import parse_bytes

# The sweep the project ships (2 x H200, 2026-11-23), in a clone of the repository.
SHIPPED_SWEEP = pathlib.Path(__file__).resolve().parents[2] / "docs" / "results" / "allreduce_2xH200_2026-11-23.json"


def add_arguments(parser) -> None:
    parser.add_argument("--fit", default=None, metavar="JSON",
                        help="a single-node sweep of 2 GPUs (jaxnvrar-bench allreduce --json); default: the "
                             "shipped 2 x H200 sweep, docs/results/allreduce_2xH200_2026-11-23.json")
    parser.add_argument("--network", choices=sorted(cost_model.NETWORKS), default="ndr")
    parser.add_argument("--gpus-per-node", type=int, default=4)
    parser.add_argument("--sizes", default="128K,512K,1M,2M", help="message sizes, comma-separated")
    parser.add_argument("--max-nodes", type=int, default=64)
    parser.add_argument("--json", metavar="PATH", help="write the projection as JSON")


def run(args) -> int:
    fit = args.fit or SHIPPED_SWEEP
    if not pathlib.Path(fit).exists():
        raise SystemExit(f"jaxnvrar-bench model: no sweep at {fit}; measure one on 2 GPUs with "
                         "jaxnvrar-bench allreduce --json sweep.json and pass --fit sweep.json")
    baseline, nvrar = cost_model.fits_from_sweep(str(fit))
    inter = cost_model.NETWORKS[args.network]
    sizes = [parse_bytes(s) for s in args.sizes.split(",")]
    nodes = [1]
    while nodes[-1] * 2 <= args.max_nodes:
        nodes.append(nodes[-1] * 2)
    rows = cost_model.projection(sizes, nodes, args.gpus_per_node, baseline, nvrar, inter)
    print(f"# alpha-beta projection, {args.gpus_per_node} GPUs per node; assumptions:")
    print(f"#   inter-node: {inter.source}")
    print(f"#   intra-node baseline: {baseline.intra.source}; per call {baseline.per_call_s * 1e6:.1f} us")
    print(f"#   intra-node nvrar:    {nvrar.intra.source}; per call {nvrar.per_call_s * 1e6:.1f} us")
    print(f"#   nvrar wire bytes per data byte: {cost_model.WIRE_BYTES_PER_DATA_BYTE:g}; "
          "baseline = min(ring, tree) as NCCL chooses")
    print(f"#   bulk: 1 wire byte per data byte, {cost_model.BULK_FENCE_S * 1e6:g} us fence per phase assumed "
          "(an assumption, not a measurement)")
    print(f"{'nodes':>5} {'size(B)':>9} {'baseline us':>12} {'nvrar us':>9} {'speed-up':>8} {'bulk us':>9} {'speed-up':>8}")
    for r in rows:
        print(f"{r['nodes']:>5} {r['bytes']:>9} {r['baseline_us']:>12.1f} {r['nvrar_us']:>9.1f} {r['speedup']:>8.2f} "
              f"{r['nvrar_bulk_us']:>9.1f} {r['bulk_speedup']:>8.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"network": args.network, "gpus_per_node": args.gpus_per_node, "rows": rows}, f, indent=1)
    return 0
