"""The all-reduces to beat, measured in the same job as jaxnvrar's (jaxnvrar-bench allreduce
--peers torch): NCCL through torch.distributed, and torch's symmetric-memory one-shot and
two-shot kernels, each captured in a CUDA graph of `chain` calls and replayed, the way
nccl-tests times collectives. Every rank of the jaxnvrar-launch job joins one torch process
group; the graphs hold only the collectives, so the time per call is the kernels' own.
"""

from __future__ import annotations

import os
import statistics
import time

import jax

from jaxnvrar.distributed import KV_TIMEOUT_MS, kv_client
from jaxnvrar.launcher import free_port

PEERS = ("nccl-graph", "symm-one-shot", "symm-two-shot")


class TorchPeers:
    """Lazily joins a torch.distributed NCCL group next to jax's; `measure` returns us per call,
    or None with the reason in `self.unavailable[peer]`."""

    def __init__(self):
        self.unavailable: dict[str, str] = {}
        self._torch = None
        try:
            self._start()
        except Exception as err:  # noqa: BLE001 - any failure only removes the peer columns
            for peer in PEERS:
                self.unavailable[peer] = f"torch.distributed not available: {type(err).__name__}: {err}"

    def _start(self):
        if jax.process_count() == 1:
            # A one-rank NCCL all-reduce launches nothing: its "time" would be an empty graph's.
            raise RuntimeError("the job has one process, and a one-rank all-reduce moves nothing; run one "
                               "process per GPU (jaxnvrar-launch -n N)")
        # torch's symmetric memory must not start a second NVSHMEM next to jaxnvrar's.
        os.environ.setdefault("TORCH_SYMMMEM", "CUDA")
        import torch
        import torch.distributed as dist

        if not torch.cuda.is_available():
            raise RuntimeError("torch sees no CUDA device")
        local = jax.local_devices()[0].local_hardware_id
        torch.cuda.set_device(local)
        rank, world = jax.process_index(), jax.process_count()
        client = kv_client()
        if rank == 0:
            client.key_value_set("jaxnvrar/torch_port", str(free_port()))
        port = int(client.blocking_key_value_get("jaxnvrar/torch_port", KV_TIMEOUT_MS))
        host = os.environ.get("JAXNVRAR_COORDINATOR", "127.0.0.1:0").rsplit(":", 1)[0]
        dist.init_process_group("nccl", init_method=f"tcp://{host}:{port}", rank=rank, world_size=world,
                                device_id=torch.device("cuda", local))
        self._torch, self._dist = torch, dist

    def _graph_time(self, calls, chain: int, iters: int, repeats: int) -> float:
        torch = self._torch
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm up outside the capture, as graph capture requires
            for _ in range(3):
                calls()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(chain):
                calls()
        graph.replay()
        torch.cuda.synchronize()
        batches = []
        for _ in range(repeats):
            self._dist.barrier()
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(iters):
                graph.replay()
            torch.cuda.synchronize()
            batches.append((time.perf_counter() - start) / (iters * chain))
        return statistics.median(batches) * 1e6

    def measure(self, peer: str, count: int, dtype_name: str, *, chain: int, iters: int, repeats: int):
        if peer in self.unavailable:
            return None
        torch, dist = self._torch, self._dist
        dtype = getattr(torch, dtype_name)
        try:
            if peer == "nccl-graph":
                x = torch.zeros(count, dtype=dtype, device="cuda")
                return self._graph_time(lambda: dist.all_reduce(x), chain, iters, repeats)
            import torch.distributed._symmetric_memory as symm_mem

            group = dist.group.WORLD.group_name
            x = symm_mem.empty(count, dtype=dtype, device="cuda")
            symm_mem.rendezvous(x, group)
            x.zero_()
            if peer == "symm-one-shot":
                return self._graph_time(lambda: torch.ops.symm_mem.one_shot_all_reduce(x, "sum", group),
                                        chain, iters, repeats)
            return self._graph_time(lambda: torch.ops.symm_mem.two_shot_all_reduce_(x, "sum", group),
                                    chain, iters, repeats)
        except Exception as err:  # noqa: BLE001 - report and drop this peer
            self.unavailable[peer] = f"{type(err).__name__}: {str(err)[:200]}"
            return None

    def close(self):
        if self._torch is not None:
            self._dist.destroy_process_group()
