"""algorithm="nvrar" (the CUDA kernel) on GPUs: one process per GPU under jaxnvrar-launch
(tests/gpu/run.py runs it so, with JAXNVRAR_FORCE_PUT=1 too):

    XLA_FLAGS=--xla_gpu_graph_min_graph_size=1 \
        jaxnvrar-launch -n 2 -- python -m pytest tests/gpu/test_gpu_nvrar.py

Skipped with a reason where there is no GPU or no CUDA build (tests/gpu/conftest.py); the 64 MB
messages need JAXNVRAR_WORKSPACE_BYTES=2147483648 (4294967296 for 3 ranks), or are skipped. With
JAXNVRAR_ONE_SHOT=1 / JAXNVRAR_BULK=1 every one-node call launches one-shot / bulk
(JAXNVRAR_FORCE_PUT=1: the inter-node phase through NVSHMEM puts). The fused all-reduce +
RMSNorm kernel's tests need JAXNVRAR_FUSED_NORM=1, the dense kernel's JAXNVRAR_DENSE_BYTES (both
opt-in; run.py sets them), else they skip.

On one GPU, `jaxnvrar-launch -n 2 --gpus 1` runs two ranks on it (start CUDA MPS first so that
their kernels run side by side). NCCL refuses ranks that share a GPU, so there the psum and
reference results come from this process's CPU devices (tests/helpers.py), and the tests that
need XLA's collectives on the GPUs are skipped.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import jaxnvrar
from helpers import mesh_1d, run_per_rank, xla_collectives_mesh
from jaxnvrar.distributed import ranks_share_gpus
from jaxnvrar.runtime import fits_workspace
from jaxnvrar.schedule import KernelConfig, dense_fits, dense_inbox_bytes, workspace_bytes_needed
from jaxnvrar import tuning
from jaxnvrar.tuning import kernel_config_override

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("nvshmem_runtime")]

DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]
# 1 element to 64 MB (of float32), odd sizes among them.
SIZES = [1, 3, 7, 8, 1000, 4097, (1 << 16) + 3, 1 << 20, 16 << 20]


def _topologies():
    n = jax.device_count()
    return sorted({(n, n), (n, 1)} | ({(n, 2)} if n % 2 == 0 else set()))


def _reduce(algorithm, gpus_per_node):
    return lambda a: jaxnvrar.all_reduce(a, "x", algorithm=algorithm, gpus_per_node=gpus_per_node)


def _host(num_ranks, size, dtype, seed=0):
    rng = np.random.default_rng(seed + size)
    return rng.standard_normal((num_ranks, size)).astype(jnp.dtype(dtype))


def _skip_unless_workspace_holds(size, dtype, topologies):
    itemsize = jnp.dtype(dtype).itemsize
    for num_ranks, gpus_per_node in topologies:
        topology = jaxnvrar.Topology(num_ranks, gpus_per_node)
        if not fits_workspace(size, itemsize, topology):
            need = workspace_bytes_needed(size, itemsize, topology)
            groupings = jaxnvrar.runtime.groupings()  # each grouping has its share of the workspace
            region = 1 << (need - 1).bit_length()  # a region's size: a power of two, so 4 KiB aligned
            pytest.skip(f"{size * itemsize} B on {num_ranks} ranks ({gpus_per_node} per node) needs {need} B of "
                        f"workspace per grouping; set JAXNVRAR_WORKSPACE_BYTES={region * groupings} "
                        f"(JAXNVRAR_GROUPINGS={groupings}) to run it")


def _assert_replicas_identical(out):
    for r in range(1, out.shape[0]):
        assert out[r].tobytes() == out[0].tobytes(), f"rank {r} differs from rank 0"


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
def test_matches_psum_and_reference(size, dtype):
    if size == SIZES[-1] and dtype != jnp.float32:
        size = 32 << 20  # 64 MB in the 16-bit types too
    num_ranks = jax.device_count()
    _skip_unless_workspace_holds(size, dtype, _topologies())
    mesh = mesh_1d(num_ranks)
    host = _host(num_ranks, size, dtype)
    peers = xla_collectives_mesh(num_ranks)
    expected = run_per_rank(_reduce("psum", None), host, peers).astype(np.float64)
    eps = float(jnp.finfo(dtype).eps)
    for topology in _topologies():
        gpus_per_node = topology[1]
        out = run_per_rank(_reduce("nvrar", gpus_per_node), host, mesh)
        _assert_replicas_identical(out)
        np.testing.assert_allclose(out.astype(np.float64), expected, rtol=4 * eps * num_ranks,
                                   atol=16 * eps * num_ranks, err_msg=f"topology {topology}")
        # Same schedule, same float32 accumulation and rounding: the reference agrees bit for bit.
        reference = run_per_rank(_reduce("reference", gpus_per_node), host, peers)
        assert out.tobytes() == reference.tobytes(), f"nvrar != reference for topology {topology}"


# Each kernel configuration pinned: the two-shot LL one (which the built-in table no longer picks
# on one node of 2 H200s), one-shot (one node), bulk (any topology), both; few blocks make every
# thread take several cells/chunks.
@pytest.fixture(autouse=True)
def _dense_needs_its_inboxes(request):
    if "dense" in request.node.name and not tuning.dense_inboxes():
        pytest.skip("the dense kernel is opt-in: run with JAXNVRAR_DENSE_BYTES=67108864 (tests/gpu/run.py does)")


LAUNCHES = ["128", "128-1shot", "128-bulk", "128-1shot-bulk", "3-bulk", "5-1shot", "128-1shot-dense", "5-1shot-dense",
            "128-dense", "5-dense", "128-pull", "128-1shot-pull", "3-pull", "5-1shot-pull"]
LAUNCH_SIZES = [1, 7, 4097, (1 << 16) + 3, 1 << 20, 4 << 20]


@pytest.mark.parametrize("launch", LAUNCHES)
@pytest.mark.parametrize("size", LAUNCH_SIZES)
@pytest.mark.parametrize("dtype", DTYPES[:2], ids=lambda d: jnp.dtype(d).name)
def test_other_launches_give_the_same_bits(launch, size, dtype):
    # Same schedule, same sums in the same order: bit for bit the reference's.
    num_ranks = jax.device_count()
    mesh = mesh_1d(num_ranks)
    host = _host(num_ranks, size, dtype)
    before = jaxnvrar.runtime.dense_calls()
    with kernel_config_override(KernelConfig.parse(launch)):
        out = run_per_rank(_reduce("nvrar", num_ranks), host, mesh)
        _assert_dense_ran(launch, size, dtype, num_ranks, before)
        # Across "nodes": bulk runs there too (with JAXNVRAR_FORCE_PUT=1 through puts with signal);
        # one-shot falls back to the full schedule. The bits agree either way.
        across = run_per_rank(_reduce("nvrar", 1), host, mesh) if num_ranks > 1 else None
    _assert_replicas_identical(out)
    peers = xla_collectives_mesh(num_ranks)
    assert out.tobytes() == run_per_rank(_reduce("reference", num_ranks), host, peers).tobytes()
    if across is not None:
        assert across.tobytes() == run_per_rank(_reduce("reference", 1), host, peers).tobytes()


@pytest.mark.parametrize("launch", LAUNCHES)
def test_launches_replay_and_alternate_with_the_default(launch):
    # Consecutive calls switch topologies (one node, then "nodes" of one GPU), so launches change
    # from call to call: all of them share the call counter and the halves of the workspace.
    num_ranks = jax.device_count()
    mesh = mesh_1d(num_ranks)

    def chain(a):
        for i in range(8):
            a = jaxnvrar.all_reduce(a, "x", algorithm="nvrar", gpus_per_node=num_ranks if i % 2 else 1)
            a = lax.pcast(a / num_ranks, "x", to="varying")
        return a

    with kernel_config_override(KernelConfig.parse(launch)):
        for run in range(10):
            host = _host(num_ranks, 5000 + 4099 * run, jnp.float32, seed=run)
            out = run_per_rank(chain, host, mesh)
            np.testing.assert_allclose(out[0], host.mean(0), rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(ranks_share_gpus(), reason="psum on the GPUs: NCCL refuses ranks that share a GPU")
def test_scan_over_layers_mixed_with_psum():
    num_ranks = jax.device_count()
    mesh = mesh_1d(num_ranks)
    host = _host(num_ranks, 4096, jnp.float32)

    def layers(algorithm):
        def body(carry, scale):
            h = jaxnvrar.all_reduce(carry * scale, "x", algorithm=algorithm, gpus_per_node=1)
            h = h + lax.psum(carry[:1], "x")  # another XLA collective in the same program
            return lax.pcast(h / num_ranks, "x", to="varying"), None

        return lambda a: lax.scan(body, a, jnp.linspace(0.5, 1.5, 8))[0]

    out = run_per_rank(layers("nvrar"), host, mesh)
    expected = run_per_rank(layers("psum"), host, mesh)
    _assert_replicas_identical(out)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_ten_thousand_consecutive_calls_and_two_call_sites():
    num_ranks = jax.device_count()
    mesh = mesh_1d(num_ranks)
    varying = lambda v: lax.pcast(v, "x", to="varying")

    def run(a):
        def body(_, carry):
            x, y = carry
            # Two call sites of different sizes and topologies, interleaved; values stay exact.
            x = varying(jaxnvrar.all_reduce(x, "x", algorithm="nvrar") / num_ranks)
            y = varying(jaxnvrar.all_reduce(y, "x", algorithm="nvrar", gpus_per_node=1) / num_ranks)
            return x + 1, y + 1

        x, y = lax.fori_loop(0, 5000, body, (a, varying(jnp.ones(70001, a.dtype))))
        return x + y[:3]

    out = run_per_rank(run, np.ones((num_ranks, 3), np.float32), mesh)
    np.testing.assert_array_equal(out, np.full((num_ranks, 3), 2 * 5001, np.float32))


@pytest.mark.parametrize("config", ["128-1shot-bulk", "128-bulk", "128-1shot-pull", "128-pull", "128-1shot", "128"])
def test_calls_of_other_sizes_never_write_where_a_peer_still_reads(config):
    # Calls of 1 MB and 384 KB, only kernels, so ranks drift apart. When the second workspace
    # half started after the call's own layout, such a pair overlapped (either order) whenever
    # the larger call ran in half 0; at this ratio (3/8) for every configuration here, on 2 GPUs.
    # One call could then write where a slower peer still read the other: a wrong sum, or a wait
    # that timed out. Three calls per round (large, small, small), so that the large call runs
    # in both halves. (On the old halves, with two ranks sharing one H200 and 1 MB / 128 KB in
    # pairs, the bulk and pull cases passed, 2026-12-02: sharing a GPU did not provoke it.)
    num_ranks = jax.device_count()
    mesh = mesh_1d(num_ranks)
    large, small, calls = 1 << 18, 3 << 15, 200  # float32 elements; exact small-integer sums
    total = num_ranks * (num_ranks + 1) // 2

    def run(_):
        rank = lax.axis_index("x").astype(jnp.float32) + 1
        big_pattern = jnp.arange(large, dtype=jnp.int32) % 251 + 1
        small_pattern = jnp.arange(small, dtype=jnp.int32) % 13 + 1

        def body(i, wrong):
            big_scale, small_scale = i % 16 + 1, i % 9 + 1
            big = jaxnvrar.all_reduce(rank * (big_scale * big_pattern).astype(jnp.float32), "x",
                                      algorithm="nvrar", gpus_per_node=num_ranks)
            little = jaxnvrar.all_reduce(rank * (small_scale * small_pattern).astype(jnp.float32), "x",
                                         algorithm="nvrar", gpus_per_node=num_ranks)
            again = jaxnvrar.all_reduce(lax.pcast(little / total, "x", to="varying"), "x", algorithm="nvrar",
                                        gpus_per_node=num_ranks)
            want_big = (total * big_scale * big_pattern).astype(jnp.float32)
            want_small = (total * small_scale * small_pattern).astype(jnp.float32)
            return (wrong + jnp.sum(big != want_big, dtype=jnp.int32) + jnp.sum(little != want_small, dtype=jnp.int32)
                    + jnp.sum(again != num_ranks * want_small / total, dtype=jnp.int32))

        return lax.fori_loop(0, calls, body, lax.pcast(jnp.int32(0), "x", to="varying"))[None]

    with kernel_config_override(config):
        out = run_per_rank(run, np.zeros((num_ranks, 1), np.float32), mesh)
    assert (out == 0).all(), f"{out.tolist()} elements of {calls} rounds of three calls were wrong"


@pytest.mark.parametrize("config", ["128-1shot", "128-bulk", "128-pull", "128-1shot-bulk"])
def test_all_reduces_over_both_axes_of_a_2d_mesh_keep_their_own_workspace_regions(config):
    # A 2 x (n/2) mesh of processes, all-reduces over "a" and over "b" in turn, of two sizes: two
    # groupings of ranks. Each has its own call counter and halves (JAXNVRAR_GROUPINGS regions):
    # with one shared counter a rank between calls over both axes could run two calls of one
    # grouping ahead of a peer and overwrite what it still read. Every element of every call checked.
    num_ranks = jax.device_count()
    if num_ranks < 4 or num_ranks % 2:
        pytest.skip("needs 4+ ranks (an even number): a 2-D mesh of processes with both axes > 1")
    mesh = jax.make_mesh((2, num_ranks // 2), ("a", "b"), devices=jax.devices())
    from jaxnvrar import nvrar_ffi, primitive
    known = set(nvrar_ffi._grouping_regions)
    needed = known | {nvrar_ffi.grouping_key(nvrar_ffi._pe_groups(primitive._axis_groups(mesh, axis), num_ranks))
                      for axis in ("a", "b")}
    if len(needed) > jaxnvrar.runtime.groupings():
        pytest.skip(f"needs JAXNVRAR_GROUPINGS >= {len(needed)} (tests/gpu/run.py and on_one_gpu.sh set 4 for 4+ ranks)")
    na, nb = mesh.devices.shape
    large, small, calls = 1 << 18, 3 << 15, 200  # float32 elements; exact small-integer sums

    def run(_):
        ia = lax.axis_index("a").astype(jnp.float32)
        ib = lax.axis_index("b").astype(jnp.float32)
        mine = ia * nb + ib + 1
        want_a = nb * na * (na - 1) / 2 + na * (ib + 1)  # sum of `mine` over "a"
        want_b = nb * (ia * nb + 1) + nb * (nb - 1) / 2  # over "b"
        big_pattern = (jnp.arange(large, dtype=jnp.int32) % 251 + 1).astype(jnp.float32)
        small_pattern = (jnp.arange(small, dtype=jnp.int32) % 13 + 1).astype(jnp.float32)

        def body(i, wrong):
            scale = (i % 7 + 1).astype(jnp.float32)
            a_big = jaxnvrar.all_reduce(mine * scale * big_pattern, "a", algorithm="nvrar")
            b_small = jaxnvrar.all_reduce(mine * scale * small_pattern, "b", algorithm="nvrar")
            a_small = jaxnvrar.all_reduce(mine * scale * small_pattern, "a", algorithm="nvrar")
            b_big = jaxnvrar.all_reduce(mine * scale * big_pattern, "b", algorithm="nvrar")
            return (wrong + jnp.sum(a_big != want_a * scale * big_pattern, dtype=jnp.int32)
                    + jnp.sum(b_small != want_b * scale * small_pattern, dtype=jnp.int32)
                    + jnp.sum(a_small != want_a * scale * small_pattern, dtype=jnp.int32)
                    + jnp.sum(b_big != want_b * scale * big_pattern, dtype=jnp.int32))

        zero = lax.pcast(jnp.int32(0), ("a", "b"), to="varying")
        return lax.fori_loop(0, calls, body, zero)[None]

    with kernel_config_override(config):
        out = run_per_rank(run, np.zeros((num_ranks, 1), np.float32), mesh, axis=("a", "b"))
    assert (out == 0).all(), f"{out.tolist()} elements of {calls} rounds of four calls were wrong"


def test_command_buffer_replay_advances_flags():
    # Re-running one compiled program replays its command buffer (CUDA graph; the suite runs
    # with --xla_gpu_graph_min_graph_size=1 so even small programs are captured). The kernel
    # must take a new flag on every replay, or it would read the previous run's cells.
    num_ranks = jax.device_count()
    mesh = mesh_1d(num_ranks)

    def chain(a):
        for _ in range(8):
            a = lax.pcast(jaxnvrar.all_reduce(a, "x", algorithm="nvrar") / num_ranks, "x", to="varying")
        return a

    for run in range(20):
        host = _host(num_ranks, 5000, jnp.float32, seed=run)
        out = run_per_rank(chain, host, mesh)
        np.testing.assert_allclose(out[0], host.mean(0), rtol=1e-5, atol=1e-6)


# The dense kernel (csrc/protocol_dense.cuh): no flags, an empty slot is all ones. Many calls of
# several sizes, every element of every call checked against the reference (same sums: same
# bits), so that a slot read before its data landed, or a stale one from two calls back, shows.
def _assert_dense_ran(label: str, size: int, dtype, num_ranks: int, before: int, calls: int = 1) -> None:
    """A dense configuration's one-node calls of `size` elements ran the dense kernel where the
    message fits its inboxes (else bulk)."""
    config = KernelConfig.parse(label)
    if config.dense:
        fits = dense_fits(size, jnp.dtype(dtype).itemsize, num_ranks, config.one_shot,
                          jaxnvrar.runtime.settings().dense_bytes)
        want = calls if fits else 0
        assert jaxnvrar.runtime.dense_calls() - before == want, f"{label}, {size} elements: dense calls != {want}"


def _dense_sizes(dtype, num_ranks, one_shot):
    # Random sizes up to 1 MB, and the largest message the dense inboxes hold (larger ones run as
    # bulk, which the launch tests cover): one-shot, the message fits an inbox; two-shot, a slice.
    inbox = dense_inbox_bytes(jaxnvrar.runtime.settings().dense_bytes, num_ranks, one_shot)
    largest = max(1, inbox * (1 if one_shot else num_ranks) // jnp.dtype(dtype).itemsize)
    rng = np.random.default_rng(7)
    return [int(s) for s in rng.integers(1, 1 << 20, size=4)] + [largest]


@pytest.mark.parametrize("config", ["128-1shot-dense", "128-dense"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
def test_dense_every_element_of_many_calls(dtype, config):
    num_ranks = jax.device_count()
    mesh = mesh_1d(num_ranks)
    uint = {2: jnp.uint16, 4: jnp.uint32}[jnp.dtype(dtype).itemsize]
    calls, scales = 400, 16

    # Call i sums a * (i % 16 + 1): the reference's 16 sums, computed once where XLA's collectives
    # run (this process's CPU devices where ranks share a GPU), are the expected bits.
    def references(a):
        return jnp.concatenate([jaxnvrar.all_reduce(a * jnp.asarray(s, a.dtype), "x", algorithm="reference",
                                                    gpus_per_node=num_ranks) for s in range(1, scales + 1)])

    def run(row):
        n = row.shape[0] // (scales + 1)
        a, expected = row[:n], row[n:].reshape(scales, n)

        def body(i, differing):
            scaled = a * (i % scales + 1).astype(a.dtype)  # new values every call
            ours = jaxnvrar.all_reduce(scaled, "x", algorithm="nvrar", gpus_per_node=num_ranks)
            want = lax.dynamic_index_in_dim(expected, i % scales, keepdims=False)
            same = lax.bitcast_convert_type(ours, uint) == lax.bitcast_convert_type(want, uint)
            return differing + jnp.sum(~same, dtype=jnp.int32)
        # The expected sums are this rank's input: the count varies over ranks.
        return lax.fori_loop(0, calls, body, lax.pcast(jnp.int32(0), "x", to="varying"))[None]

    with kernel_config_override(config):
        for size in _dense_sizes(dtype, num_ranks, KernelConfig.parse(config).one_shot):
            host = _host(num_ranks, size, dtype, seed=size)
            want = run_per_rank(references, host, xla_collectives_mesh(num_ranks))
            before = jaxnvrar.runtime.dense_calls()
            out = run_per_rank(run, np.concatenate([host, want], axis=1), mesh)
            assert (out == 0).all(), f"{size} elements: {out.tolist()} elements of {calls} calls differ from the reference"
            assert jaxnvrar.runtime.dense_calls() - before == calls, "the dense kernel did not run (fell back to bulk)"


def test_dense_calls_back_to_back_with_other_kernels():
    # Only kernel calls, ranks free to drift apart: three dense sites (one-shot and two-shot, which
    # share the inboxes) and an LL site take turns (a tuning table picks each site's configuration by size); exact small
    # integers, a new expected sum every call (a stale slot from two dense calls back holds another).
    num_ranks = jax.device_count()
    mesh = mesh_1d(num_ranks)
    total = num_ranks * (num_ranks + 1) // 2
    sites = {70001: "128-1shot-dense", 5: "128", 1 << 18: "64-dense", 3 << 20: "64-1shot-dense"}  # float32 elements
    table = tuning.Table()
    key = tuning.entry_key(jax.devices()[0].device_kind, jaxnvrar.Topology(num_ranks, num_ranks), "float32")
    for size, label in sites.items():
        table.record(key, 4 * size, psum_us=1e9, nvrar_us_by_config={KernelConfig.parse(label): 1.0})

    def run(ranks):
        def body(i, errors):
            for k, size in enumerate(sites):
                shift = ((3 * i + k) % 7).astype(jnp.float32)  # consecutive dense calls expect different sums
                out = jaxnvrar.all_reduce(jnp.broadcast_to(ranks[0] + shift, (size,)), "x", algorithm="nvrar",
                                          gpus_per_node=num_ranks)
                errors = errors + jnp.sum(out != total + num_ranks * shift, dtype=jnp.int32)
            return errors
        return lax.fori_loop(0, 2000, body, jnp.int32(0))[None]

    saved = tuning.active()
    tuning.use(table)
    before = jaxnvrar.runtime.dense_calls()
    try:
        out = run_per_rank(run, np.arange(1, num_ranks + 1, dtype=np.float32)[:, None], mesh)
    finally:
        tuning.use(saved)
    assert (out == 0).all(), f"wrong elements: {out.tolist()}"
    region = jaxnvrar.runtime.settings().dense_bytes
    fitting = sum(dense_fits(size, 4, num_ranks, KernelConfig.parse(label).one_shot, region)
                  for size, label in sites.items() if "dense" in label)
    assert jaxnvrar.runtime.dense_calls() - before == 2000 * fitting


@pytest.mark.parametrize("config", ["128-1shot-dense", "128-dense"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
def test_dense_passes_sentinel_valued_inputs(dtype, config):
    # Inputs whose bits are the empty-slot pattern (all ones: a NaN) must not hang or be taken for
    # "not yet arrived": they are sent as another NaN; the sum there is NaN, elsewhere exact.
    num_ranks = jax.device_count()
    mesh = mesh_1d(num_ranks)
    itemsize = jnp.dtype(dtype).itemsize
    uint = {2: np.uint16, 4: np.uint32}[itemsize]
    host = _host(num_ranks, 100003, dtype, seed=3)
    bits = host.view(uint)
    bits[:, 3::11] = 1 << (8 * itemsize - 1)  # -0.0
    bits[:, ::7] = np.iinfo(uint).max  # the sentinel in every 7th element of every rank
    before = jaxnvrar.runtime.dense_calls()
    with kernel_config_override(config):
        out = run_per_rank(_reduce("nvrar", num_ranks), host, mesh)
    _assert_dense_ran(config, host.shape[1], dtype, num_ranks, before)
    expected = run_per_rank(_reduce("reference", num_ranks), host, xla_collectives_mesh(num_ranks))
    nan = np.isnan(expected.astype(np.float32))
    assert nan[:, ::7].all()
    np.testing.assert_array_equal(np.isnan(out.astype(np.float32)), nan)
    assert out[~nan].tobytes() == expected[~nan].tobytes()
    _assert_replicas_identical(out)  # NaNs included: two-shot sends every replica the same bits


def test_auto_picks_nvrar_for_small_messages_and_psum_for_large():
    topology = jaxnvrar.Topology(jax.device_count(), 1)
    assert jaxnvrar.choose_algorithm(1 << 16, jnp.bfloat16, topology) == "nvrar"
    assert jaxnvrar.choose_algorithm(8 << 20, jnp.bfloat16, topology) == "psum"


def test_message_larger_than_workspace_names_the_variable():
    num_ranks = jax.device_count()
    mesh = mesh_1d(num_ranks)
    too_big = jaxnvrar.runtime.workspace_bytes() // 4 + 1
    spec = jax.ShapeDtypeStruct((num_ranks, too_big), jnp.float32,
                                sharding=jax.NamedSharding(mesh, jax.P("x")))
    with pytest.raises(ValueError, match="JAXNVRAR_WORKSPACE_BYTES"):
        fn = jax.shard_map(lambda a: _reduce("nvrar", 1)(a[0])[None], mesh=mesh,
                           in_specs=jax.P("x"), out_specs=jax.P("x"))
        with jax.set_mesh(mesh):
            jax.jit(fn).lower(spec)


# ---------------------------------------------------------------- all_reduce_rms_norm's kernel

# rows x hidden: the Llama 3.1 8B decode messages at batch 1 / 16 / 64, the 1B's at 7 rows, and a
# tiny hidden (one 16-byte vector per row in 16-bit dtypes).
FUSED_SHAPES = [(1, 4096), (16, 4096), (64, 4096), (7, 2048), (3, 8)]
FUSED_LAUNCHES = ["128-1shot", "128-1shot-bulk", "128", "128-bulk", "3-bulk", "5-1shot", "128-pull", "128-1shot-pull"]


@pytest.fixture
def fused_kernel():
    """The fused kernel is opt-in, read at jaxnvrar.initialize(): without it these tests would
    compare the composition with itself."""
    if not jaxnvrar.runtime.settings().fused_norm:
        pytest.skip("the fused kernel is opt-in: run with JAXNVRAR_FUSED_NORM=1 (tests/gpu/run.py does)")


# Largest fused message over "nodes" of one GPU tried where ranks share a GPU (the grid barrier).
_SHARED_GRID_BYTES = 128 * 1024


def _fused_host(num_ranks, rows, hidden, dtype, seed=0):
    """Per rank: its partial sum x, then the residual and the weight (alike on every rank)."""
    rng = np.random.default_rng(seed + rows * hidden)
    x = rng.standard_normal((num_ranks, rows * hidden))
    residual = np.broadcast_to(3 * rng.standard_normal(rows * hidden), (num_ranks, rows * hidden))
    weight = np.broadcast_to(1 + 0.1 * rng.standard_normal(hidden), (num_ranks, hidden))
    return np.concatenate([x, residual, weight], axis=1).astype(jnp.dtype(dtype))


def _fused_reduce(algorithm, rows, hidden, gpus_per_node, eps=1e-5):
    def fn(a):
        x = a[: rows * hidden].reshape(rows, hidden)
        residual = a[rows * hidden : 2 * rows * hidden].reshape(rows, hidden)
        normed, residual_out = jaxnvrar.all_reduce_rms_norm(x, residual, a[2 * rows * hidden :], "x", eps=eps,
                                                            algorithm=algorithm, gpus_per_node=gpus_per_node)
        return jnp.concatenate([normed.ravel(), residual_out.ravel()])

    return fn


@pytest.mark.parametrize("launch", FUSED_LAUNCHES)
@pytest.mark.parametrize("shape", FUSED_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
def test_fused_rms_norm_kernel_matches_the_composition(launch, shape, dtype, fused_kernel):
    # residual_out: the kernel's sum (the reference's bits) plus the residual, bit for bit; normed:
    # XLA's norm of the same values, within a rounding (the mean of squares sums in another
    # order), and the same bits on every rank. One node, and "nodes" of one GPU (grid barrier).
    rows, hidden = shape
    num_ranks = jax.device_count()
    mesh, peers = mesh_1d(num_ranks), xla_collectives_mesh(num_ranks)
    host = _fused_host(num_ranks, rows, hidden, dtype)
    n = rows * hidden
    topologies = sorted({num_ranks, 1})
    # "Nodes" of one GPU meet at a grid barrier: each rank's grid must be resident at once while
    # it waits for the other ranks' data. Ranks sharing one GPU cannot all hold grids of this size
    # (seen on one H200 under MPS, 2026-12-01: 512 KB hangs at 100% of the SMs, 256 KB at 50%).
    shared_grid_too_big = ranks_share_gpus() and num_ranks > 1 and n * jnp.dtype(dtype).itemsize > _SHARED_GRID_BYTES
    if shared_grid_too_big:
        topologies = [num_ranks]
    for gpus_per_node in topologies:
        with kernel_config_override(KernelConfig.parse(launch)):
            got = run_per_rank(_fused_reduce("nvrar", rows, hidden, gpus_per_node), host, mesh)
        want = run_per_rank(_fused_reduce("reference", rows, hidden, gpus_per_node), host, peers)
        _assert_replicas_identical(got)
        where = f"{gpus_per_node} GPU(s) per node"
        assert got[:, n:].tobytes() == want[:, n:].tobytes(), f"residual_out differs ({where})"
        eps = float(jnp.finfo(dtype).eps)
        np.testing.assert_allclose(got[:, :n].astype(np.float64), want[:, :n].astype(np.float64),
                                   rtol=2 * eps, atol=2 * eps, err_msg=f"normed ({where})")
    if shared_grid_too_big:
        pytest.skip(f"one node passed; {n * jnp.dtype(dtype).itemsize} B over nodes of one GPU needs every rank's "
                    "grid resident at once, which ranks sharing one GPU cannot give (run it on one GPU per rank)")


def test_fused_rms_norm_is_one_kernel_call(fused_kernel):
    num_ranks = jax.device_count()
    mesh = mesh_1d(num_ranks)
    fn = jax.shard_map(lambda a: _fused_reduce("nvrar", 16, 4096, num_ranks)(a[0])[None], mesh=mesh,
                       in_specs=jax.P("x"), out_specs=jax.P("x"))
    spec = jax.ShapeDtypeStruct((num_ranks, 2 * 16 * 4096 + 4096), jnp.bfloat16,
                                sharding=jax.NamedSharding(mesh, jax.P("x")))
    with jax.set_mesh(mesh):
        text = jax.jit(fn).lower(spec).as_text()
    assert text.count("jaxnvrar_nvrar_all_reduce_rms_norm") == 1
    assert "@jaxnvrar_nvrar_all_reduce(" not in text and "rsqrt" not in text


@pytest.mark.parametrize("launch", ["128-1shot", "128-bulk"])
def test_fused_rms_norm_in_a_long_scan_stays_exact(launch, fused_kernel):
    # 500 fused calls in one program (one command buffer, replayed): the grid barrier's counter
    # and the flags advance call after call; every rank keeps the same bits throughout.
    num_ranks = jax.device_count()
    mesh = mesh_1d(num_ranks)
    rows, hidden = 16, 4096

    def layers(algorithm):
        def run(a):
            x, weight = a[: rows * hidden].reshape(rows, hidden), a[rows * hidden :]

            def body(carry, _):
                x, residual = carry
                normed, residual = jaxnvrar.all_reduce_rms_norm(x, residual, weight, "x", algorithm=algorithm)
                return (normed / num_ranks, residual / 2), None  # varying: the residual is

            (x, residual), _ = lax.scan(body, (x, jnp.zeros_like(x)), None, length=500)
            return jnp.concatenate([x.ravel(), residual.ravel()])

        return run

    host = np.concatenate([np.random.default_rng(9).standard_normal((num_ranks, rows * hidden)),
                           np.ones((num_ranks, hidden))], axis=1).astype(np.float32)
    with kernel_config_override(KernelConfig.parse(launch)):
        got = run_per_rank(layers("nvrar"), host, mesh)
    want = run_per_rank(layers("reference"), host, xla_collectives_mesh(num_ranks))
    _assert_replicas_identical(got)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("batch", [1, 16])
def test_a_decode_step_compiles_to_one_kernel_call_per_all_reduce(batch, fused, monkeypatch):
    # Two all-reduces per layer and one for the greedy token, no more: XLA must not duplicate the
    # side-effecting custom calls (it did, for a fused call with a tuple result at batch 1: hence
    # the fused call's single [2, ...] result).
    pytest.importorskip("flax")
    import dataclasses
    import re

    from jaxnvrar.models import llama
    from jaxnvrar.models.llama import decoding

    snapshot = jaxnvrar.runtime.settings()
    if fused and not snapshot.fused_norm:
        pytest.skip("the fused kernel is opt-in: run with JAXNVRAR_FUSED_NORM=1 (tests/gpu/run.py does)")
    # The route reads the settings taken at initialize(): this test's choice, for its own traces.
    state = jaxnvrar.runtime._state
    monkeypatch.setattr(jaxnvrar.runtime, "_state",
                        dataclasses.replace(state, settings=dataclasses.replace(snapshot, fused_norm=int(fused))))
    layers = 2
    mesh = llama.make_mesh(jax.device_count())
    model = llama.random_model("llama3.1-8b", mesh, all_reduce="nvrar", num_layers=layers)
    prompt = llama.replicated(mesh, np.zeros((batch, 16), np.int32))
    caches = llama.init_cache(model, batch, 24)
    token, _, caches, position = llama.prefill(model, prompt, caches)
    history = llama.start_history(prompt, token, 4)
    leaves, step = decoding._compiled_advance(model)
    with jax.set_mesh(mesh):
        text = step.lower(leaves, history, caches, position).compile().as_text()
    targets = re.findall(r'custom_call_target="(jaxnvrar_nvrar_all_reduce(?:_rms_norm)?)"', text)
    assert len(targets) == 2 * layers + 1, sorted(targets)
