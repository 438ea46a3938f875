"""`python -m denselora_jax.convert SRC OUT`: any supported checkpoint (HF directory or llama .gguf) to an HF
model directory (config.json, model.safetensors, tokenizer files) that any HF tool can use."""

from __future__ import annotations

import argparse
import sys

from denselora_jax.model.loading import load_pretrained, load_tokenizer
from denselora_jax.model.weights import CheckpointError, save_hf


def convert(src: str, out: str, *, dtype: str | None = None, tokenizer: bool = True) -> None:
    config, params = load_pretrained(src, dtype=dtype)
    save_hf(out, config, params)
    del params
    if tokenizer:
        load_tokenizer(src).save_pretrained(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m denselora_jax.convert", description=__doc__)
    p.add_argument("src", help="HF model directory or llama-architecture .gguf file")
    p.add_argument("out", help="output directory (created)")
    p.add_argument(
        "--dtype", default=None, help="float32, bfloat16 or float16 (default: the source's; GGUF: float32)"
    )
    p.add_argument("--no-tokenizer", action="store_true", help="write only the weights and config.json")
    args = p.parse_args(argv)
    try:
        convert(args.src, args.out, dtype=args.dtype, tokenizer=not args.no_tokenizer)
    except (CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
