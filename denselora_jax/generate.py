"""`python -m denselora_jax.generate`: decode prompts with a model and an optional adapter.

The decoding itself is denselora_jax.decoding.generate (also exported as denselora_jax.generate).
"""

from __future__ import annotations

import argparse
import sys

import jax

from denselora_jax.decoding import generate, load_checked_adapter, pad_left
from denselora_jax.model.loading import load_pretrained, load_tokenizer
from denselora_jax.prompts import generate_prompt


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m denselora_jax.generate", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="HF model directory or .gguf file")
    p.add_argument("--adapter", help="adapter directory (save_adapter output) to apply")
    p.add_argument(
        "--force", action="store_true", help="accept an adapter trained on other base weights (same shapes)"
    )
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts-file", help="a text file with one prompt per line")
    p.add_argument("--template", action="store_true", help="wrap each prompt in the training template")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--num-beams", type=int, default=1)
    p.add_argument("--do-sample", action="store_true")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dtype", help="parameter dtype, e.g. bfloat16 (default: the checkpoint's)")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    prompts = list(args.prompt)
    if args.prompts_file:
        with open(args.prompts_file, encoding="utf-8") as f:
            prompts += [line.rstrip("\n") for line in f if line.strip()]
    if not prompts:
        raise SystemExit("generate: give --prompt TEXT (repeatable) or --prompts-file FILE.")
    if args.template:
        prompts = [generate_prompt(p) for p in prompts]
    adapter = adapter_config = None
    try:
        config, params = load_pretrained(args.model, dtype=args.dtype)
        tok = load_tokenizer(args.model)
        if args.adapter:
            adapter, adapter_config = load_checked_adapter(config, params, args.adapter, force=args.force)
    except (ValueError, FileNotFoundError) as e:  # our errors name the file and the fix
        print(f"error: {e}", file=sys.stderr)
        return 2
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    rng = jax.random.key(args.seed)
    names = ("max_new_tokens", "num_beams", "do_sample", "temperature", "top_p", "top_k")
    settings = {k: getattr(args, k) for k in names}
    for start in range(0, len(prompts), args.batch_size):
        chunk = prompts[start : start + args.batch_size]
        ids, mask = pad_left([tok(p)["input_ids"] for p in chunk], pad, multiple=16)
        ad = {"adapter": adapter, "adapter_config": adapter_config, "rng": jax.random.fold_in(rng, start)}
        out = generate(
            config, params, ids, mask, eos_token_id=tok.eos_token_id, pad_token_id=pad, **settings, **ad
        )
        for prompt, row in zip(chunk, out[:, ids.shape[1] :]):
            print(f"### prompt\n{prompt}\n### completion\n{tok.decode(row, skip_special_tokens=True)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
