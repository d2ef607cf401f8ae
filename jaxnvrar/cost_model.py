"""An alpha-beta cost model of ring all-reduce and NVRAR, fitted to measured sweeps.

A message of n bytes over a link costs alpha + n * beta; every all-reduce also pays a fixed
per-call cost c (launch, XLA's own overhead). For P = N nodes x G GPUs, apart from c:

    one node (intra links only):
    ring   = 2 (P - 1) (alpha_intra + n / P * beta_intra)
    several nodes (NCCL runs G rings or trees side by side, one per NIC; a pipelined collective
    pays each step's latency and the network's bandwidth once):
    ring   = 2 (P - 1) alpha_inter + 2 (P - 1) / P * n / G * beta_inter
    tree   = 2 ceil(log2 N) alpha_inter + 2 n / G * beta_inter + 2 (G - 1) alpha_intra + 2 n beta_intra
    NCCL-like baseline = min(ring, tree), as NCCL picks between its ring and tree algorithms
    nvrar  = 2 * intra(n (G - 1) / G)                           reduce-scatter + all-gather in the node
           + steps(N) * (alpha_inter + n / G * beta_inter * w)  recursive doubling on 1/G of the message,
                                                                each GPU on its own NIC

where steps(N) = log2 N (+ 2 fold steps when N is not a power of two, see jaxnvrar.schedule)
and w = bytes on the wire per data byte (2 for the kernel's 16-byte cells carrying 8 data bytes).
The bulk launch (raw data, a flag per block and phase) has w = 1 and pays an ASSUMED fence
(BULK_FENCE_S) per phase; its projection is a model of a launch that has not been measured.
Intra-node beta and c come from a measured sweep of one node of 2 GPUs (`jaxnvrar-bench allreduce
--json`); such a sweep cannot separate c from the per-step alpha, so the intra-node alpha is an
assumption (NVLINK_STEP_ALPHA_S). Inter-node links come from the network presets below. Every
projection prints its assumptions.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np

from jaxnvrar.schedule import num_inter_node_steps

WIRE_BYTES_PER_DATA_BYTE = 2.0  # 16-byte {data, flag, data, flag} cells carry 8 data bytes
NVLINK_STEP_ALPHA_S = 1e-6  # ASSUMED latency of one step over NVLink (store, flag seen by the peer)
BULK_FENCE_S = 1e-6  # ASSUMED cost of a bulk launch's system fence before each phase's flag


@dataclasses.dataclass(frozen=True)
class Link:
    alpha_s: float  # seconds per message
    beta_s_per_byte: float  # seconds per byte
    source: str  # where the figures come from

    @property
    def bandwidth_gbs(self) -> float:
        return 1e-9 / self.beta_s_per_byte


# Inter-node presets. Bandwidths are the documented per-port line rates (one NIC per GPU);
# the latencies are ASSUMPTIONS for a GPU-initiated put through NVSHMEM's proxy, not measurements.
NETWORKS = {
    "ndr": Link(3e-6, 1 / 50e9, "InfiniBand NDR: 400 Gb/s = 50 GB/s per port (documented); alpha 3 us assumed"),
    "slingshot": Link(3e-6, 1 / 25e9, "HPE Slingshot-11: 200 Gb/s = 25 GB/s per NIC (documented); alpha 3 us assumed"),
}


def fit_link(sizes_bytes, times_s, source: str) -> Link:
    """alpha + n beta through measured (size, time) points, least squares in relative error so
    the small messages (where alpha shows) count as much as the large ones."""
    sizes = np.asarray(sizes_bytes, np.float64)
    times = np.asarray(times_s, np.float64)
    if sizes.size < 2:
        raise ValueError("fitting alpha and beta needs at least two message sizes")
    beta, alpha = np.polyfit(sizes, times, 1, w=1.0 / times)
    return Link(max(float(alpha), 0.0), max(float(beta), 1e-15), source)


def ring_time(n_bytes: float, nodes: int, gpus_per_node: int, intra: Link, inter: Link) -> float:
    ranks = nodes * gpus_per_node
    if ranks == 1:
        return 0.0
    if nodes == 1:
        return 2 * (ranks - 1) * (intra.alpha_s + n_bytes / ranks * intra.beta_s_per_byte)
    return (2 * (ranks - 1) * inter.alpha_s
            + 2 * (ranks - 1) / ranks * n_bytes / gpus_per_node * inter.beta_s_per_byte)


def tree_time(n_bytes: float, nodes: int, gpus_per_node: int, intra: Link, inter: Link) -> float:
    depth = int(np.ceil(np.log2(nodes))) if nodes > 1 else 0
    in_node = 2 * (gpus_per_node - 1) * intra.alpha_s + (2 * n_bytes * intra.beta_s_per_byte if gpus_per_node > 1 else 0.0)
    between = 2 * depth * inter.alpha_s + (2 * n_bytes / gpus_per_node * inter.beta_s_per_byte if depth else 0.0)
    return in_node + between


def baseline_time(n_bytes, nodes, gpus_per_node, intra, inter) -> float:
    """The NCCL-like baseline: the better of ring and tree."""
    return min(ring_time(n_bytes, nodes, gpus_per_node, intra, inter),
               tree_time(n_bytes, nodes, gpus_per_node, intra, inter))


def nvrar_time(n_bytes: float, nodes: int, gpus_per_node: int, intra: Link, inter: Link,
               bulk: bool = False) -> float:
    g = gpus_per_node
    wire, fence = (1.0, BULK_FENCE_S) if bulk else (WIRE_BYTES_PER_DATA_BYTE, 0.0)
    in_node = 0.0 if g == 1 else 2 * (intra.alpha_s + fence + n_bytes * (g - 1) / g * intra.beta_s_per_byte * wire)
    between = num_inter_node_steps(nodes) * (inter.alpha_s + fence + n_bytes / g * inter.beta_s_per_byte * wire)
    return in_node + between


@dataclasses.dataclass(frozen=True)
class Fitted:
    per_call_s: float  # the fixed cost c of one all-reduce
    intra: Link


def fits_from_sweep(path: str) -> tuple[Fitted, Fitted]:
    """(baseline, nvrar) fits to a measured sweep of one node of 2 GPUs: psum's points give the
    baseline's, the kernel's give NVRAR's (beta per byte on the wire)."""
    report = json.loads(open(path).read())

    def fit(algorithm, wire):
        rows = [r for r in report["rows"] if algorithm in r["results"]]
        if len(rows) < 2:
            raise ValueError(f"{path}: fewer than two sizes measured for {algorithm}")
        line = fit_link([r["bytes"] for r in rows], [r["results"][algorithm]["us"] * 1e-6 for r in rows],
                        f"{path} ({algorithm}, {len(rows)} sizes)")
        # On 2 ranks both algorithms take 2 steps: t = c + 2 alpha + n beta_wire.
        per_call = max(line.alpha_s - 2 * NVLINK_STEP_ALPHA_S, 0.0)
        return Fitted(per_call, Link(NVLINK_STEP_ALPHA_S, line.beta_s_per_byte / wire,
                                     f"beta fitted to {line.source}; alpha {NVLINK_STEP_ALPHA_S * 1e6:g} us assumed"))

    return fit("psum", 1.0), fit("nvrar", WIRE_BYTES_PER_DATA_BYTE)


def projection(sizes_bytes, node_counts, gpus_per_node: int, baseline: Fitted, nvrar: Fitted,
               inter: Link) -> list[dict]:
    rows = []
    for nodes in node_counts:
        for n in sizes_bytes:
            base = baseline.per_call_s + baseline_time(n, nodes, gpus_per_node, baseline.intra, inter)
            ours = nvrar.per_call_s + nvrar_time(n, nodes, gpus_per_node, nvrar.intra, inter)
            bulk = nvrar.per_call_s + nvrar_time(n, nodes, gpus_per_node, nvrar.intra, inter, bulk=True)
            rows.append({"nodes": nodes, "bytes": n, "baseline_us": base * 1e6, "nvrar_us": ours * 1e6,
                         "speedup": base / ours, "nvrar_bulk_us": bulk * 1e6, "bulk_speedup": base / bulk})
    return rows


# Fits of the 2 x H200 sweep (docs/results/allreduce_2xH200_2026-11-23.json, `fits_from_sweep`),
# built in so that "auto" can project multi-node topologies without a file at hand.
H200_FITS = (
    Fitted(19.45e-6, Link(NVLINK_STEP_ALPHA_S, 3.846e-12, "2 x H200 sweep of 2026-11-23 (psum)")),
    Fitted(4.90e-6, Link(NVLINK_STEP_ALPHA_S, 3.341e-12, "2 x H200 sweep of 2026-11-23 (nvrar)")),
)


def nvrar_predicted_faster(n_bytes: float, nodes: int, gpus_per_node: int, network: str = "ndr",
                           fits: tuple[Fitted, Fitted] = H200_FITS) -> bool:
    """Whether the model expects NVRAR to beat the NCCL-like baseline for this call."""
    baseline, nvrar = fits
    inter = NETWORKS[network]
    base = baseline.per_call_s + baseline_time(n_bytes, nodes, gpus_per_node, baseline.intra, inter)
    ours = nvrar.per_call_s + nvrar_time(n_bytes, nodes, gpus_per_node, nvrar.intra, inter)
    return ours < base
