"""tests/gpu/two_gpu_agenda.sh runs only on a 2-GPU machine, which is lent rarely: check here that
every benchmark command in it still parses (options, kernel configuration labels, presets), so that
a renamed option does not waste that machine's time."""

import os
import pathlib
import re
import shlex
import subprocess

import pytest

from jaxnvrar.bench import allreduce, build_parser
from jaxnvrar.models.llama.config import PRESETS
from jaxnvrar.schedule import Topology
from jaxnvrar.tuning import KernelConfig

SCRIPT = pathlib.Path(__file__).parent / "gpu" / "two_gpu_agenda.sh"


def bench_commands() -> list[list[str]]:
    """Every `jaxnvrar-bench ...` of the script as an argument list, once per value of the
    `for config in ...` loop around it (the nearest one above)."""
    text = SCRIPT.read_text().replace("\\\n", " ")
    commands, configs = [], []
    for line in text.splitlines():
        loop = re.search(r"for config in ([^;]+);", line)
        if loop:
            configs = loop.group(1).split()
        if "jaxnvrar-bench " not in line or line.lstrip().startswith("#"):
            continue
        argv = shlex.split(line.split("jaxnvrar-bench ", 1)[1].replace("$out", "/tmp/agenda"))
        if any("$config" in a for a in argv):
            for value in configs:
                commands.append([a.replace("$config", value) for a in argv])
        else:
            commands.append(argv)
    return commands


def test_the_script_has_every_part():
    commands = bench_commands()
    assert {argv[0] for argv in commands} == {"soak", "allreduce", "decode"}
    assert len(commands) == 9  # two dense soaks, the sweep, two pull soaks, pull's sweep, three decode runs
    soaked = {argv[argv.index("--kernel-config") + 1] for argv in commands if argv[0] == "soak"}
    assert soaked == {"128-1shot-dense", "128-dense", "128-pull", "128-1shot-pull"}


@pytest.mark.parametrize("argv", bench_commands(), ids=lambda argv: " ".join(argv[:3]))
def test_every_benchmark_command_parses(argv, monkeypatch):
    monkeypatch.setenv("JAXNVRAR_DENSE_BYTES", "67108864")  # as the script's protocol part sets it
    args = build_parser().parse_args(argv)
    if args.command == "allreduce":
        configs = allreduce.parse_kernel_configs(args.kernel_configs, Topology(2, 2), "agenda")
        if args.peers:  # the peer sweep: every launch kind, dense included
            assert any(config.dense for config in configs) and any(config.bulk and not config.dense for config in configs)
        else:  # pull's sweep: each pull launch beside its pushed twin
            pulled = {config for config in configs if config.pull}
            assert pulled and {KernelConfig(c.max_blocks, c.one_shot, True) for c in pulled} <= set(configs)
    elif args.command == "soak":
        config = KernelConfig.parse(args.kernel_config)
        assert config.dense or config.pull
    elif args.command == "decode":
        assert args.preset in PRESETS and args.tp == 2


def test_an_unknown_part_is_refused(tmp_path):
    result = subprocess.run(["bash", str(SCRIPT), "bogus", str(tmp_path)], capture_output=True, text=True,
                            env={**os.environ})
    assert result.returncode == 2
    assert "unknown part 'bogus'" in result.stderr
