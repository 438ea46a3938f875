"""Trainable-parameter report: adapter size against the frozen base, computed from shapes alone.

`param_report(model_config, adapter_config)` and the CLI
`python -m denselora_jax.params (--model PATH | --preset NAME) --method denselora --rank 16`.
Nothing is allocated: counts come from `abstract_adapter` / `count_params` (jax.eval_shape), so an 8B
model is reported in a second.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import jax

from denselora_jax.adapters.config import PAPER_TARGETS, PROJECTIONS, AdapterConfig, Method
from denselora_jax.adapters.core import abstract_adapter, count_adapter_params
from denselora_jax.model.config import ModelConfig, preset_table
from denselora_jax.model.llama import count_params


def param_report(model_config: ModelConfig, adapter_config: AdapterConfig) -> dict:
    """{"trainable", "base", "percent" (of the base), "shared", "per_layer", "by_target"} as exact ints
    (percent a float). "shared" counts tensors stored once for all layers (DenseLoRA's encoders/decoders)."""
    tree = abstract_adapter(model_config, adapter_config)
    by_target = {t: 0 for t in adapter_config.targets}
    shared = 0
    for grp, targets in tree.items():
        for t, tensors in targets.items():
            n = sum(math.prod(x.shape) for x in jax.tree.leaves(tensors))
            by_target[t] += n
            shared += n if grp == "shared" else 0
    trainable, base = count_adapter_params(model_config, adapter_config), count_params(model_config)
    assert trainable == sum(by_target.values())
    return {
        "trainable": trainable,
        "base": base,
        "percent": 100.0 * trainable / base,
        "shared": shared,
        "per_layer": trainable - shared,
        "by_target": by_target,
    }


def format_percent(p: float) -> str:
    return f"{p:.3g}%"  # three significant digits, as the paper reports (0.0115%, 0.705%)


def format_report(name: str, mc: ModelConfig, ac: AdapterConfig, report: dict) -> str:
    dims = mc.projection_dims()
    share = "shared" if ac.share_across_layers else "per-layer"
    lines = [
        f"model      {name}: {mc.num_hidden_layers} layers, hidden {mc.hidden_size}, mlp {mc.intermediate_size}, "
        f"heads {mc.num_attention_heads}/{mc.num_key_value_heads} kv",
        f"adapter    {ac.method}, r={ac.rank}, alpha={ac.alpha:g}"
        + (f", {share} encoder/decoder" if ac.method == Method.DENSELORA else ""),
        "",
        f"{'target':<10} {'in -> out':>13} {'params':>14}",
    ]
    for t, n in report["by_target"].items():
        lines.append(f"{t:<10} {f'{dims[t][0]} -> {dims[t][1]}':>13} {n:>14,}")
    lines += [
        "",
        f"{'trainable':<10} {report['trainable']:>28,}",
        f"{'base':<10} {report['base']:>28,}",
        f"{'percent':<10} {format_percent(report['percent']):>28}",
    ]
    return "\n".join(lines)


def read_model_config(path: str) -> ModelConfig:
    """The ModelConfig of an HF model directory (its config.json) or a llama .gguf file; no weights read."""
    if os.path.isdir(path):
        cfg = os.path.join(path, "config.json")
        if not os.path.isfile(cfg):
            raise FileNotFoundError(f"{path}: no config.json; pass an HF model directory or a .gguf file.")
        return ModelConfig.from_json(cfg)
    if os.path.basename(path) == "config.json" and os.path.isfile(path):
        return ModelConfig.from_json(path)
    from denselora_jax.model.loading import open_checkpoint  # raises the precise error for other paths

    return open_checkpoint(path).config()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m denselora_jax.params",
        description="Trainable adapter parameters against the frozen base model (computed from shapes).",
    )
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="HF model directory (config.json) or llama .gguf file")
    src.add_argument("--preset", choices=sorted(preset_table()), help="a built-in model config")
    ap.add_argument("--method", default=str(Method.DENSELORA), choices=[str(m) for m in Method])
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=None, help="LoRA-style alpha (scaling alpha/r)")
    ap.add_argument(
        "--targets",
        default=",".join(PAPER_TARGETS),
        help=f"comma-separated projections among {','.join(PROJECTIONS)} (default: the paper's)",
    )
    ap.add_argument("--no-share", action="store_true", help="DenseLoRA: per-layer encoders/decoders")
    args = ap.parse_args(argv)
    try:
        ac = AdapterConfig(
            method=args.method,
            rank=args.rank,
            targets=tuple(t.strip() for t in args.targets.split(",") if t.strip()),
            share_across_layers=not args.no_share,
            **({} if args.alpha is None else {"alpha": args.alpha}),
        )
        mc = ModelConfig.from_preset(args.preset) if args.preset else read_model_config(args.model)
    except (ValueError, OSError) as e:
        ap.error(str(e))
    name = args.preset or args.model
    print(format_report(name, mc, ac, param_report(mc, ac)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
