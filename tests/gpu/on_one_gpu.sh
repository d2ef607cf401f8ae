#!/bin/bash
# Run a command with several ranks sharing ONE GPU under CUDA MPS (kernel logic only: no NVLink,
# no timings), e.g. on the lent one-GPU machine:
#
#   bash tests/gpu/on_one_gpu.sh 2 python -m pytest tests/gpu/test_gpu_nvrar.py -k mixed
#
# starts MPS, runs `jaxnvrar-launch -n RANKS --gpus 1 -- COMMAND...` with a memory share per rank
# (RANK_MEM_FRACTION, default 0.45 / RANKS: it replaces XLA_PYTHON_CLIENT_MEM_FRACTION), an SM share
# per rank (CUDA_MPS_ACTIVE_THREAD_PERCENTAGE, default 100 / RANKS), JAXNVRAR_GROUPINGS=4 for 4+ ranks,
# and every program replayed as a command buffer, then stops MPS. Bound it with `timeout`.
set -u
ranks=${1:?"ranks, then the command"}
shift
export CUDA_MPS_PIPE_DIRECTORY=${CUDA_MPS_PIPE_DIRECTORY:-/tmp/mps} CUDA_MPS_LOG_DIRECTORY=${CUDA_MPS_LOG_DIRECTORY:-/tmp/mpslog}
mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
if nvidia-cuda-mps-control -d; then  # stop it after, unless it was running already
  trap 'echo quit | nvidia-cuda-mps-control' EXIT
fi
share=$(python3 -c "print(round(0.9 / $ranks / 2, 3))")  # half of a rank's share: XLA, then the NVSHMEM heap
# Each rank its own share of the SMs: a kernel's blocks spin until the peers' blocks have run,
# and ranks that together launch more blocks than the GPU holds at once could otherwise wait on
# blocks that never get an SM (4 ranks x 128 blocks of 512 threads > 132 SMs x 2).
export CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=${CUDA_MPS_ACTIVE_THREAD_PERCENTAGE:-$((100 / ranks))}
groupings=1 workspace=2147483648
if [ "$ranks" -ge 4 ]; then  # 2-D meshes of processes: all-reduces over both axes, 1 GiB regions
  groupings=4 workspace=4294967296
fi
XLA_PYTHON_CLIENT_MEM_FRACTION=${RANK_MEM_FRACTION:-$share} \
  JAXNVRAR_WORKSPACE_BYTES=${JAXNVRAR_WORKSPACE_BYTES:-$workspace} JAXNVRAR_TIMEOUT_S=${JAXNVRAR_TIMEOUT_S:-20} \
  JAXNVRAR_GROUPINGS=${JAXNVRAR_GROUPINGS:-$groupings} \
  XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_graph_min_graph_size=1" \
  jaxnvrar-launch -n "$ranks" --gpus 1 --timeout "${LAUNCH_TIMEOUT:-560}" -- "$@"
