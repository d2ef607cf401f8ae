"""The alpha-beta cost model: formulas, fitting, and agreement with the measured sweep."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jaxnvrar import cost_model
from jaxnvrar.cost_model import Link

SWEEP = Path(__file__).parent.parent / "docs" / "results" / "allreduce_2xH200_2026-11-23.json"
FAST, SLOW = Link(1e-6, 1 / 400e9, "test"), Link(3e-6, 1 / 50e9, "test")


def test_fit_recovers_a_known_line():
    sizes = np.array([1e3, 1e4, 1e5, 1e6, 1e7])
    link = cost_model.fit_link(sizes, 2e-6 + sizes / 100e9, "synthetic")
    assert link.alpha_s == pytest.approx(2e-6, rel=1e-6) and link.bandwidth_gbs == pytest.approx(100, rel=1e-6)
    with pytest.raises(ValueError, match="two message sizes"):
        cost_model.fit_link([1e3], [1e-6], "one point")


def test_formulas():
    assert cost_model.nvrar_time(1e6, 1, 1, FAST, SLOW) == 0.0
    assert cost_model.ring_time(1e6, 1, 1, FAST, SLOW) == 0.0
    # One node of G: no inter-node term; G nodes of one GPU: only the inter-node term.
    assert cost_model.nvrar_time(1e6, 1, 4, FAST, SLOW) == pytest.approx(2 * (1e-6 + 0.75e6 / 400e9 * 2))
    assert cost_model.nvrar_time(1e6, 4, 1, FAST, SLOW) == pytest.approx(2 * (3e-6 + 1e6 / 50e9 * 2))
    # Non-powers of two pay the fold-in and fold-out steps: 3 nodes cost as much as 4 nodes' 2 steps + 1.
    assert cost_model.nvrar_time(1e6, 3, 1, FAST, SLOW) == pytest.approx(1.5 * cost_model.nvrar_time(1e6, 4, 1, FAST, SLOW))
    # The baseline is the better of ring and tree.
    n = 1 << 17
    assert cost_model.baseline_time(n, 64, 4, FAST, SLOW) == min(
        cost_model.ring_time(n, 64, 4, FAST, SLOW), cost_model.tree_time(n, 64, 4, FAST, SLOW))


def test_fit_reproduces_the_measured_single_node_sweep():
    baseline, nvrar = cost_model.fits_from_sweep(SWEEP)
    rows = json.loads(SWEEP.read_text())["rows"]
    sizes = [r["bytes"] for r in rows if r["bytes"] <= 8 << 20]
    projected = {(p["bytes"]): p for p in cost_model.projection(sizes, [1], 2, baseline, nvrar, SLOW)}
    for r in rows:
        if r["bytes"] in projected:
            for name, key in (("nvrar", "nvrar_us"), ("psum", "baseline_us")):
                measured = r["results"][name]["us"]
                assert projected[r["bytes"]][key] == pytest.approx(measured, rel=0.35), (name, r["bytes"])


def test_cli_prints_assumptions_and_projection(tmp_path):
    out = subprocess.run([sys.executable, "-m", "jaxnvrar.bench", "model", "--fit", str(SWEEP), "--sizes", "128K",
                          "--max-nodes", "8", "--json", str(tmp_path / "p.json")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "assumed" in out.stdout and "InfiniBand NDR" in out.stdout
    rows = json.loads((tmp_path / "p.json").read_text())["rows"]
    assert [r["nodes"] for r in rows] == [1, 2, 4, 8] and all(r["speedup"] > 0 for r in rows)


def test_built_in_fits_match_the_committed_sweep():
    baseline, nvrar = cost_model.fits_from_sweep(SWEEP)
    for built_in, fitted in zip(cost_model.H200_FITS, (baseline, nvrar)):
        assert built_in.per_call_s == pytest.approx(fitted.per_call_s, rel=1e-3)
        assert built_in.intra.beta_s_per_byte == pytest.approx(fitted.intra.beta_s_per_byte, rel=1e-3)


def test_projection_across_nodes_small_messages_nvrar_large_ones_ring():
    assert cost_model.nvrar_predicted_faster(128 << 10, nodes=64, gpus_per_node=4)
    assert cost_model.nvrar_predicted_faster(1 << 20, nodes=2, gpus_per_node=4)
    assert not cost_model.nvrar_predicted_faster(2 << 20, nodes=16, gpus_per_node=4)
    assert not cost_model.nvrar_predicted_faster(64 << 20, nodes=2, gpus_per_node=8)


def test_multi_node_ring_uses_every_nic():
    # G rings side by side: the network bandwidth term shrinks with G, the latency term does not.
    one, four = (cost_model.ring_time(1 << 30, 4, g, FAST, SLOW) for g in (1, 4))
    assert four < one / 3


def test_bulk_projection_halves_the_wire_and_pays_a_fence_per_phase():
    baseline, nvrar = cost_model.H200_FITS
    inter = cost_model.NETWORKS["ndr"]
    small, large = 8 << 10, 8 << 20
    # Small messages: the assumed fences cost more than the flag bytes; large ones: half the bytes win.
    assert cost_model.nvrar_time(small, 4, 4, nvrar.intra, inter, bulk=True) > \
        cost_model.nvrar_time(small, 4, 4, nvrar.intra, inter)
    assert cost_model.nvrar_time(large, 4, 4, nvrar.intra, inter, bulk=True) < \
        0.6 * cost_model.nvrar_time(large, 4, 4, nvrar.intra, inter)
    row = cost_model.projection([2 << 20], [8], 4, baseline, nvrar, inter)[0]
    assert row["bulk_speedup"] == pytest.approx(row["baseline_us"] / row["nvrar_bulk_us"])
