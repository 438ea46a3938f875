"""Fault injection for `python -m denselora_jax.train`: kill a real training process at random moments, rerun
it each time, and check that the finished run is bitwise the same as an uninterrupted one.

What it does:
  1. Writes a tiny random LLaMA into WORKDIR/model (an HF directory made with save_pretrained, with a small
     byte-level BPE tokenizer trained on the packaged demo data) and a small instruction dataset (the first
     records of that data, with a validation split so best-by-validation checkpoints are kept too).
  2. Trains once without interruption (WORKDIR/reference): the reference adapter.
  3. Trains the same command in WORKDIR/run1, sends SIGKILL or SIGTERM (chosen at random) at a random
     moment, reruns the same command, and so on until the run finishes; then starts WORKDIR/run2, ... until
     --kills signals have landed in running trainers. A quarter of the kills land at a uniform time during
     start-up (imports, loading, restoring, compiling); the others at a uniform time within the rest of the
     training loop, where a checkpoint is written (asynchronously) after every step, so many land inside a
     save. The last run is let finish.
  4. Compares every finished run's exported adapter (adapter_model.safetensors and adapter_config.json)
     with the reference byte for byte, and checks along the way that each SIGTERM ended with exit status 0
     and the step it reported saving as the newest checkpoint on disk (or, during start-up before the
     trainer's handler is installed, with the default action), and that every rerun started cleanly.

It prints one line per kill and a summary: kills landed and survived, restarts, kills inside a checkpoint
save, and differences found. Exit status 0 when every kill was survived and no difference was found.

All subprocesses run on CPU with --devices fake JAX devices and share a persistent XLA compilation cache in
WORKDIR, so a restart costs start-up and loading, not a recompilation. Logs of every attempt are kept in
WORKDIR/logs.

Example (about 10 minutes on 2 CPU cores):
    .venv/bin/python scripts/fault_injection.py --kills 20 --seed 0
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import pathlib
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")
SIGNALS = {"SIGKILL": signal.SIGKILL, "SIGTERM": signal.SIGTERM}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="scripts/fault_injection.py",
        description="Kill `python -m denselora_jax.train` at random moments (SIGKILL and SIGTERM), resume "
        "it each time, and check the final adapter is bitwise the uninterrupted run's.",
        epilog=__doc__.split("What it does:")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--kills", type=int, default=20, help="signals to land in running trainers (default 20)")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill schedule and the tiny model")
    p.add_argument("--sigkill-share", type=float, default=0.5, help="share of kills that are SIGKILL")
    p.add_argument("--startup-share", type=float, default=0.25, help="share of kills aimed at start-up")
    p.add_argument("--steps", type=int, default=24, help="train.max_steps of every run (default 24)")
    p.add_argument("--devices", type=int, default=4, help="fake CPU devices (mesh [devices/2, 1, 2])")
    p.add_argument("--workdir", help="where models, runs and logs go (default: a new temporary directory)")
    p.add_argument("--keep", action="store_true", help="keep a temporary workdir afterwards")
    args = p.parse_args(argv)
    if args.kills < 1 or args.steps < 2 or args.devices < 2 or args.devices % 2:
        p.error("--kills must be >= 1, --steps >= 2, --devices an even number >= 2")
    for name in ("sigkill_share", "startup_share"):
        if not 0 <= getattr(args, name) <= 1:
            p.error(f"--{name.replace('_', '-')} must be in [0, 1]")
    return args


# --- the tiny model and data ------------------------------------------------------------------------------
def make_model_and_data(work: pathlib.Path, seed: int) -> tuple[str, str]:
    """WORKDIR/model (random LLaMA, hidden 64, 2 layers, with a tokenizer) and WORKDIR/train.json."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from denselora_jax.data import demo_data_dir

    records = json.loads((demo_data_dir() / "train.json").read_text())
    data = work / "train.json"
    data.write_text(json.dumps([{k: r[k] for k in ("instruction", "input", "output")} for r in records[:72]]))
    model = work / "model"
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<unk>", "<s>", "</s>", "<pad>"])
    tok.train_from_iterator([r["instruction"] + " " + r["output"] for r in records[:400]], trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    fast.save_pretrained(model)
    config = LlamaConfig(
        vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(model)
    return str(model), str(data)


def train_command(model: str, data: str, out: pathlib.Path, steps: int, devices: int) -> list[str]:
    overrides = {
        "model.path": model,
        "model.dtype": "float32",
        "model.param_dtype": "float32",
        "adapter.targets": "[q_proj,v_proj]",
        "data.train_files": f"[{data}]",
        "data.val_size": 8,
        "data.cutoff_len": 128,
        "train.batch_size": 8,
        "train.micro_batch_size": 2,
        "train.max_steps": steps,
        "train.eval_every": 4,
        "train.log_every": 1,
        "optimizer.learning_rate": 1e-2,
        "optimizer.warmup_steps": 2,
        "checkpoint.every": 1,
        "checkpoint.max_to_keep": 2,
        "checkpoint.async_save": "true",
        "logging.progress_bar": "false",
        "logging.tensorboard": "false",
        "mesh.shape": f"[{devices // 2},1,2]",
        "output_dir": str(out),
    }
    return [sys.executable, "-m", "denselora_jax.train", *(f"{k}={v}" for k, v in overrides.items())]


def child_env(work: pathlib.Path, devices: int) -> dict[str, str]:
    return {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
        "JAX_COMPILATION_CACHE_DIR": str(work / "xla_cache"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    }


# --- one process ------------------------------------------------------------------------------------------
def logged_steps(out: pathlib.Path) -> int:
    try:
        with open(out / "metrics.jsonl", "rb") as f:
            return f.read().count(b"\n")
    except FileNotFoundError:
        return 0


def checkpoint_steps(out: pathlib.Path) -> list[int]:
    d = out / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


@dataclasses.dataclass
class Attempt:
    """One start of the training command, its log, and how it ended."""

    cmd: list[str]
    env: dict[str, str]
    out: pathlib.Path
    log: pathlib.Path
    proc: subprocess.Popen | None = None
    started: float = 0.0
    wall_started: float = 0.0
    lines_at_start: int = 0

    def start(self) -> Attempt:
        self.lines_at_start = logged_steps(self.out)
        with open(self.log, "w") as f:
            self.proc = subprocess.Popen(self.cmd, cwd=REPO, env=self.env, stdout=f, stderr=subprocess.STDOUT)
        self.started, self.wall_started = time.monotonic(), time.time()
        return self

    def in_loop(self) -> bool:
        """Whether this process has finished a training step (it logs every step)."""
        return logged_steps(self.out) > self.lines_at_start

    def wait_until(self, predicate, deadline: float | None) -> bool:
        """Poll until predicate() holds (True) or the process exits or the deadline passes (False)."""
        while self.proc.poll() is None:
            if predicate():
                return True
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
        return False

    def finish(self, timeout: float = 900) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise

    def text(self) -> str:
        return self.log.read_text(errors="replace")


@dataclasses.dataclass
class Timing:
    """Estimates, refreshed by every attempt, of start-up time and seconds per training step."""

    startup_s: float
    step_s: float


def run_uninterrupted(attempt: Attempt, steps: int) -> Timing:
    """Run to the end, timing the start-up (to the first logged step) and the median step."""
    attempt.start()
    seen, times = 0, []
    while attempt.proc.poll() is None:
        if (now := logged_steps(attempt.out)) > seen:
            seen, times = now, times + [time.monotonic()]
        time.sleep(0.005)
    if (rc := attempt.finish()) != 0 or not times:
        raise SystemExit(f"the reference run failed (exit {rc}):\n{attempt.text()[-3000:]}")
    gaps = sorted(b - a for a, b in itertools.pairwise(times)) or [0.1]
    return Timing(times[0] - attempt.started, gaps[len(gaps) // 2])


# --- the campaign ------------------------------------------------------------------------------------------
def adapter_differences(out: pathlib.Path, reference: pathlib.Path) -> list[str]:
    diffs = []
    for name in ADAPTER_FILES:
        got, want = out / "adapter" / name, reference / "adapter" / name
        if not got.is_file():
            diffs.append(f"{got} is missing")
        elif got.read_bytes() != want.read_bytes():
            diffs.append(f"{got} differs from {want}")
    if diffs and (out / "adapter" / ADAPTER_FILES[0]).is_file():
        import numpy as np
        from safetensors.numpy import load_file

        a, b = (
            load_file(out / "adapter" / ADAPTER_FILES[0]),
            load_file(reference / "adapter" / ADAPTER_FILES[0]),
        )
        worst = max((float(np.max(np.abs(a[k] - b[k]))) for k in a.keys() & b.keys()), default=float("nan"))
        diffs.append(f"largest tensor difference {worst:.3g}")
    return diffs


def main(argv=None) -> int:
    args = parse_args(argv)
    rng = random.Random(args.seed)
    temporary = args.workdir is None
    work = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="fault_injection-")).resolve()
    (work / "logs").mkdir(parents=True, exist_ok=True)
    env = child_env(work, args.devices)
    sys.path.insert(0, str(REPO))
    model, data = make_model_and_data(work, args.seed)
    print(f"workdir {work}: tiny LLaMA and data written; training the reference run", flush=True)

    def attempt(out: pathlib.Path, name: str) -> Attempt:
        cmd = train_command(model, data, out, args.steps, args.devices)
        return Attempt(cmd, env, out, work / "logs" / f"{name}.log")

    reference = work / "reference"
    shutil.rmtree(reference, ignore_errors=True)
    timing = run_uninterrupted(attempt(reference, "reference"), args.steps)
    print(
        f"reference: {args.steps} steps; start-up {timing.startup_s:.1f} s, {timing.step_s:.2f} s/step",
        flush=True,
    )

    totals = dict(kills=0, survived=0, late=0, restarts=0, in_save=0, SIGKILL=0, SIGTERM=0, runs=0)
    problems: list[str] = []
    run = 0
    while totals["kills"] < args.kills and not problems:
        run += 1
        out, run_kills = work / f"run{run}", 0
        shutil.rmtree(out, ignore_errors=True)
        for n in range(1, 10_000):
            totals["restarts"] += n > 1
            a = attempt(out, f"run{run}-{n}").start()
            if totals["kills"] >= args.kills:  # enough: let this one finish
                if (rc := a.finish()) != 0:
                    problems.append(f"run {run} attempt {n}: exit {rc} without a kill; see {a.log}")
                break
            sig = "SIGKILL" if rng.random() < args.sigkill_share else "SIGTERM"
            resumes_at = max(checkpoint_steps(out) or [0])
            where = aim(a, rng, timing, args.startup_share, args.steps - resumes_at)
            if a.proc.poll() is not None:  # it ended before the signal: finished, or failed
                if (rc := a.finish()) != 0:
                    problems.append(f"run {run} attempt {n}: exit {rc} without a kill; see {a.log}")
                break
            at = time.monotonic() - a.started
            a.proc.send_signal(SIGNALS[sig])
            rc = a.finish()
            ok, outcome, mid_save = judge(a, sig, rc)
            complete = (out / "adapter").is_dir()  # the signal came after the training (export or exit)
            totals["late" if complete else "kills"] += 1
            if not complete:
                run_kills += 1
                totals[sig] += 1
                totals["in_save"] += mid_save
            steps_now = checkpoint_steps(out)
            print(
                f"{'late' if complete else 'kill ' + str(totals['kills']):>8}: run {run} attempt {n:2d} "
                f"({f'resumed at step {resumes_at}' if resumes_at else 'fresh start'}), {sig} at {at:5.1f} s "
                f"in {where}; newest checkpoint {steps_now[-1] if steps_now else None} -> {outcome}",
                flush=True,
            )
            if not ok:
                problems.append(
                    f"run {run} attempt {n}: unexpected outcome '{outcome}' (exit {rc}); see {a.log}"
                )
                break
            if complete:
                break
        if problems:
            break
        diffs = adapter_differences(out, work / "reference")
        totals["runs"] += 1
        totals["survived"] += 0 if diffs else run_kills
        print(f"run {run} finished: {'; '.join(diffs) or 'adapter identical to the reference'}", flush=True)
        problems += [f"run {run}: {d}" for d in diffs]

    t = totals
    print()
    print(f"kills landed in running trainers: {t['kills']} ({t['SIGKILL']} SIGKILL, {t['SIGTERM']} SIGTERM), "
          f"{t['in_save']} SIGKILLs inside a checkpoint save; restarts: {t['restarts']}; finished runs: "
          f"{t['runs']}; late signals (after the training, not counted): {t['late']}")  # fmt: skip
    print(f"kills survived: {t['survived']}/{t['kills']}; differences found: {len(problems)}")
    for p in problems:
        print(f"  - {p}")
    if temporary and not args.keep and not problems:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if not problems and t["survived"] == t["kills"] else 1


def aim(a: Attempt, rng: random.Random, timing: Timing, startup_share: float, steps_left: int) -> str:
    """Wait for a random moment of attempt `a` (returns early if it exits); say where that moment is.

    Start-up: a uniform time before the first step is usually logged. Training loop: a uniform step k of
    the steps left (not the last), then a uniform time within one step (compute, validation, save ...)."""
    never = bool
    if rng.random() < startup_share:
        a.wait_until(never, a.started + rng.uniform(0, timing.startup_s))
        return "start-up"
    k = rng.randint(1, max(1, steps_left - 1))
    if a.wait_until(a.in_loop, None):
        first = time.monotonic()
        timing.startup_s = first - a.started
        if a.wait_until(lambda: logged_steps(a.out) >= a.lines_at_start + k, None):
            if k > 1:  # keep the step time current: later steps run faster than the first ones
                timing.step_s = 0.5 * timing.step_s + 0.5 * (time.monotonic() - first) / (k - 1)
            a.wait_until(never, time.monotonic() + rng.uniform(0, timing.step_s))
    return f"the training loop ({k} step(s) in)"


def judge(a: Attempt, sig: str, rc: int) -> tuple[bool, str, bool]:
    """(expected?, what happened, a SIGKILL left a save of this process uncommitted?)."""
    text, steps_now = a.text(), checkpoint_steps(a.out)
    if sig == "SIGKILL":
        mid_save = any(  # a save this process began and never committed
            p.stat().st_mtime >= a.wall_started for p in a.out.glob("checkpoints*/*.orbax-checkpoint-tmp*")
        )
        return rc == -signal.SIGKILL, "killed" + (" inside a checkpoint save" if mid_save else ""), mid_save
    saved = re.search(r"SIGTERM: saved step (\d+)", text)
    if rc == 0 and saved:
        ok = steps_now[-1:] == [int(saved.group(1))]
        return ok, f"exit 0, saved step {saved.group(1)}" + ("" if ok else " but it is not on disk"), False
    if rc == 0:
        return (a.out / "adapter").is_dir(), "exit 0 (the run had finished training)", False
    # The default action is acceptable only before the training loop, where the trainer's handler is set.
    ok = rc == -signal.SIGTERM and logged_steps(a.out) == a.lines_at_start
    return ok, f"exit {rc} (default action: before the trainer installed its handler)", False


if __name__ == "__main__":
    sys.exit(main())
