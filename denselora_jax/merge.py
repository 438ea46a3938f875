"""`python -m denselora_jax.merge --model PATH --adapter DIR --out DIR`: fold a LoRA or DoRA adapter into the
base weights and write a plain HF model directory (config.json, safetensors, tokenizer files when the base
has them) that transformers and any HF tool load without this package.

LoRA is linear, so W' = W0 + s A B reproduces it exactly. DoRA is too: base + adapter computes
b + (m / ||W0 + s A B||) * (W0 + s A B) x per output unit, i.e. W' = (m / ||W0 + s A B||) * (W0 + s A B).
DenseLoRA is not: W0 x + s act(D M act(E x)) is not a linear function of x, so no W' reproduces it; it is
refused (serve it with its adapter branch: `forward(..., adapter=...)` or `denselora_jax.torch`).
The adapter may be save_adapter's or a PEFT LoRA/DoRA directory (see `load_adapter`).
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp

from denselora_jax.adapters.config import AdapterConfig, Method
from denselora_jax.adapters.core import base_kernel_2d, dora_weight_norm
from denselora_jax.adapters.io import AdapterFileError, load_adapter
from denselora_jax.model.config import ModelConfig
from denselora_jax.model.loading import fingerprint, load_pretrained, load_tokenizer
from denselora_jax.model.weights import CheckpointError, save_hf

_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


class NotMergeableError(ValueError):
    """An adapter that no single weight matrix can reproduce (DenseLoRA)."""


def _refuse_denselora(ac: AdapterConfig) -> None:
    if ac.method == Method.DENSELORA:
        raise NotMergeableError(
            "DenseLoRA cannot be merged into the base weights: W0 x + s*act(D M act(E x)) is non-linear in x, "
            "so no weight matrix reproduces it. Serve it with the adapter (forward(..., adapter=...), "
            "generate, or denselora_jax.torch.apply_adapter); only LoRA and DoRA adapters can be merged."
        )


def merge_lora(config: ModelConfig, params: dict, adapter: dict, adapter_config: AdapterConfig) -> dict:
    """Base parameters with a LoRA (or DoRA) adapter folded into the target kernels; `params` is unchanged.

    The merge is computed in float32 at full matmul precision and cast back to each kernel's dtype.
    """
    ac = adapter_config
    _refuse_denselora(ac)
    merged = jax.tree.map(lambda x: x, params)  # new containers, same leaves: only targets are replaced
    with jax.default_matmul_precision("highest"):
        for t in ac.targets:
            p = adapter["layers"][t]
            w_lio = base_kernel_2d(config, params, t).astype(jnp.float32)
            w_lio = w_lio + ac.scaling * jnp.einsum("lir,lro->lio", p["lora_A"], p["lora_B"])
            if ac.method == Method.DORA:
                # what adapted_projection divides by (the norm of the un-merged W0 + s A B, per output unit)
                norm_lo = jax.vmap(dora_weight_norm, (0, 0, 0, None))(
                    base_kernel_2d(config, params, t), p["lora_A"], p["lora_B"], ac.scaling
                )
                w_lio = w_lio * (p["magnitude"] / norm_lo)[:, None, :]
            node = merged["layers"]["self_attn" if t in _ATTENTION else "mlp"][t]
            node["kernel"] = w_lio.reshape(node["kernel"].shape).astype(node["kernel"].dtype)
    return merged


def merge(model: str, adapter_dir: str, out: str, *, dtype: str | None = None, force: bool = False) -> bool:
    """Merge the adapter in `adapter_dir` into the base at `model` and write the HF directory `out`.

    Returns whether tokenizer files were written (the base may have none).
    """
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise FileExistsError(f"{out}: exists and is not an empty directory; choose a new output directory.")
    _refuse_denselora(load_adapter(adapter_dir)[1])  # before the (large) base is read
    config, params = load_pretrained(model, dtype=dtype)
    adapter, ac = load_adapter(
        adapter_dir, model_config=config, base_fingerprint=fingerprint(config, params), force=force
    )
    merged = merge_lora(config, params, adapter, ac)
    del params
    save_hf(out, config, merged)
    try:
        tokenizer = load_tokenizer(model)
    except (CheckpointError, OSError, ValueError):
        return False
    tokenizer.save_pretrained(out)
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m denselora_jax.merge", description=__doc__)
    p.add_argument(
        "--model", required=True, help="base model: HF model directory or llama-architecture .gguf"
    )
    p.add_argument("--adapter", required=True, help="LoRA/DoRA adapter directory (save_adapter's or PEFT's)")
    p.add_argument("--out", required=True, help="output HF model directory (new or empty)")
    p.add_argument(
        "--dtype", default=None, help="float32, bfloat16 or float16 (default: the base's; GGUF: float32)"
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="merge although the base's fingerprint differs from the adapter's (shapes must still match)",
    )
    args = p.parse_args(argv)
    try:
        tokenizer = merge(args.model, args.adapter, args.out, dtype=args.dtype, force=args.force)
    except (NotMergeableError, AdapterFileError, CheckpointError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}" + ("" if tokenizer else f" (no tokenizer files: {args.model} has none)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
