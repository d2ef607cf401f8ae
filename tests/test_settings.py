"""Every JAXNVRAR_* setting is declared once (settings.SETTINGS) and read into one snapshot."""

import dataclasses
import pathlib
import re

import pytest

import jaxnvrar
from jaxnvrar import settings


def test_the_snapshot_has_one_field_per_setting_with_its_default():
    fields = {f.name: f.default for f in dataclasses.fields(settings.Settings)}
    assert fields == {s.field: s.default for s in settings.SETTINGS}
    assert settings.read({}) == settings.Settings()


def test_values_are_parsed_and_bad_ones_named():
    snapshot = settings.read({"JAXNVRAR_MAX_BLOCKS": "64", "JAXNVRAR_TIMEOUT_S": "2.5", "JAXNVRAR_NETWORK": "slingshot"})
    assert (snapshot.max_blocks, snapshot.timeout_s, snapshot.network) == (64, 2.5, "slingshot")
    assert snapshot.lowering()["JAXNVRAR_MAX_BLOCKS"] == 64 and "JAXNVRAR_TIMEOUT_S" not in snapshot.lowering()
    # Compared across processes at start: the lowering settings and the call counter's start
    # (flags come from it), not the timeout (each process may wait as long as it likes).
    agreed = snapshot.agreed()
    assert set(snapshot.lowering()) < set(agreed) and "JAXNVRAR_FIRST_CALL" in agreed
    assert "JAXNVRAR_TIMEOUT_S" not in agreed and "JAXNVRAR_FIRST_CALL" not in snapshot.lowering()
    with pytest.raises(ValueError, match=r"JAXNVRAR_NETWORK='ib': choose one of \['ndr', 'slingshot'\]"):
        settings.read({"JAXNVRAR_NETWORK": "ib"})
    assert settings.problems({"JAXNVRAR_BULK": "2", "JAXNVRAR_ONE_SHOT": "1"}) == {
        "JAXNVRAR_BULK": "JAXNVRAR_BULK='2': expected a int in [0, 1]"}


def test_dense_inboxes_are_none_or_at_least_a_mebibyte():
    assert settings.read({"JAXNVRAR_DENSE_BYTES": "0"}).dense_bytes == 0
    assert settings.read({}).dense_bytes == 0 and settings.read({}).lowering()["JAXNVRAR_DENSE_BYTES"] == 0  # opt-in
    assert settings.read({"JAXNVRAR_DENSE_BYTES": str(64 << 20)}).dense_bytes == 64 << 20
    with pytest.raises(ValueError, match=r"JAXNVRAR_DENSE_BYTES='4096': expected a int 0 \(none\) or >= 1048576"):
        settings.read({"JAXNVRAR_DENSE_BYTES": "4096"})
    assert "0 (none) or >= 1048576" in settings.problems({"JAXNVRAR_DENSE_BYTES": "4096"})["JAXNVRAR_DENSE_BYTES"]


def test_the_package_version_is_pyprojects():
    pyproject = (pathlib.Path(__file__).resolve().parent.parent / "pyproject.toml").read_text()
    assert re.search(r'^version = "(.*)"$', pyproject, re.M).group(1) == jaxnvrar.__version__
