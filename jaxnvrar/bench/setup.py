"""Bring up the devices a benchmark runs on: GPUs (one process each) or virtual CPU devices."""

from __future__ import annotations

import os

import jax

import jaxnvrar


def bring_up(cpu_devices: int = 8) -> str:
    """Initialise jax.distributed (under jaxnvrar-launch) and NVSHMEM (on GPUs); returns a
    one-line description of the devices."""
    if "JAXNVRAR_NUM_PROCESSES" in os.environ:
        jaxnvrar.initialize_distributed()
    else:
        jax.config.update("jax_num_cpu_devices", cpu_devices)
    note = ""
    if jax.default_backend() == "gpu":
        if jaxnvrar.cuda_available():
            jaxnvrar.initialize()
        else:
            note = " (CUDA part not built: nvrar unavailable)"
    device = jax.devices()[0]
    return (f"{jax.device_count()} x {device.device_kind} ({jax.default_backend()}) in "
            f"{jax.process_count()} process(es), jax {jax.__version__}{note}")


def is_printer() -> bool:
    return jax.process_index() == 0
