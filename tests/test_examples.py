"""The scripts in examples/ run as their docstrings say (here: on virtual CPU devices)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _run(script: str, *args: str) -> str:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("JAXNVRAR_NUM_PROCESSES", None)
    result = subprocess.run([sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True,
                            timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result.stdout


def test_tensor_parallel_mlp_matches_psum():
    out = _run("tensor_parallel_mlp.py")
    assert "algorithm='auto'" in out and "algorithm='reference' (runs 'reference')" in out


def test_llama_generate_gives_psums_tokens():
    pytest.importorskip("flax")
    out = _run("llama_generate.py", "--all-reduce", "reference", "--new-tokens", "6")
    assert "same tokens as with psum: True" in out
