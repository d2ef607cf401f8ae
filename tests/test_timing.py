"""jaxnvrar.timing: the kernel's per-call stamps (JAXNVRAR_TIMING=1) parsed and summarised, on
records laid out as csrc/device_common.cuh writes them."""

import numpy as np
import pytest

from jaxnvrar import settings, timing


def _ring(calls, start=1_000_000, period=10_000, blocks=16, elements=65536):
    """A ring as the kernel leaves it: record i at slot call % RECORDS; stamps (ns) 1, 3, 6, 6,
    8, 9 us after entry; zero elsewhere."""
    words = np.zeros((timing.RECORDS, len(timing.FIELDS)), np.uint64)
    for n, call in enumerate(calls):
        entry = start + n * period
        words[call % timing.RECORDS] = [call + 1, entry, entry + 1000, entry + 3000, entry + 6000, entry + 6000,
                                        entry + 8000, blocks << 32 | elements]
    return words.astype("<u8").tobytes()


def test_phases_are_medians_of_the_stamped_spans_in_call_order():
    # Calls 4094..4099 wrap around the ring: still read back in call order.
    records = timing.parse(_ring(range(4094, 4100)))
    assert list(records["call"]) == [c + 1 for c in range(4094, 4100)]
    stats = timing.summary(records)
    assert stats["calls"] == 6 and stats["blocks"] == [16] and stats["elements"] == [65536]
    assert stats["own sends"] == pytest.approx(1.0)
    assert stats["wait for peers + transfer"] == pytest.approx(2.0)
    assert stats["all-gather"] == pytest.approx(3.0)
    assert stats["fused add + norm"] == pytest.approx(0.0)
    assert stats["rest of the grid"] == pytest.approx(2.0)
    assert stats["kernel, entry to last block"] == pytest.approx(8.0)
    assert stats["gap from the previous call"] == pytest.approx(2.0)  # 10 us apart, 8 us long


def test_gaps_only_between_consecutive_calls_and_an_empty_ring():
    stats = timing.summary(timing.parse(_ring([3, 4, 9, 10])))
    assert stats["gap from the previous call"] == pytest.approx(2.0)  # 4->9 is not a gap between calls
    # Calls come from the counter: the ring may have kept only some of them.
    assert stats["calls"] == 8 and stats["recorded"] == 4
    assert "8 calls (medians of the last 4)" in timing.format_summary("nvrar", stats)
    assert timing.summary(timing.parse(_ring([]))) == {"calls": 0}
    assert "no kernel calls" in timing.format_summary("x", {"calls": 0})
    line = timing.format_summary("nvrar", timing.summary(timing.parse(_ring(range(5)))))
    assert "wait for peers + transfer 2.00" in line and "5 calls," in line


def test_a_torn_ring_is_refused():
    with pytest.raises(ValueError, match="whole number"):
        timing.parse(b"\0" * 8 * 5)


def test_the_setting_is_off_by_default_and_checked():
    assert settings.read({}).timing == 0
    assert settings.read({"JAXNVRAR_TIMING": "1"}).timing == 1
    with pytest.raises(ValueError, match="JAXNVRAR_TIMING"):
        settings.read({"JAXNVRAR_TIMING": "2"})


def test_the_runtime_summarises_what_was_stamped_or_says_none(monkeypatch):
    from jaxnvrar import runtime

    monkeypatch.setattr(runtime, "timing_records", lambda: timing.parse(_ring(range(5))))
    assert runtime.timing_summary() == timing.summary(timing.parse(_ring(range(5))))
    monkeypatch.setattr(runtime, "timing_records", lambda: timing.parse(_ring([])))
    assert runtime.timing_summary() is None  # nothing stamped since the reset
    monkeypatch.setattr(runtime, "timing_records", lambda: None)
    assert runtime.timing_summary() is None  # timing off
