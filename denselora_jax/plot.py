"""`python -m denselora_jax.plot RUN_DIR`: loss, validation loss and learning-rate curves of a run, as PNG.

Reads RUN_DIR/metrics.jsonl (written by the trainer) and writes RUN_DIR/curves.png (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def read_metrics(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found; pass the output_dir of a training run.")
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    if not records:
        raise ValueError(f"{path} is empty; the run logged no step yet.")
    # A resumed run appends: keep the last record of each step.
    return sorted({r["step"]: r for r in records}.values(), key=lambda r: r["step"])


def plot(run_dir: str, out: str | None = None) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    fig, (ax_loss, ax_lr) = plt.subplots(1, 2, figsize=(11, 4))
    steps = [r["step"] for r in records if "loss" in r]
    ax_loss.plot(steps, [r["loss"] for r in records if "loss" in r], label="train loss", lw=1)
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if val:
        ax_loss.plot(*zip(*val), "o-", label="validation loss")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("cross-entropy")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    ax_lr.plot(steps, [r["lr"] for r in records if "loss" in r], color="tab:green")
    ax_lr.set_xlabel("step")
    ax_lr.set_ylabel("learning rate")
    ax_lr.grid(alpha=0.3)
    fig.suptitle(os.path.basename(os.path.abspath(run_dir)))
    fig.tight_layout()
    out = out or os.path.join(run_dir, "curves.png")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m denselora_jax.plot", description=__doc__.split("\n")[0])
    p.add_argument("run_dir")
    p.add_argument("--out", help="PNG path (default RUN_DIR/curves.png)")
    args = p.parse_args(argv)
    try:
        print(plot(args.run_dir, args.out))
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
