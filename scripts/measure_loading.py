"""Peak host memory of loading a ~0.5B-parameter model onto 8 fake devices (fsdp=8): sharded vs naive.

    .venv/bin/python scripts/measure_loading.py [--layers 24] [--keep DIR]

Writes a random LLaMA (bfloat16 safetensors, written tensor by tensor, never whole in memory) to a temporary
directory, then measures in fresh subprocesses (8 fake CPU devices each, so "device" buffers live in host
memory and count in the process's RSS):
  sharded  load_pretrained(..., shardings=<fsdp=8>): each device's block is read from the memory-mapped
           files by jax.make_array_from_callback;
  naive    every tensor read into host numpy arrays (the whole model), then jax.device_put onto the same
           shardings.
It prints the peak RSS (resource.getrusage ru_maxrss; it includes the checkpoint's memory-mapped file pages
while they are mapped) and the peak anonymous RSS (sampled every 5 ms), both above the process's RSS just
before loading, as multiples of one copy of the weights.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

GIB = 2**30
CONFIG = dict(  # ~0.47B parameters
    vocab_size=32000, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
    num_key_value_heads=16, max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False,
)  # fmt: skip


def write_model(directory: str, layers: int) -> int:
    """A random bfloat16 checkpoint (one shard per few layers, with an index); returns its weight bytes."""
    import ml_dtypes
    from safetensors.numpy import save_file

    from denselora_jax.model.config import ModelConfig
    from denselora_jax.model.weights import INDEX_FILE, hf_tensors

    config = ModelConfig.from_hf_dict({**CONFIG, "num_hidden_layers": layers})
    rng, total, weight_map, shard, shard_no = np.random.default_rng(0), 0, {}, {}, 0

    def flush():
        nonlocal shard, shard_no
        if shard:
            name = f"model-{shard_no:05d}.safetensors"
            save_file(shard, os.path.join(directory, name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, name))
            shard, shard_no = {}, shard_no + 1

    for name, spec, _ in hf_tensors(config):
        x = rng.standard_normal(spec.hf_shape, dtype=np.float32) * 0.02
        shard[name] = x.astype(ml_dtypes.bfloat16)
        total += shard[name].nbytes
        if sum(v.nbytes for v in shard.values()) > 256 * 2**20:
            flush()
    flush()
    with open(os.path.join(directory, INDEX_FILE), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump({**config.to_hf_dict(), "torch_dtype": "bfloat16"}, f)
    return total


def _status(key: str) -> int:
    """A memory figure of this process from /proc/self/status (VmRSS, RssAnon ...), in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def child(mode: str, path: str) -> None:
    """Load in this (fresh) process and print one JSON line of memory figures."""
    import jax

    from denselora_jax.model.llama import param_axes
    from denselora_jax.model.loading import open_checkpoint
    from denselora_jax.sharding import logical_to_mesh, make_mesh

    with open_checkpoint(path) as src:
        config = src.config(param_dtype="bfloat16")
    shardings = logical_to_mesh(param_axes(config), make_mesh((1, 8, 1)))
    jax.block_until_ready(jax.numpy.zeros(8))  # backends up before the baseline
    base_rss, base_anon = _status("VmRSS"), _status("RssAnon")
    peak_anon, done = [0], threading.Event()

    def sample():
        while not done.is_set():
            peak_anon[0] = max(peak_anon[0], _status("RssAnon"))
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    if mode == "sharded":
        from denselora_jax.model.loading import load_pretrained

        _, params = load_pretrained(path, dtype="bfloat16", shardings=shardings)
    else:  # naive: the whole model on the host first, then onto the devices
        from denselora_jax.model.weights import param_specs, set_path

        host: dict = {}
        with open_checkpoint(path) as src:
            for spec in param_specs(config):
                names = spec.hf_names()
                arrays = [spec.to_ours(src.get(n)) for n in names]
                set_path(host, spec.rule.path, np.stack(arrays) if spec.rule.stacked else arrays[0].copy())
        params = jax.device_put(host, shardings)
    jax.block_until_ready(params)
    seconds = time.perf_counter() - t0
    done.set()
    sampler.join()
    peak_anon[0] = max(peak_anon[0], _status("RssAnon"))
    weights = sum(x.nbytes for x in jax.tree.leaves(params))
    print(json.dumps({
        "mode": mode, "weights": weights, "seconds": seconds,
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base_rss,
        "peak_anon": peak_anon[0] - base_anon,
    }))  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=CONFIG["num_hidden_layers"])
    ap.add_argument("--keep", help="write the model here (kept) instead of a temporary directory")
    ap.add_argument("--child", nargs=2, metavar=("MODE", "PATH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        path = args.keep or tmp
        os.makedirs(path, exist_ok=True)
        size = write_model(path, args.layers)
        print(f"random LLaMA, {size / 2 / 1e9:.2f}B parameters, {size / GIB:.2f} GiB of bfloat16 weights")
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
        print(f"{'mode':<8} {'peak RSS':>20} {'peak anonymous RSS':>22} {'time':>7}")
        for mode in ("sharded", "naive"):
            out = subprocess.run(
                [sys.executable, __file__, "--child", mode, path], env=env, capture_output=True, text=True
            )
            if out.returncode:
                print(out.stderr[-3000:], file=sys.stderr)
                return 1
            r = json.loads(out.stdout.strip().splitlines()[-1])
            rss, anon = r["peak_rss"], r["peak_anon"]
            print(
                f"{mode:<8} {rss / GIB:>7.2f} GiB ({rss / r['weights']:.2f}x) {anon / GIB:>9.2f} GiB "
                f"({anon / r['weights']:.2f}x) {r['seconds']:>6.1f}s"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
