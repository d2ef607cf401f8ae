"""What this installation and this host offer jaxnvrar: `python -m jaxnvrar` prints it.

The first thing to run when something does not work, and the thing to paste into a bug report:
versions, the CUDA part (built or not, NVSHMEM), the GPUs this host offers, the runtime's
state, every JAXNVRAR_* setting, and the tuning table "auto" will read. It starts no CUDA work:
GPUs are counted without initialising them, so it is safe next to a running job.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys

from jaxnvrar import distributed, nvrar_ffi, runtime, settings, tuning
from jaxnvrar.version import __version__


def installed_version(distribution: str) -> str | None:
    """The installed version of a distribution (pip's name), or None."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment_info() -> dict:
    import jax

    try:
        runtime.cuda_extension()
        cuda = "built"
    except ImportError as err:
        cuda = f"not built ({str(err).split(';')[0]})"
    pe, num_pes = runtime.pe()
    problems = settings.problems()
    path = tuning.default_path()
    try:
        table = tuning.Table.load(path)
        tuned = sorted(table.entries) or "none"
    except ValueError as err:
        tuned = f"unreadable: {err}"
    return {
        "jaxnvrar": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "jax": jax.__version__,
        "jaxlib": installed_version("jaxlib"),
        "jax CUDA plugin": installed_version("jax-cuda13-plugin") or installed_version("jax-cuda12-plugin"),
        "NVSHMEM (nvidia-nvshmem-cu13)": installed_version("nvidia-nvshmem-cu13"),
        "nvshmem4py": installed_version("nvshmem4py-cu13") or installed_version("nvshmem4py-cu12"),
        "CUDA extension": cuda,
        "GPUs on this host": distributed.local_gpu_count(),
        "runtime": (f"initialised: PE {pe} of {num_pes}, workspace {runtime.workspace_bytes()} B per grouping "
                    f"of ranks, {runtime.groupings()} region(s); in use: {nvrar_ffi.grouping_regions() or 'none'}"
                    if runtime.is_initialized() else "not initialised"),
        "settings": {k: (f"{v}  <- INVALID: {problems[k]}" if k in problems else v)
                     for k, v in sorted(os.environ.items()) if k.startswith("JAXNVRAR_")} or "none",
        "tuning table": f"{path} ({'present' if path.exists() else 'absent'}); entries: {tuned}",
    }


def print_environment_info(file=None) -> None:
    for key, value in environment_info().items():
        print(f"{key + ':':<31} {'not installed' if value is None else value}", file=file or sys.stdout)
