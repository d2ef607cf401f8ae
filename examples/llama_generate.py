"""Greedy generation with the tensor-parallel Llama, its all-reduces done by jaxnvrar.

A random "tiny" model on 2 virtual CPU devices (seconds):

    python examples/llama_generate.py

A Hugging Face Llama 3.x checkpoint on 2 GPUs, one process per GPU:

    jaxnvrar-launch -n 2 -- python examples/llama_generate.py --checkpoint /path/to/Llama-3.2-1B
"""

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxnvrar
from jaxnvrar.models import llama


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="a Hugging Face Llama directory (default: a random 'tiny' model)")
    parser.add_argument("--tp", type=int, default=2, help="tensor-parallel ranks (2)")
    parser.add_argument("--all-reduce", default="auto", choices=llama.ALL_REDUCE_CHOICES[:-1])
    parser.add_argument("--new-tokens", type=int, default=16)
    args = parser.parse_args()

    if "JAXNVRAR_NUM_PROCESSES" in os.environ:  # started by jaxnvrar-launch
        jaxnvrar.initialize_distributed()
    else:
        jax.config.update("jax_num_cpu_devices", args.tp)
    if jax.default_backend() == "gpu" and jaxnvrar.cuda_available():
        jaxnvrar.initialize()

    mesh = llama.make_mesh(args.tp)
    if args.checkpoint:
        # Each process reads only the shards its devices hold.
        model = llama.load_checkpoint(args.checkpoint, mesh, all_reduce=args.all_reduce, dtype=jnp.bfloat16)
    else:
        model = llama.random_model("tiny", mesh, all_reduce=args.all_reduce)
    prompt = np.random.default_rng(0).integers(0, model.config.vocab_size, (2, 8), dtype=np.int32)

    start = time.perf_counter()
    tokens = np.asarray(llama.generate(model, prompt, args.new_tokens))  # [batch, 8 + new tokens]
    seconds = time.perf_counter() - start
    # The same model with XLA's own all-reduce: the same greedy tokens.
    expected = np.asarray(llama.generate(llama.with_all_reduce(model, "psum"), prompt, args.new_tokens))
    if jax.process_index() == 0:
        print(f"TP {args.tp} on {jax.default_backend()}, all_reduce={args.all_reduce!r}: "
              f"{args.new_tokens} tokens x {prompt.shape[0]} sequences in {seconds:.2f} s (compile included)")
        for row in tokens:
            print("  ", row[prompt.shape[1]:].tolist())
        print("same tokens as with psum:", bool((tokens == expected).all()))
    assert (tokens == expected).all()


if __name__ == "__main__":
    main()
