"""End to end through `python -m denselora_jax.train`: a run, exact resume, small checkpoints, the demo path."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

from denselora_jax import config as cfglib
from denselora_jax.train import Run, main

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _overrides(model_dir, out, **extra):
    kw = {
        "model.path": model_dir,
        "model.dtype": "float32",
        "model.param_dtype": "float32",
        "data.train_files": "[pkg:demo]",
        "data.val_size": 8,
        "data.cutoff_len": 64,
        "train.batch_size": 8,
        "train.micro_batch_size": 1,
        "train.max_steps": 6,
        "train.eval_every": 3,
        "train.log_every": 1,
        "optimizer.learning_rate": 1e-2,
        "optimizer.warmup_steps": 1,
        "checkpoint.every": 2,
        "checkpoint.async_save": False,
        "logging.progress_bar": False,
        "mesh.shape": "[2,2,2]",  # 8 fake devices; 2 accumulated micro-batches
        "output_dir": str(out),
        **extra,
    }
    return [f"{k}={v}" for k, v in kw.items()]


def _config(model_dir, out, **extra):
    return cfglib.load_config(cfglib.DEFAULT_CONFIG, _overrides(model_dir, out, **extra))


def test_run_writes_metrics_checkpoints_and_adapter(tiny_llama_dir, tmp_path):
    out = tmp_path / "run"
    assert main(_overrides(tiny_llama_dir, out)) == 0
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4, 5, 6]
    assert {"loss", "lr", "grad_norm", "tokens_per_s"} <= set(lines[0])
    assert [r["step"] for r in lines if "val_loss" in r] == [3, 6]
    assert lines[0]["lr"] == 0.0 and lines[1]["lr"] == pytest.approx(1e-2)  # warmup 1, then linear decay
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert list((out / "tensorboard").iterdir())
    # The checkpoint holds the adapter and its AdamW moments, never the frozen base.
    adapter_bytes = os.path.getsize(out / "adapter" / "adapter_model.safetensors")
    base_bytes = os.path.getsize(pathlib.Path(tiny_llama_dir) / "model.safetensors")
    step_dir = out / "checkpoints" / "6"
    ckpt_bytes = sum(f.stat().st_size for f in step_dir.rglob("*") if f.is_file())
    # adapter + two AdamW moments, each written by Orbax's OCDBT as a process file and a merged copy.
    assert ckpt_bytes < 8 * adapter_bytes + 256 * 1024, (ckpt_bytes, adapter_bytes)
    stored = " ".join(f.read_text(errors="ignore") for f in step_dir.rglob("*metadata*") if f.is_file())
    assert "embed_tokens" not in stored and "q_proj" in stored  # adapter trees only, no base tree
    assert base_bytes > 0


def test_resume_is_bitwise_identical(tiny_llama_dir, tmp_path):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert main(_overrides(tiny_llama_dir, whole)) == 0
    first = Run(_config(tiny_llama_dir, parts), resume=True)
    assert first.train(until_step=3)["step"] == 3
    assert not (parts / "adapter").exists()  # stopped early: not exported yet
    second = Run(_config(tiny_llama_dir, parts), resume=True)
    assert second.step == 3
    assert second.train()["step"] == 6
    a = load_file(whole / "adapter" / "adapter_model.safetensors")
    b = load_file(parts / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    # The metrics of the resumed run continue where the first part stopped.
    steps = [json.loads(x)["step"] for x in (parts / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_no_resume_starts_over_and_keeps_old_checkpoints(tiny_llama_dir, tmp_path):
    out = tmp_path / "run"
    run = Run(_config(tiny_llama_dir, out, **{"train.max_steps": 2}), resume=True)
    run.train()
    again = Run(_config(tiny_llama_dir, out, **{"train.max_steps": 2}), resume=False)
    assert again.step == 0
    assert any(p.name.startswith("checkpoints.old-") for p in out.iterdir())


def test_refuses_resuming_an_incompatible_run(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "run"
    Run(_config(tiny_llama_dir, out, **{"train.max_steps": 2}), resume=True).train()
    assert main(_overrides(tiny_llama_dir, out, **{"train.max_steps": 2, "adapter.rank": 8})) == 2
    err = capsys.readouterr().err
    assert "adapter.rank" in err and "--no-resume" in err


@pytest.mark.slow
def test_demo_command_runs_shortened(tmp_path):
    """`python -m denselora_jax.train` on its embedded default (SmolLM2 + demo data), a few steps."""
    out = tmp_path / "demo"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "XLA_FLAGS": ""}
    cmd = [sys.executable, "-m", "denselora_jax.train", "train.max_steps=2", "train.batch_size=2",
           "train.micro_batch_size=2", "train.eval_every=2", "data.val_size=4", f"output_dir={out}"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "validation loss: before" in proc.stdout
    assert (out / "adapter" / "adapter_config.json").is_file()
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["method"] == "denselora" and config["rank"] == 16
