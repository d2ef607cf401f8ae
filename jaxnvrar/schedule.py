"""The NVRAR schedule: who talks to whom, at which step, about which slice.

This module is the single definition of the algorithm. The pure-JAX reference
(`jaxnvrar.reference`) is written against it, and the CUDA kernel follows its
C++ twin in `csrc/schedule.h`; `tests/test_schedule.py` checks that the two agree.

Ranks 0..P-1 of the reduced axis form N nodes of G consecutive ranks each
(rank = node * G + local). The message of n elements is cut into G slices;
local rank l owns slice l.

1. Intra-node reduce-scatter: local l sums slice l over locals 0, 1, ..., G-1,
   in that order, in float32.
2. Inter-node all-reduce of each slice among the ranks with the same local index,
   by recursive doubling over the nodes. For N not a power of two, the
   ``N - 2**floor(log2 N)`` extra nodes first fold their slice into a partner
   (node - pow2) and get the finished slice back at the end.
   Every addition puts the lower node's value first, so all ranks round alike.
3. Intra-node all-gather: local l's finished slice is copied to every local.

Every element of the result is computed once, on one rank, and copied to the
others, which is why all replicas end bit-identical.

Two more launches of the same schedule and sums, so of the same bits.
The one-shot launch (one node), for small messages. With N = 1 the kernel can instead
push the whole message to every local and let each sum all G copies itself, over
locals 0, 1, ..., G-1 in float32, exactly the sums and order of step 1. The result
is the same, bit for bit, on every rank; the data crosses NVLink once instead of
twice (one hop of latency instead of two), at the price of (G-1) n bytes sent per
GPU instead of 2 (G-1) n / G: equal for G = 2, more for larger nodes.
The bulk launch, for large messages (any topology): raw data and one flag per block
and phase instead of a flag in every 8 bytes (with or without one-shot).
"""

from __future__ import annotations

import dataclasses
import enum

__all__ = [
    "Topology",
    "StepOp",
    "InterNodeStep",
    "slice_bounds",
    "slice_stride",
    "inter_node_steps",
    "inter_node_step",
    "num_inter_node_steps",
    "SLICE_ALIGN_BYTES",
    "slice_capacity_elements",
    "grouping_bytes",
    "workspace_bytes_needed",
    "one_shot_possible",
    "KernelConfig",
]

# Slices start on 16-byte boundaries so the kernel can use 16-byte vector accesses.
SLICE_ALIGN_BYTES = 16


@dataclasses.dataclass(frozen=True)
class Topology:
    """``num_ranks`` ranks of one mesh axis, grouped into nodes of ``gpus_per_node``."""

    num_ranks: int
    gpus_per_node: int

    def __post_init__(self):
        for name in ("num_ranks", "gpus_per_node"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.num_ranks % self.gpus_per_node:
            raise ValueError(
                f"gpus_per_node={self.gpus_per_node} does not divide the axis size "
                f"{self.num_ranks}; pass a gpus_per_node that divides {self.num_ranks}"
            )

    @property
    def num_nodes(self) -> int:
        return self.num_ranks // self.gpus_per_node

    def node_of(self, rank: int) -> int:
        return rank // self.gpus_per_node

    def local_of(self, rank: int) -> int:
        return rank % self.gpus_per_node

    def rank_of(self, node: int, local: int) -> int:
        return node * self.gpus_per_node + local


def slice_stride(num_elements: int, num_slices: int, align_elements: int) -> int:
    """Distance between slice starts: ceil(n / slices), rounded up to the alignment."""
    per_slice = -(-num_elements // num_slices)
    return -(-per_slice // align_elements) * align_elements


def slice_bounds(num_elements: int, num_slices: int, align_elements: int = 1) -> list[tuple[int, int]]:
    """[begin, end) of each slice of a flat message; slices start on ``align_elements``.

    Trailing slices may be shorter or empty when the message is small.
    """
    if num_slices < 1 or align_elements < 1 or num_elements < 0:
        raise ValueError("slice_bounds needs num_slices >= 1, align_elements >= 1, num_elements >= 0")
    per_slice = slice_stride(num_elements, num_slices, align_elements)
    bounds = []
    for index in range(num_slices):
        begin = min(index * per_slice, num_elements)
        bounds.append((begin, min(begin + per_slice, num_elements)))
    return bounds


class StepOp(enum.IntFlag):
    """What a node does in one inter-node step (values shared with csrc/schedule.h)."""

    IDLE = 0
    SEND = 1  # send my slice to the peer
    RECV_ADD = 2  # receive the peer's slice and add it to mine
    RECV_COPY = 4  # receive the peer's slice and replace mine with it
    EXCHANGE = SEND | RECV_ADD


@dataclasses.dataclass(frozen=True)
class InterNodeStep:
    op: StepOp
    peer: int  # peer node, -1 when idle


def _largest_power_of_two_at_most(n: int) -> int:
    return 1 << (n.bit_length() - 1)


def num_inter_node_steps(num_nodes: int) -> int:
    """log2 of the largest power of two <= N, plus a fold-in and a fold-out step if N is not one."""
    if num_nodes < 1:
        raise ValueError(f"num_nodes must be >= 1, got {num_nodes}")
    pow2 = _largest_power_of_two_at_most(num_nodes)
    return (pow2.bit_length() - 1) + (2 if pow2 != num_nodes else 0)


def inter_node_step(node: int, num_nodes: int, step: int) -> InterNodeStep:
    """The op and peer of ``node`` at ``step`` of the inter-node phase."""
    if not 0 <= node < num_nodes:
        raise ValueError(f"node {node} out of range for {num_nodes} nodes")
    if not 0 <= step < num_inter_node_steps(num_nodes):
        raise ValueError(f"step {step} out of range for {num_nodes} nodes")
    pow2 = _largest_power_of_two_at_most(num_nodes)
    extra = num_nodes - pow2
    idle = InterNodeStep(StepOp.IDLE, -1)
    if extra:
        last = num_inter_node_steps(num_nodes) - 1
        if step == 0:  # fold-in: extra nodes hand their slice to a partner
            if node >= pow2:
                return InterNodeStep(StepOp.SEND, node - pow2)
            if node < extra:
                return InterNodeStep(StepOp.RECV_ADD, node + pow2)
            return idle
        if step == last:  # fold-out: partners hand the finished slice back
            if node < extra:
                return InterNodeStep(StepOp.SEND, node + pow2)
            if node >= pow2:
                return InterNodeStep(StepOp.RECV_COPY, node - pow2)
            return idle
        step -= 1
    if node >= pow2:
        return idle
    return InterNodeStep(StepOp.EXCHANGE, node ^ (1 << step))


def inter_node_steps(node: int, num_nodes: int) -> list[InterNodeStep]:
    return [inter_node_step(node, num_nodes, s) for s in range(num_inter_node_steps(num_nodes))]


# ---------------------------------------------------------------- the kernel's workspace
# The CUDA kernel moves data in 16-byte cells {4 data bytes, check, 4 data bytes, check}. Each PE's
# symmetric workspace holds, twice (calls alternate between the two halves so a fast rank
# never overwrites cells a slow peer has yet to read):
#   G reduce-scatter inboxes, S inter-node inboxes, S put-staging areas, G all-gather inboxes,
# each one slice of cells; after a header (call counter, the peers' call signatures).
# A one-shot launch has only the G inboxes, each the whole message.
# Twin: WorkspaceBytesNeeded in csrc/schedule.h.
CELL_BYTES = 16
CELL_DATA_BYTES = 8
WORKSPACE_HEADER_BYTES = 2048
# The dense kernel's inboxes (csrc/protocol_dense.cuh), a symmetric allocation beside the workspace
# ($JAXNVRAR_DENSE_BYTES, opt-in: this size suggested): per call parity, G inboxes (two-shot: 2G, half the size).
DENSE_REGION_BYTES = 64 << 20


def dense_inbox_bytes(region_bytes: int, gpus_per_node: int, one_shot: bool) -> int:
    """The largest slice (bytes; one-shot: message) a dense site runs the dense kernel for; larger
    ones run as bulk. Two-shot has an inbox per phase. Twin: DenseInboxBytes in csrc/schedule.h."""
    two_shot = region_bytes // (4 * gpus_per_node) // 16 * 16  # one-shot: twice, so both fill the same halves
    return 2 * two_shot if one_shot else two_shot
# Bulk kernels (csrc/protocol_bulk.cuh) move raw 16-byte chunks, and each block raises one
# flag per phase and peer after its chunks: the same inboxes at twice the data per byte, then a
# flag area. At most BULK_MAX_BLOCKS blocks.
BULK_MAX_BLOCKS = 1024


def slice_capacity_elements(num_elements: int, gpus_per_node: int, itemsize: int) -> int:
    """Elements an inbox holds: the first slice's length before it is cut at the message end."""
    return slice_stride(num_elements, gpus_per_node, max(1, SLICE_ALIGN_BYTES // itemsize))


def dense_fits(num_elements: int, itemsize: int, gpus_per_node: int, one_shot: bool, region_bytes: int) -> bool:
    """Whether a dense site of one node runs the dense kernel for this message (its slice, the
    whole message one-shot, fits an inbox), else bulk. Twin of the check in csrc/nvrar_ffi.cu."""
    slice_bytes = slice_capacity_elements(num_elements, 1 if one_shot else gpus_per_node, itemsize) * itemsize
    return gpus_per_node > 1 and slice_bytes <= dense_inbox_bytes(region_bytes, gpus_per_node, one_shot)


def one_shot_possible(topology: Topology) -> bool:
    """A one-shot launch needs one node (no inter-node phase) of at least two GPUs."""
    return topology.num_nodes == 1 and topology.gpus_per_node > 1


# One region of the workspace per grouping of ranks (JAXNVRAR_GROUPINGS): all-reduces over two axes
# of a mesh must not share a call counter and halves (csrc/schedule.h says why). Twin:
# GroupingBytes in csrc/schedule.h.
GROUPING_ALIGN_BYTES = 4096


def grouping_bytes(workspace_bytes: int, groupings: int) -> int:
    """The bytes of each grouping's region of a workspace: what one call can use."""
    return workspace_bytes // groupings // GROUPING_ALIGN_BYTES * GROUPING_ALIGN_BYTES


def workspace_bytes_needed(num_elements: int, itemsize: int, topology: Topology,
                           config: KernelConfig | None = None) -> int:
    """Symmetric workspace bytes a call needs with `config` (default: the full schedule, LL cells)."""
    one_shot, bulk = (config.one_shot, config.bulk) if config is not None else (False, False)
    g = topology.gpus_per_node
    if one_shot and not one_shot_possible(topology):
        raise ValueError(f"a one-shot launch needs one node of several GPUs, not {topology}")
    steps = 0 if one_shot else num_inter_node_steps(topology.num_nodes)
    inboxes = g if one_shot else 2 * g + 2 * steps
    slice_elements = slice_capacity_elements(num_elements, 1 if one_shot else g, itemsize)
    if bulk:
        return WORKSPACE_HEADER_BYTES + 2 * (inboxes * slice_elements * itemsize + bulk_flag_bytes(g, steps))
    return WORKSPACE_HEADER_BYTES + 2 * inboxes * (slice_elements * itemsize // CELL_DATA_BYTES) * CELL_BYTES


def bulk_flag_bytes(gpus_per_node: int, num_steps: int) -> int:
    """A bulk launch's flags: one 8-byte word per block for each reduce-scatter sender, each
    all-gather sender and each inter-node step."""
    return (2 * gpus_per_node + num_steps) * BULK_MAX_BLOCKS * 8


# ---------------------------------------------------------------- kernel configuration

DEFAULT_MAX_BLOCKS = 128
MAX_BLOCKS_LIMIT = 1024


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """How the kernel runs one call: its width (thread blocks); one-shot (one node: no
    all-gather) or the full schedule; bulk (raw data and a flag per block, for large messages)
    or LL cells; dense, a kind of bulk on one node (raw data, no flags: csrc/protocol_dense.cuh);
    pull, a kind of bulk whose reduce-scatter reads the peers' staged slices instead of receiving
    pushed ones (csrc/protocol_bulk.cuh's PullBulkProtocol). Every configuration computes the
    same bits."""

    max_blocks: int = DEFAULT_MAX_BLOCKS
    one_shot: bool = False
    bulk: bool = False
    dense: bool = False
    pull: bool = False

    def __post_init__(self):
        blocks = self.max_blocks
        if not isinstance(blocks, int) or isinstance(blocks, bool) or not 1 <= blocks <= MAX_BLOCKS_LIMIT:
            raise ValueError(f"KernelConfig.max_blocks must be an int in [1, {MAX_BLOCKS_LIMIT}], got {blocks!r}")
        if not all(isinstance(flag, bool) for flag in (self.one_shot, self.bulk, self.dense, self.pull)):
            raise TypeError(f"KernelConfig.one_shot, .bulk, .dense and .pull must be bools, got {self.one_shot!r}, "
                            f"{self.bulk!r}, {self.dense!r}, {self.pull!r}")
        if self.dense and not self.bulk:
            raise ValueError("KernelConfig.dense is a kind of bulk: it needs bulk=True (labels BLOCKS-dense, "
                             "BLOCKS-1shot-dense)")
        if self.pull and (not self.bulk or self.dense):
            raise ValueError("KernelConfig.pull is a kind of bulk, not dense: it needs bulk=True and dense=False "
                             "(labels BLOCKS-pull, BLOCKS-1shot-pull)")

    @property
    def label(self) -> str:
        """"128", "128-1shot", "128-bulk", "128-1shot-bulk", "128-dense", "128-1shot-dense",
        "128-pull", "128-1shot-pull": how benchmarks and the tuning table name a configuration."""
        if self.dense or self.pull:
            return str(self.max_blocks) + ("-1shot" if self.one_shot else "") + ("-dense" if self.dense else "-pull")
        return str(self.max_blocks) + ("-1shot" if self.one_shot else "") + ("-bulk" if self.bulk else "")

    @classmethod
    def parse(cls, label: str) -> KernelConfig:
        blocks, *variants = label.split("-")
        if (not blocks.isdigit() or not 1 <= int(blocks) <= MAX_BLOCKS_LIMIT
                or variants not in ([], ["1shot"], ["bulk"], ["1shot", "bulk"], ["dense"], ["1shot", "dense"],
                                    ["pull"], ["1shot", "pull"])):
            raise ValueError(f"bad kernel configuration {label!r}: expected BLOCKS[-1shot][-bulk|-dense|-pull] with "
                             f"BLOCKS in [1, {MAX_BLOCKS_LIMIT}], e.g. 128, 32-1shot, 128-1shot-bulk, 128-dense or "
                             "128-pull")
        dense, pull = "dense" in variants, "pull" in variants
        return cls(int(blocks), "1shot" in variants, "bulk" in variants or dense or pull, dense, pull)

    def possible_for(self, topology: Topology) -> KernelConfig:
        """This configuration, less what the topology cannot run (one-shot needs one node; bulk
        at most BULK_MAX_BLOCKS blocks; dense, bulk on one node of several GPUs; pull, bulk with
        peers in the node to pull from)."""
        one_node = one_shot_possible(topology)
        bulk = self.bulk and self.max_blocks <= BULK_MAX_BLOCKS
        return KernelConfig(self.max_blocks, self.one_shot and one_node, bulk, self.dense and bulk and one_node,
                            self.pull and bulk and topology.gpus_per_node > 1)
