"""The README's API example runs as written, with the jax that pip installs."""

import os
import pathlib
import re
import subprocess
import sys

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def test_the_api_example_runs_as_written():
    example = re.search(r"## API\n\n```python\n(.*?)```", README.read_text(), re.S).group(1)
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAXNVRAR_")}
    env.update(JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="4")
    result = subprocess.run([sys.executable, "-c", example], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["[[4."] + ["4."] * 6 + ["4.]]"], result.stdout


def test_every_setting_is_in_the_readme_table():
    from jaxnvrar.settings import SETTINGS

    table = "\n".join(line for line in README.read_text().splitlines() if line.startswith("| `JAXNVRAR_"))
    missing = [s.name for s in SETTINGS if f"`{s.name}`" not in table and f"`_{s.name[len('JAXNVRAR_'):]}`" not in table]
    assert not missing, f"settings missing from the README's table: {missing}"
