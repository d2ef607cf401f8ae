"""The schedule on its own, and the kernel's C++ twin (csrc/schedule.h) against it."""

import itertools

import numpy as np
import pytest

from jaxnvrar import schedule
from jaxnvrar.schedule import KernelConfig, StepOp, Topology

cpp = pytest.importorskip("jaxnvrar._jaxnvrar_cpu", reason="the CPU extension is not built")


@pytest.mark.parametrize("num_nodes", range(1, 34))
def test_inter_node_phase_reduces_every_node_exactly_once(num_nodes):
    # Simulate the steps on sets of contributing nodes: every node must end with all of them.
    held = [{i} for i in range(num_nodes)]
    for step in range(schedule.num_inter_node_steps(num_nodes)):
        plan = [schedule.inter_node_step(i, num_nodes, step) for i in range(num_nodes)]
        for i, p in enumerate(plan):  # sends and receives pair up
            if p.op & StepOp.SEND:
                assert plan[p.peer].op & (StepOp.RECV_ADD | StepOp.RECV_COPY) and plan[p.peer].peer == i
            if p.op & (StepOp.RECV_ADD | StepOp.RECV_COPY):
                assert plan[p.peer].op & StepOp.SEND and plan[p.peer].peer == i
        sent = [set(h) for h in held]
        for i, p in enumerate(plan):
            if p.op & StepOp.RECV_ADD:
                assert not held[i] & sent[p.peer], "a contribution would be counted twice"
                held[i] |= sent[p.peer]
            elif p.op & StepOp.RECV_COPY:
                held[i] = set(sent[p.peer])
    assert all(h == set(range(num_nodes)) for h in held)


def test_step_counts():
    assert [schedule.num_inter_node_steps(n) for n in (1, 2, 3, 4, 5, 8, 9, 16)] == [0, 1, 3, 2, 4, 3, 5, 4]


@pytest.mark.parametrize("n,parts,align", [(0, 3, 1), (1, 4, 8), (10, 3, 1), (10, 3, 4), (1000, 7, 8), (5, 8, 4)])
def test_slices_cover_the_message_in_order(n, parts, align):
    bounds = schedule.slice_bounds(n, parts, align)
    assert len(bounds) == parts and bounds[0][0] == 0 and bounds[-1][1] == n
    for (b0, e0), (b1, _) in zip(bounds, bounds[1:]):
        assert e0 == b1 and (b0 % align == 0 or b0 == n)  # empty tail slices sit at the end


def test_topology_validation():
    assert Topology(12, 4).num_nodes == 3 and Topology(12, 4).rank_of(2, 1) == 9
    with pytest.raises(ValueError, match="gpus_per_node=5 does not divide the axis size 12"):
        Topology(12, 5)
    with pytest.raises(ValueError, match="positive integer"):
        Topology(0, 1)


def test_cpp_inter_node_steps_match():
    for num_nodes in range(1, 40):
        assert cpp.num_inter_node_steps(num_nodes) == schedule.num_inter_node_steps(num_nodes)
        for node, step in itertools.product(range(num_nodes), range(schedule.num_inter_node_steps(num_nodes))):
            want = schedule.inter_node_step(node, num_nodes, step)
            assert cpp.inter_node_step(node, num_nodes, step) == (int(want.op), want.peer)


def test_cpp_slices_and_workspace_match():
    for n, parts, itemsize in itertools.product([0, 1, 2, 3, 7, 8, 9, 100, 4097, 1 << 20], range(1, 10), (2, 4)):
        align = schedule.SLICE_ALIGN_BYTES // itemsize
        for index, bounds in enumerate(schedule.slice_bounds(n, parts, align)):
            assert cpp.slice_of(n, parts, align, index) == bounds
        assert cpp.slice_capacity_elements(n, parts, itemsize) == schedule.slice_capacity_elements(n, parts, itemsize)
        for nodes in (1, 2, 3, 5):
            topo = Topology(parts * nodes, parts)
            assert cpp.workspace_bytes_needed(n, itemsize, topo.num_ranks, parts) == \
                schedule.workspace_bytes_needed(n, itemsize, topo)
            assert cpp.workspace_bytes_needed(n, itemsize, topo.num_ranks, parts, False, True) == \
                schedule.workspace_bytes_needed(n, itemsize, topo, KernelConfig(bulk=True))
        if parts > 1:
            topo = Topology(parts, parts)
            for one_shot, bulk in ((True, False), (True, True)):
                assert cpp.workspace_bytes_needed(n, itemsize, parts, parts, one_shot, bulk) == \
                    schedule.workspace_bytes_needed(n, itemsize, topo, KernelConfig(one_shot=one_shot, bulk=bulk))


def test_one_shot_only_on_one_node():
    assert schedule.one_shot_possible(Topology(4, 4))
    assert not schedule.one_shot_possible(Topology(4, 2)) and not schedule.one_shot_possible(Topology(1, 1))
    with pytest.raises(ValueError, match="one node"):
        schedule.workspace_bytes_needed(1024, 2, Topology(4, 2), KernelConfig(one_shot=True))
    # Two GPUs: the same bytes as the two-shot kernel (the whole message vs two half-size inboxes each way).
    for n in (1 << 10, 1 << 16, 1 << 20):
        assert schedule.workspace_bytes_needed(n, 2, Topology(2, 2), KernelConfig(one_shot=True)) == \
            schedule.workspace_bytes_needed(n, 2, Topology(2, 2))


def test_inboxes_hold_whole_cells_and_every_slice():
    for n, g, itemsize in itertools.product([1, 3, 17, 1000, 4099], range(1, 9), (2, 4)):
        capacity = schedule.slice_capacity_elements(n, g, itemsize)
        assert capacity * itemsize % schedule.SLICE_ALIGN_BYTES == 0
        align = schedule.SLICE_ALIGN_BYTES // itemsize
        assert all(e - b <= capacity for b, e in schedule.slice_bounds(n, g, align))


def test_consecutive_calls_of_any_layouts_use_disjoint_halves():
    # A kernel's call k uses half k % 2 of the workspace, at the same place whatever the call's
    # size or configuration: consecutive calls never share bytes (the halves once moved with the
    # layout, and a call could write where the previous one's slower peer still read).
    workspace = 64 << 20
    layouts = [(n, itemsize, ranks, g, one_shot, bulk)
               for n, itemsize, (ranks, g) in itertools.product([1, 4097, 98304, 1 << 18, 1 << 21], (2, 4),
                                                                [(2, 2), (4, 2), (3, 1), (8, 8)])
               for one_shot, bulk in [(False, False), (False, True)] + ([(True, False), (True, True)] if ranks == g else [])
               if cpp.workspace_bytes_needed(n, itemsize, ranks, g, one_shot, bulk) <= workspace]
    assert len(layouts) > 60
    for first, second in itertools.product(layouts, repeat=2):
        for calls in (6, 7):  # the first call in half 0, then in half 1
            a_begin, a_end = cpp.call_half_span(*first, workspace, calls)
            b_begin, b_end = cpp.call_half_span(*second, workspace, calls + 1)
            assert schedule.WORKSPACE_HEADER_BYTES <= min(a_begin, b_begin) and max(a_end, b_end) <= workspace
            assert a_end <= b_begin or b_end <= a_begin, (first, second, calls)


def test_workspace_regions_are_disjoint_and_fill_each_half():
    # The kernels' offsets (csrc/schedule.h's Layout): every inbox, staging area and flag array of
    # a half, for every kernel configuration, lies inside the half and overlaps no other.
    for n, g, nodes, itemsize in itertools.product([1, 7, 4097, 1 << 20], [1, 2, 3, 4, 8], [1, 2, 3, 5], (2, 4)):
        configs = [(False, False), (False, True)] + ([(True, False), (True, True)] if nodes == 1 and g > 1 else [])
        for one_shot, bulk in configs:
            regions, half, units, stride = cpp.layout_regions(n, itemsize, g * nodes, g, one_shot, bulk)
            spans = sorted((offset, offset + size, name) for name, offset, size in regions)
            assert spans[0][0] == 0 and spans[-1][1] == half, (n, g, nodes, one_shot, bulk)
            for (_, end, name), (begin, _, other) in zip(spans, spans[1:]):
                assert end == begin, f"{name} and {other} overlap or leave a gap ({n}, {g}, {nodes}, {one_shot}, {bulk})"
            # Each inbox holds a slice's units: the capacity of its elements, 8 (LL) or 16 (bulk) bytes each.
            assert units * (16 if bulk else 8) == stride * itemsize
            assert stride >= -(-n // (1 if one_shot else g))
            config = KernelConfig(one_shot=one_shot, bulk=bulk)
            assert schedule.workspace_bytes_needed(n, itemsize, Topology(g * nodes, g), config) == \
                schedule.WORKSPACE_HEADER_BYTES + 2 * half
            # Half 1 starts at the workspace's middle for every call (HalfStride), not after the
            # call's own layout: a layout fits the workspace exactly where it fits that half.
            needed = schedule.WORKSPACE_HEADER_BYTES + 2 * half
            for workspace in (needed, needed + 8, needed + 16, needed - 16, 512 << 20):
                fits = needed <= workspace
                assert (half <= cpp.half_stride(workspace)) == fits, (n, g, nodes, one_shot, bulk, workspace)
                assert cpp.half_stride(workspace) % 16 == 0


def test_grouping_regions_match_the_kernels_and_hold_every_call_of_their_size():
    # JAXNVRAR_GROUPINGS cuts the workspace into one region per grouping of ranks, each with its
    # own header and halves; the Python side sizes messages by the same region (runtime.workspace_bytes).
    for workspace, groupings in itertools.product([1 << 20, (512 << 20) + 16, 3 << 30, 123456789], [1, 2, 3, 4, 16]):
        region = schedule.grouping_bytes(workspace, groupings)
        assert region == cpp.grouping_bytes(workspace, groupings)
        assert region % schedule.GROUPING_ALIGN_BYTES == 0 and groupings * region <= workspace
        assert workspace - groupings * region < groupings * schedule.GROUPING_ALIGN_BYTES  # nearly all of it
        # A call of a region's size stays inside the region in both halves.
        for n, itemsize, (ranks, g), one_shot, bulk in [(4096, 2, (2, 2), True, False), (1 << 18, 4, (4, 2), False, True)]:
            needed = cpp.workspace_bytes_needed(n, itemsize, ranks, g, one_shot, bulk)
            if needed > region:
                continue
            for calls in (0, 1):
                begin, end = cpp.call_half_span(n, itemsize, ranks, g, one_shot, bulk, region, calls)
                assert schedule.WORKSPACE_HEADER_BYTES <= begin and end <= region


def test_dense_inboxes_match_the_kernels():
    assert schedule.dense_inbox_bytes(schedule.DENSE_REGION_BYTES, 2, True) == 16 << 20
    for region, g in [(64 << 20, 2), (64 << 20, 3), (1000, 2), (0, 8), (3 << 30, 32)]:
        for one_shot in (True, False):
            assert schedule.dense_inbox_bytes(region, g, one_shot) == cpp.dense_inbox_bytes(region, g, one_shot)
    # Each parity's inboxes (one-shot: G; two-shot: 2G) end where the other parity's begin in both
    # layouts, within the allocation: one-shot and two-shot calls never share bytes across parities.
    for region in [64 << 20, (1 << 20) + 64, 12345679, 1 << 30]:
        for g in range(2, 33):
            one, two = schedule.dense_inbox_bytes(region, g, True), schedule.dense_inbox_bytes(region, g, False)
            assert g * one == 2 * g * two and 2 * g * one <= region and one % 16 == 0


def test_dense_runs_where_the_slice_fits_an_inbox():
    region = schedule.DENSE_REGION_BYTES  # 2 GPUs: a one-shot inbox of 16 MiB, two-shot 8 MiB
    assert schedule.dense_fits(8 << 20, 2, 2, True, region)
    assert not schedule.dense_fits((8 << 20) + 1, 2, 2, True, region)
    assert schedule.dense_fits(8 << 20, 2, 2, False, region)  # two slices of 8 MiB
    assert not schedule.dense_fits((8 << 20) + 16, 2, 2, False, region)
    assert not schedule.dense_fits(8, 4, 2, True, 0) and not schedule.dense_fits(8, 4, 1, True, region)


@pytest.mark.parametrize("one_shot,bulk,fused_norm,dense,pull", [
    (False, False, False, False, False), (True, False, True, False, False), (False, True, True, False, False),
    (True, True, False, False, False), (True, True, False, True, False), (False, True, False, False, True),
    (True, True, True, False, True)])
@pytest.mark.parametrize("dtype", [1, 2, 3, 7])
def test_call_signatures_decode_to_what_was_encoded(one_shot, bulk, fused_norm, dense, pull, dtype):
    # What ranks compare before exchanging data, and what a failure report prints from it
    # (dtype 7: the largest code the signature's 3 bits hold, next to 5 launch bits).
    for elements, gpus_per_node, nodes in [(1, 1, 2), (4097, 8, 3), ((1 << 32) + 5, 32, 65535)]:
        signature = cpp.encode_call(elements, dtype, one_shot, bulk, gpus_per_node, nodes, fused_norm, dense, pull)
        call = cpp.decode_call(*signature)
        assert call == {"elements": elements % (1 << 32), "dtype": dtype, "nodes": nodes,
                        "gpus_per_node": gpus_per_node, "one_shot": one_shot, "bulk": bulk,
                        "fused_norm": fused_norm, "dense": dense, "pull": pull}
    # Dense and flagged one-shot bulk use different inboxes: ranks that disagree are reported.
    assert cpp.encode_call(4096, dtype, True, True, 2, 1, False, True) != cpp.encode_call(4096, dtype, True, True, 2, 1)
    # Pulled and pushed reduce-scatters keep slices in different places: likewise.
    for shot in (False, True):
        assert (cpp.encode_call(4096, dtype, shot, True, 2, 1, False, False, True)
                != cpp.encode_call(4096, dtype, shot, True, 2, 1))
    # The fused kernel's call differs from the plain one of the same message: ranks that
    # disagree on it are reported, not left to read each other's blocks.
    plain = cpp.encode_call(4096, dtype, one_shot, bulk, 2, 1, False)
    assert cpp.encode_call(4096, dtype, one_shot, bulk, 2, 1, True) != plain


def _cell_checks(words: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For 16-byte lines {a, b, c, d} of stale data read as cells: the flag each half would pass
    for (b ^ Mix(a, 0), d ^ Mix(c, 1)); the line passes for a cell only at a call whose flag is both."""
    a, b, c, d = (words[:, i].astype(np.uint64) for i in range(4))

    def mix(x, half):
        h = x ^ (x >> 16)
        h = (h * 0x85EBCA6B) & 0xFFFFFFFF
        h ^= h >> 13
        h = (h * 0xC2B2AE35) & 0xFFFFFFFF
        h ^= h >> 16
        return h ^ 0xFFFFFFFF if half else h

    return b ^ mix(a, 0), d ^ mix(c, 1)


def _valid(flags: np.ndarray) -> np.ndarray:
    return (flags >= 1) & (flags <= 0xFFFFFFFE)  # a call's flag: (calls % 0xFFFFFFFE) + 1


def test_stale_data_of_common_patterns_never_passes_for_a_flagged_cell():
    # Workspace halves are shared by calls of every protocol, so an LL reader can poll a cell
    # where an earlier bulk call left raw data. The mix (csrc/schedule.h, CellCheck) must agree
    # with the kernels' and keep such data from passing at any call.
    rng = np.random.default_rng(0)
    for data, flag, half in [(0, 1, 0), (0x40004000, 16384, 1), (123456789, 0xFFFFFFFE, 0), (0xFFFFFFFF, 7, 1)]:
        assert cpp.cell_check(data, flag, half) == _cell_checks(
            np.array([[data, 0, data, 0]], np.uint32))[half][0] ^ flag
    import ml_dtypes
    samples = []
    for dtype in (np.float32, np.float16, ml_dtypes.bfloat16):
        n = 1 << 14
        for values in (np.zeros(n), np.ones(n), np.full(n, 2.0), np.arange(n) % 4, np.arange(n) % 3 - 1,
                       np.tile([0.0, 0.0, 2.0, 0.0], n // 4), np.arange(n), rng.integers(-3, 4, n),
                       np.round(rng.standard_normal(n), 2)):
            samples.append(np.ascontiguousarray(values.astype(dtype)).view(np.uint32).reshape(-1, 4))
    words = np.concatenate(samples)
    lo, hi = _cell_checks(words)
    assert not np.any((lo == hi) & _valid(lo)), words[(lo == hi) & _valid(lo)][:4]
    # With the bare flag as check word (before 2026-12-02), the same lines passed at some call.
    assert ((words[:, 1] == words[:, 3]) & _valid(words[:, 1].astype(np.uint64))).sum() > 1000
    # One half alone (a reader can see one half fresh, the other stale): zeros never pass, and
    # structured data passes only at flags spread over all calls, where the bare flag let it pass
    # early (a bfloat16 pair (2.0, 0) at call 16383); a first half whose data word is 0 passes at
    # its check word, as before. Within the first 10^7 calls:
    zeros = np.zeros((1, 4), np.uint32)
    assert not any(_valid(flags).any() for flags in _cell_checks(zeros))
    early = 10_000_000
    mixed = np.concatenate([lo[words[:, 0] != 0], hi])
    bare = np.concatenate([words[:, 1], words[:, 3]]).astype(np.uint64)
    assert (_valid(mixed) & (mixed <= early)).mean() < 0.002  # about 10^7 / 2^32 for spread flags
    assert (_valid(bare) & (bare <= early)).mean() > 0.05
