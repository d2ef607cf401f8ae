"""`python -m jaxnvrar` reports the installation without starting any device work."""

import os
import subprocess
import sys


def test_environment_report_names_versions_settings_and_the_tuning_table(tmp_path):
    env = {**os.environ, "JAXNVRAR_BULK": "1", "JAXNVRAR_TUNING_FILE": str(tmp_path / "t.json")}
    result = subprocess.run([sys.executable, "-m", "jaxnvrar"], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    for key in ("jaxnvrar:", "jax:", "CUDA extension:", "GPUs on this host:", "runtime:", "tuning table:"):
        assert key in out, out
    assert "'JAXNVRAR_BULK': '1'" in out and "not initialised" in out
    assert f"{tmp_path / 't.json'} (absent)" in out


def test_environment_info_says_when_a_tuning_table_is_unreadable(tmp_path, monkeypatch):
    from jaxnvrar import info, tuning

    (tmp_path / "t.json").write_text("{broken")
    monkeypatch.setenv(tuning.TUNING_FILE_ENV, str(tmp_path / "t.json"))
    assert "unreadable: " in info.environment_info()["tuning table"]


def test_invalid_settings_are_flagged_by_name(monkeypatch):
    from jaxnvrar import info

    monkeypatch.setenv("JAXNVRAR_ONE_SHOT", "yes")
    monkeypatch.setenv("JAXNVRAR_NETWORK", "ndr")
    settings = info.environment_info()["settings"]
    assert settings["JAXNVRAR_ONE_SHOT"].startswith("yes  <- INVALID: JAXNVRAR_ONE_SHOT='yes': expected a int")
    assert settings["JAXNVRAR_NETWORK"] == "ndr"
