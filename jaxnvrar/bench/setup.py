"""Bring up the devices a benchmark runs on: GPUs (one process each) or virtual CPU devices."""

from __future__ import annotations

import os
import sys
import warnings

import jax

import jaxnvrar
from jaxnvrar.distributed import ranks_share_gpus


def progress(label: str, done: int, total: int) -> None:
    """A progress bar on stderr (redrawn on a terminal; elsewhere only the last line)."""
    if is_printer() and (sys.stderr.isatty() or done == total):
        bar = "#" * (20 * done // total)
        print(f"\r  {label:<28} [{bar:<20}] {done}/{total}", end="" if done < total else "\n",
              file=sys.stderr, flush=True)


# What jaxnvrar warns where algorithm="auto" found no workspace region for a grouping of ranks.
PSUM_FALLBACK_WARNING = r"jaxnvrar \(algorithm='auto'\): psum instead of the kernel"


def refuse_psum_fallback() -> None:
    """Make "auto"'s fallback to psum (no workspace region left for a grouping) an error: a
    benchmark must not time psum where it says the kernel."""
    warnings.filterwarnings("error", message=PSUM_FALLBACK_WARNING, category=UserWarning)


def bring_up(cpu_devices: int = 8, timed: bool = True) -> str:
    """Initialise jax.distributed (under jaxnvrar-launch) and NVSHMEM (on GPUs); returns a
    one-line description of the devices. A `timed` benchmark refuses ranks that share a GPU
    (`jaxnvrar-launch --gpus`): its peers (NCCL) cannot run there, and its times would be
    those of one GPU's shares."""
    if timed and ranks_share_gpus():
        raise SystemExit(
            f"jaxnvrar-bench: {os.environ['JAXNVRAR_NUM_PROCESSES']} ranks share {os.environ['JAXNVRAR_GPUS']} "
            "GPU(s) (jaxnvrar-launch --gpus): psum cannot run there (NCCL refuses ranks on one GPU) and times "
            "would not be those of separate GPUs; give each rank its own GPU (soak, which only checks "
            "results, runs there)"
        )
    refuse_psum_fallback()
    if "JAXNVRAR_NUM_PROCESSES" in os.environ:
        jaxnvrar.initialize_distributed()
    else:
        jax.config.update("jax_num_cpu_devices", cpu_devices)
    note = ""
    if jax.default_backend() == "gpu":
        if jaxnvrar.cuda_available() and jax.local_device_count() == 1:
            jaxnvrar.initialize()
        elif jaxnvrar.cuda_available():  # e.g. JAXNVRAR_NO_RELAUNCH=1 for psum-xla's one-process kernel
            note = f" (one process holds {jax.local_device_count()} GPUs: nvrar needs one per process)"
        else:
            note = " (CUDA part not built: nvrar unavailable)"
    device = jax.devices()[0]
    return (f"{jax.device_count()} x {device.device_kind} ({jax.default_backend()}) in "
            f"{jax.process_count()} process(es), jax {jax.__version__}{note}")


def is_printer() -> bool:
    return jax.process_index() == 0


def parse_ints(text: str) -> list[int]:
    """Comma-separated integers ("1,16"), for options such as --batch."""
    return [int(v) for v in text.split(",")]
