"""Where a step's time goes on the device, read from a `jax.profiler` trace.

Device kernels (the trace's "/device:GPU:N" processes) are sorted into matmul, communication
and other by name; each class's time is the union of its kernels' intervals, and idle is the
part of the step's window (first kernel start to last kernel end) that no kernel covers: on a
decode step, mostly launch and host overhead. Kernels per step are counted too, and so are the
host's launches (kernels one by one, or whole command buffers, i.e. CUDA graphs) where the
trace has the CUDA API calls.
"""

from __future__ import annotations

import contextlib
import glob
import gzip
import json
import os
import re

import jax

CLASSES = ("matmul", "communication", "other", "idle")
_COMMUNICATION = re.compile(r"nccl|nvrar|all.?reduce|all.?gather|reduce.?scatter|collective|nvshmem|ppermute",
                            re.IGNORECASE)
_MATMUL = re.compile(r"gemm|gemv|xmma|nvjet|cutlass|matmul|wgmma|cublas|\bdot\b|dot_", re.IGNORECASE)


def classify(kernel_name: str) -> str:
    if "DecodeAttention" in kernel_name:  # jaxnvrar's attention kernel: its namespace says nvrar
        return "other"
    if _COMMUNICATION.search(kernel_name):
        return "communication"
    if _MATMUL.search(kernel_name):
        return "matmul"
    return "other"


def _union_length(intervals) -> float:
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop <= end:
            continue
        total += stop - max(start, end)
        end = stop
    return total


def _device_processes(events) -> dict:
    return {e["pid"]: e["args"]["name"] for e in events
            if e.get("ph") == "M" and e.get("name") == "process_name"
            and re.search(r"/device:(GPU|TPU)", e.get("args", {}).get("name", ""))}


def device_kernels(events) -> list[tuple[str, float, float]]:
    """(name, start_us, end_us) of every kernel on the first device in a Chrome/Perfetto trace."""
    devices = _device_processes(events)
    if not devices:
        return []
    first = min(devices, key=lambda pid: devices[pid])
    return [(e["name"], float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0)))
            for e in events if e.get("ph") == "X" and e.get("pid") == first and e.get("dur", 0) > 0]


def busy_us(kernels) -> float:
    """Microseconds during which at least one of `kernels` ((name, start_us, end_us)) ran."""
    return _union_length([(start, end) for _, start, end in kernels])


def breakdown(kernels, steps: int) -> dict:
    """Per-step milliseconds of each class, and kernels per step."""
    if not kernels:
        return {}
    by_class = {c: [] for c in CLASSES[:-1]}
    for name, start, end in kernels:
        by_class[classify(name)].append((start, end))
    window = max(k[2] for k in kernels) - min(k[1] for k in kernels)
    busy = _union_length([(s, e) for _, s, e in kernels])
    out = {c: _union_length(v) / 1e3 / steps for c, v in by_class.items()}
    out["idle"] = (window - busy) / 1e3 / steps
    out["kernels_per_step"] = len(kernels) / steps
    return out


# cuLaunchKernel, cuLaunchKernelEx, cudaLaunchKernel, cuGraphLaunch, cudaGraphLaunch, ...
_LAUNCH = re.compile(r"^cu(da)?(Graph)?Launch", re.IGNORECASE)


def host_launches(events, steps: int) -> dict:
    """Per step, from the host's CUDA API calls in the trace: kernels launched one by one, command
    buffers (CUDA graphs) launched, and the host milliseconds spent launching. Empty where the
    trace has no such calls. Many single launches mean the host, not the GPU, paces a step."""
    devices = _device_processes(events)
    kernels = graphs = 0
    host_us = 0.0
    for e in events:
        if e.get("ph") != "X" or e.get("pid") in devices or not _LAUNCH.match(e.get("name", "")):
            continue
        if "graph" in e["name"].lower():
            graphs += 1
        else:
            kernels += 1
        host_us += float(e.get("dur", 0))
    if not kernels + graphs:
        return {}
    return {"kernel_launches_per_step": kernels / steps, "graph_launches_per_step": graphs / steps,
            "launch_host_ms_per_step": host_us / 1e3 / steps}


def top_host_events(events, steps: int, count: int = 8) -> list[dict]:
    """The host's traced calls (not Python frames) that take the most time, per step: where a
    waited step's host time goes (dispatch, `command_buffer::update` when XLA re-records a
    command buffer because buffer addresses changed, `cuGraphLaunch`, ...). Nested calls each
    count their whole duration."""
    devices = _device_processes(events)
    calls = [(e["name"], float(e["dur"])) for e in events
             if e.get("ph") == "X" and e.get("pid") not in devices and e.get("dur") and not e["name"].startswith("$")]
    return [{"name": name, "ms_per_step": total / 1e3 / steps, "per_step": n / steps}
            for name, total, n in _most_time(calls, count)]


def top_kernels(kernels, steps: int, count: int = 8) -> list[dict]:
    """The kernels (by name) that take the most device time, per step."""
    ranked = _most_time([(name, end - start) for name, start, end in kernels], count)
    return [{"name": name, "class": classify(name), "ms_per_step": total / 1e3 / steps, "per_step": n / steps}
            for name, total, n in ranked]


def _most_time(durations, count: int) -> list[tuple[str, float, int]]:
    """(name, total microseconds, occurrences) of the `count` names with the most total time."""
    totals: dict[str, list[float]] = {}
    for name, us in durations:
        entry = totals.setdefault(name, [0.0, 0])
        entry[0] += us
        entry[1] += 1
    ranked = sorted(totals.items(), key=lambda item: -item[1][0])[:count]
    return [(name, total, n) for name, (total, n) in ranked]


def read_trace(directory: str) -> list[dict]:
    paths = glob.glob(os.path.join(directory, "**", "perfetto_trace.json.gz"), recursive=True)
    if not paths:
        raise FileNotFoundError(f"no perfetto_trace.json.gz under {directory}")
    with gzip.open(max(paths, key=os.path.getmtime)) as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


@contextlib.contextmanager
def traced(directory: str):
    with jax.profiler.trace(directory, create_perfetto_trace=True):
        yield


def plot(rows: dict[str, dict], path: str, title: str) -> None:
    """Stacked bars, one per label, of the per-step milliseconds of each class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(rows)
    fig, ax = plt.subplots(figsize=(1.6 * len(labels) + 3, 4.5))
    bottom = [0.0] * len(labels)
    for c in CLASSES:
        values = [rows[label].get(c, 0.0) for label in labels]
        ax.bar(labels, values, bottom=bottom, label=c)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set_ylabel("ms per decode step (device)")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
