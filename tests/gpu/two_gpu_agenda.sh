#!/bin/bash
# The measurements that need two GPUs (issues 16 and 17), in parts that each fit one ~10-minute
# run on a 2 x H200 machine, logs and JSON into OUT_DIR (default $OUT, else ./agenda-out):
#
#   bash tests/gpu/two_gpu_agenda.sh protocol   # dense-protocol soaks, 10^6 calls of mixed sizes per configuration
#   bash tests/gpu/two_gpu_agenda.sh peers      # all-reduce sweep 8K-32M, every launch, against torch's peers
#   bash tests/gpu/two_gpu_agenda.sh pull       # pulled vs pushed reduce-scatter: soaks, then a sweep side by side
#   bash tests/gpu/two_gpu_agenda.sh suite      # the whole GPU test suite (tests/gpu/run.py)
#   bash tests/gpu/two_gpu_agenda.sh decode8b   # Llama 3.1 8B TP 2, batch 1/16/64: psum, psum-xla, nvrar, none
#   bash tests/gpu/two_gpu_agenda.sh decode1b   # Llama 3.2 1B TP 2, batch 1/16, and 8B with the attention kernel
#
# Run it from the project root after building (on the lent machines: bash .device/run.sh bash
# tests/gpu/two_gpu_agenda.sh PART). Every command is bounded by `timeout`; a part goes on after a
# failed command and ends with one line per command and its exit status (summary.txt).
set -u
part=${1:?"which part: protocol, peers, pull, suite, decode8b or decode1b"}
out=${2:-${OUT:-agenda-out}}
mkdir -p "$out"
summary="$out/summary.txt"

step() {  # step NAME SECONDS COMMAND...: run, log to NAME.log, note the exit status
  local name=$1 seconds=$2
  shift 2
  local start=$SECONDS
  timeout "$seconds" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  echo "$name: rc $rc in $((SECONDS - start)) s: $*" >> "$summary"
}

case "$part" in
  protocol)
    # The dense protocol's ordering assumption, before any default uses it (docs/gpu-testing.md).
    export JAXNVRAR_DENSE_BYTES=67108864
    for config in 128-1shot-dense 128-dense; do
      step "soak_$config" 275 jaxnvrar-launch -n 2 --timeout 270 -- jaxnvrar-bench soak --calls 1000000 \
        --bytes 4K,64K,1M,8M --random-sizes 4 --kernel-config "$config" --json "$out/soak_$config.json"
    done
    ;;
  peers)
    export JAXNVRAR_DENSE_BYTES=67108864
    step allreduce 560 jaxnvrar-launch -n 2 --timeout 550 -- jaxnvrar-bench allreduce --algorithms psum,nvrar \
      --max-bytes 32M --launches 128,128-1shot,128-bulk,128-1shot-bulk,128-1shot-dense,128-dense \
      --peers torch --device-time "$out/trace" --json "$out/allreduce.json"
    rm -rf "$out/trace"  # large; the JSON keeps the kernel times
    ;;
  pull)
    # The pulled reduce-scatter (protocol_bulk.cuh's PullBulkProtocol): its ordering rests on flags
    # and a fence like bulk's, so shorter soaks than dense's; then pull vs push, each width and shot.
    for config in 128-pull 128-1shot-pull; do
      step "soak_$config" 100 jaxnvrar-launch -n 2 --timeout 95 -- jaxnvrar-bench soak --calls 200000 \
        --bytes 4K,64K,1M,8M --random-sizes 4 --kernel-config "$config" --json "$out/soak_$config.json"
    done
    step allreduce_pull 380 jaxnvrar-launch -n 2 --timeout 370 -- jaxnvrar-bench allreduce --algorithms nvrar \
      --min-bytes 64K --max-bytes 32M \
      --launches 128-bulk,128-pull,128-1shot-bulk,128-1shot-pull,256-1shot-bulk,256-1shot-pull \
      --device-time "$out/trace" --json "$out/allreduce_pull.json"
    rm -rf "$out/trace"
    ;;
  suite)
    step suite 570 python tests/gpu/run.py --logs "$out/suite"
    ;;
  decode8b)
    step decode_8b 570 jaxnvrar-bench decode --preset llama3.1-8b --tp 2 --batch 1,16,64 \
      --algorithms psum,psum-xla,nvrar,none --json "$out/decode_8b.json"
    ;;
  decode1b)
    step decode_1b 240 jaxnvrar-bench decode --preset llama3.2-1b --tp 2 --batch 1,16 \
      --algorithms psum,psum-xla,nvrar,none --json "$out/decode_1b.json"
    step decode_8b_attention 330 jaxnvrar-bench decode --preset llama3.1-8b --tp 2 --batch 1,16 \
      --algorithms nvrar,none --attention xla,kernel --json "$out/decode_8b_attention.json"
    ;;
  *)
    echo "unknown part '$part': protocol, peers, pull, suite, decode8b or decode1b" >&2
    exit 2
    ;;
esac
cat "$summary"
