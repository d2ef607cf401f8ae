"""The script behind decode_anatomy_H100_2026-11-23.txt (session 4, run from the repository root):
    python step_anatomy_2026-11-23.py PRESET LAYERS BATCH PROMPT ALGORITHM   (WAITED=1: the waited step)
under `jaxnvrar-launch -n 2 --gpus 1` for TP 2 on one GPU. The decode step's optimized HLO and every kernel's time."""
import os, sys, time
import jax, jax.numpy as jnp, numpy as np
import jaxnvrar
if "JAXNVRAR_COORDINATOR" in os.environ:
    jaxnvrar.initialize_distributed()
if len(sys.argv) > 5 and sys.argv[5] == "nvrar":
    jaxnvrar.initialize()
from jaxnvrar.bench import breakdown
from jaxnvrar.models import llama
from jaxnvrar.models.llama import make_mesh

preset, layers, batch, prompt = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
algorithm = sys.argv[5] if len(sys.argv) > 5 else "none"
out = os.environ.get("OUT", "/tmp")
tag = f"{preset}_{layers}l_b{batch}_{algorithm}_tp{jax.device_count()}"
mesh = make_mesh(jax.device_count())
model = llama.random_model(preset, mesh, all_reduce=algorithm, dtype=jnp.bfloat16, num_layers=layers)
new = 16
caches = llama.init_cache(model, batch, prompt + new)
tokens = llama.replicated(mesh, np.zeros((batch, prompt), np.int32))
tok, _, caches, position = llama.decode_step(model, tokens, caches, 0)
history = llama.start_history(tokens, tok, new)
leaves, step = llama.decoding._compiled_advance(model)
with jax.set_mesh(mesh):
    compiled = step.lower(leaves, history, caches, position).compile()
if jax.process_index() == 0:
    with open(f"{out}/hlo_{tag}.txt", "w") as f:
        f.write(compiled.as_text())
for _ in range(3):
    history, caches, position = llama.advance(model, history, caches, prompt)
position.block_until_ready()
t0 = time.perf_counter()
for _ in range(10):
    history, caches, position = llama.advance(model, history, caches, prompt)
position.block_until_ready()
print(f"{tag}: queued step {(time.perf_counter() - t0) / 10 * 1e3:.3f} ms")
waited = os.environ.get("WAITED") == "1"
if waited:  # as the bench's waited step and generate: the device position carried, wait per step
    history, caches, position = llama.advance(model, history, caches, prompt)
    position.block_until_ready()
    t0 = time.perf_counter()
    for _ in range(10):
        history, caches, position = llama.advance(model, history, caches, position)
        position.block_until_ready()
    print(f"{tag}: waited step {(time.perf_counter() - t0) / 10 * 1e3:.3f} ms")
d = f"/tmp/prof_{tag}_r{jax.process_index()}"
with breakdown.traced(d):
    for _ in range(5):
        history, caches, position = llama.advance(model, history, caches, position if waited else prompt)
        if waited:
            position.block_until_ready()
    position.block_until_ready()
events = breakdown.read_trace(d)
kernels = breakdown.device_kernels(events)
print(tag, breakdown.breakdown(kernels, 5), breakdown.host_launches(events, 5))
for k in breakdown.top_kernels(kernels, 5, count=40):
    print(f"  {k['ms_per_step']:8.4f} {k['per_step']:5.0f} {k['class']:<13} {k['name'][:110]}")

# Host side: which calls take the host's time per step (re-recording a command buffer? launches?).
devices = breakdown._device_processes(events)
threads = {}
for e in events:
    if e.get("ph") == "X" and e.get("pid") not in devices and e.get("dur", 0) > 0:
        t = threads.setdefault(e["name"][:100], [0.0, 0])
        t[0] += float(e["dur"]); t[1] += 1
print(tag, "host events, us per step (count per step):")
for name, (us, n) in sorted(threads.items(), key=lambda kv: -kv[1][0])[:45]:
    print(f"  {us / 5:9.1f} {n / 5:6.1f}  {name}")
