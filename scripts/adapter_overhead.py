"""Where DenseLoRA's step overhead goes: the training step of SmolLM2-135M (batch 4 x 256) with the adapter's
activation and dropout switched off one at a time, against the frozen model differentiated to its inputs.

    python scripts/adapter_overhead.py [--dtype bfloat16] [--remat save_dots] [--steps 5]

Prints the median step time and tokens/s of each variant, in one process, one after the other.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import numpy as np

from denselora_jax import AdapterConfig, init_adapter, load_pretrained
from denselora_jax.config import OptimizerSection
from denselora_jax.step import make_optimizer, train_step

VARIANTS = ("none", "gelu:0.05", "gelu:0.0", "identity:0.05", "identity:0.0")  # activation:dropout


def median_step(fn, args, steps: int) -> float:
    compiled = fn.lower(*args).compile()
    jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t)
    return sorted(times)[steps // 2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--remat", default="save_dots")
    p.add_argument("--steps", type=int, default=5)
    args = p.parse_args()
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
    from benchmark import no_adapter_step  # scripts/benchmark.py: the same reference step
    from conftest import smollm2_gguf_path

    mc, base = load_pretrained(
        smollm2_gguf_path(), dtype=args.dtype, compute_dtype=args.dtype, remat=args.remat
    )
    ids = np.random.RandomState(0).randint(0, mc.vocab_size, (1, 4, 256)).astype(np.int32)
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": np.ones_like(ids)}
    tokens = ids.size
    for v in VARIANTS:
        if v == "none":
            t = median_step(*no_adapter_step(mc, base, batch), args.steps)
        else:
            act, drop = v.split(":")
            ac = AdapterConfig(method="denselora", rank=16, alpha=32.0, activation=act, dropout=float(drop))
            adapter = init_adapter(mc, ac, jax.random.key(1))
            tx = make_optimizer(OptimizerSection(warmup_steps=0), total_steps=1000)
            step = jax.jit(lambda a, o, b, bt, r, ac=ac, tx=tx: train_step(mc, ac, tx, False, a, o, b, bt, r))
            t = median_step(step, (adapter, tx.init(adapter), base, batch, jax.random.key(0)), args.steps)
        label = "no adapter" if v == "none" else f"DenseLoRA r=16, activation {act}, dropout {drop}"
        print(f"{label:48s} {t:.3f} s  {tokens / t:.0f} tokens/s", flush=True)


if __name__ == "__main__":
    main()
