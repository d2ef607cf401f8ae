"""Ad-hoc (device session 5): where a waited decode step's time goes beyond the queued step.
Per waited step: host time until llama.advance returns (dispatch + graph launch), and until the
new position is ready. Usage: python3 host_gap.py PRESET LAYERS BATCH [PROMPT]"""
import sys, time
import jax, jax.numpy as jnp, numpy as np
from jaxnvrar.models import llama
from jaxnvrar.models.llama import make_mesh

preset, layers, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
prompt = int(sys.argv[4]) if len(sys.argv) > 4 else 1024
algorithm = sys.argv[5] if len(sys.argv) > 5 else "psum"
if algorithm == "nvrar":  # one rank: the FFI handler's cudaMemcpyAsync, one custom call per all-reduce
    import jaxnvrar
    jaxnvrar.initialize()
mesh = make_mesh(1)
model = llama.random_model(preset, mesh, all_reduce=algorithm, dtype=jnp.bfloat16, num_layers=layers)
new = 64
caches = llama.init_cache(model, batch, prompt + new)
tokens = llama.replicated(mesh, np.zeros((batch, prompt), np.int32))
tok, _, caches, position = llama.decode_step(model, tokens, caches, 0)
history = llama.start_history(tokens, tok, new)
for _ in range(3):
    history, caches, position = llama.advance(model, history, caches, prompt)
position.block_until_ready()
t0 = time.perf_counter()
for _ in range(20):
    history, caches, position = llama.advance(model, history, caches, prompt)
position.block_until_ready()
queued = (time.perf_counter() - t0) / 20 * 1e3
dispatch, total = [], []
for _ in range(20):
    t0 = time.perf_counter()
    history, caches, position = llama.advance(model, history, caches, prompt)
    t1 = time.perf_counter()
    position.block_until_ready()
    t2 = time.perf_counter()
    dispatch.append((t1 - t0) * 1e3); total.append((t2 - t0) * 1e3)
tiny = jax.jit(lambda x: x + 1)
x = jnp.zeros(8)
tiny(x).block_until_ready()
rt = []
for _ in range(50):
    t0 = time.perf_counter(); x = tiny(x); x.block_until_ready(); rt.append((time.perf_counter() - t0) * 1e3)
print(f"{preset} {layers}l b{batch} {algorithm}: queued {queued:.3f} ms; waited {np.median(total):.3f} ms of which "
      f"advance() returned after {np.median(dispatch):.3f} ms; tiny jit round trip {np.median(rt):.3f} ms")
