"""Multi-host training: 2 local processes x 2 fake CPU devices, then a topology change on resume.

`python -m denselora_jax.train` runs as two processes joined by jax.distributed (127.0.0.1, a free port,
gloo collectives) on a (1, 2, 2) mesh whose fsdp axis spans the processes, trains 2N steps and checkpoints
at N. A single 4-device process restores step N on another mesh, (2, 1, 2), and continues to 2N. Both
final adapters equal the adapter of an uninterrupted single-process 4-device run. Every phase has a hard
timeout (then SIGABRT, which makes the children print their Python stacks into the logs), so a dead peer
fails the test instead of hanging it.
"""

import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

ROOT = pathlib.Path(__file__).resolve().parents[1]
N = 2  # steps before the checkpoint that the resumed run starts from
TIMEOUT_S = 240  # per phase; normal runs take a fraction of it


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_data(path: pathlib.Path, n: int = 24) -> str:
    rng = np.random.default_rng(0)
    records = []
    for _ in range(n):
        a, b = (int(x) for x in rng.integers(1, 50, 2))
        records.append({"instruction": f"What is {a} plus {b}?", "input": "", "output": f"{a + b}"})
    path.write_text(json.dumps(records))
    return str(path)


def _overrides(model_dir: str, data: str, out: pathlib.Path, mesh: str) -> list[str]:
    kw = {
        "model.path": model_dir,
        "model.dtype": "float32",
        "model.param_dtype": "float32",
        "data.train_files": f"[{data}]",
        "data.val_size": 4,
        "data.cutoff_len": 32,
        "train.batch_size": 4,
        "train.micro_batch_size": 1,  # x data-parallel 2: two accumulated micro-batches of 2 rows
        "train.max_steps": 2 * N,
        "train.eval_every": 100,  # validation before and at the end only: the best is the last step
        "train.log_every": 1,
        "optimizer.learning_rate": 1e-2,
        "optimizer.warmup_steps": 0,
        "checkpoint.every": N,
        "checkpoint.async_save": True,
        "logging.progress_bar": False,
        "logging.tensorboard": False,
        "mesh.shape": mesh,
        "output_dir": str(out),
    }
    return [f"{k}={v}" for k, v in kw.items()]


def _start(args: list[str], devices: int, log: pathlib.Path) -> subprocess.Popen:
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "PYTHONFAULTHANDLER": "1",  # SIGABRT on timeout prints every thread's Python stack into the log
    }
    with open(log, "w") as f:  # a file, not a pipe: a chatty child can never block on a full pipe
        return subprocess.Popen(
            [sys.executable, "-m", "denselora_jax.train", *args],
            cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip


def _wait_all(procs: dict[str, tuple[subprocess.Popen, pathlib.Path]]) -> None:
    """Wait for every child; on a failure or the timeout, kill the others and show the logs."""
    deadline, failed = time.monotonic() + TIMEOUT_S, None
    pending = dict(procs)
    while pending and failed is None and time.monotonic() < deadline:
        for name, (p, _) in list(pending.items()):
            if p.poll() is not None:
                del pending[name]
                if p.returncode != 0:
                    failed = f"{name} exited with {p.returncode}"
        time.sleep(0.2)
    if pending and failed is None:
        failed = f"timed out after {TIMEOUT_S}s: {sorted(pending)} still running"
    for p, _ in pending.values():
        os.killpg(p.pid, signal.SIGABRT)  # its own session: the child and anything it started
    for p, _ in pending.values():
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    if failed:
        logs = "\n".join(f"--- {n} ---\n{log.read_text()[-3000:]}" for n, (_, log) in procs.items())
        pytest.fail(f"{failed}\n{logs}")


def _adapter(out: pathlib.Path) -> dict[str, np.ndarray]:
    return load_file(out / "adapter" / "adapter_model.safetensors")


def _steps(out: pathlib.Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_train_save_and_resume_on_one(tiny_llama_dir, tmp_path):
    data = _write_data(tmp_path / "train.json")
    multi, ref, resumed = tmp_path / "multi", tmp_path / "ref", tmp_path / "resumed"
    coordinator = f"'127.0.0.1:{_free_port()}'"
    procs = {}
    for i in range(2):
        dist = [f"distributed.coordinator_address={coordinator}", "distributed.num_processes=2"]
        args = _overrides(tiny_llama_dir, data, multi, "[1,2,2]") + [*dist, f"distributed.process_id={i}"]
        procs[f"process {i}"] = (_start(args, 2, tmp_path / f"multi{i}.log"), tmp_path / f"multi{i}.log")
    _wait_all(procs)

    # Logs, metrics and the exported adapter come from process 0 alone: every step is recorded once.
    assert _steps(multi) == list(range(1, 2 * N + 1))
    assert "2 process(es)" in (tmp_path / "multi0.log").read_text()
    assert "[denselora_jax]" not in (tmp_path / "multi1.log").read_text()
    # Both processes wrote their shards of the checkpoint (Orbax's per-process OCDBT stores).
    step_n = multi / "checkpoints" / str(N)
    assert {p.name for p in step_n.glob("adapter/ocdbt.process_*")} == {"ocdbt.process_0", "ocdbt.process_1"}

    # A crash after step N, restarted as one process with 4 devices on another mesh: restore, continue.
    # The uninterrupted single-process reference runs alongside (one process per core).
    shutil.copytree(step_n, resumed / "checkpoints" / str(N))
    procs = {
        "resumed": (_start(_overrides(tiny_llama_dir, data, resumed, "[2,1,2]"), 4, tmp_path / "resumed.log"),
                    tmp_path / "resumed.log"),
        "reference": (_start(_overrides(tiny_llama_dir, data, ref, "[1,2,2]"), 4, tmp_path / "ref.log"),
                      tmp_path / "ref.log"),
    }  # fmt: skip
    _wait_all(procs)
    assert f"resumed from step {N}" in (tmp_path / "resumed.log").read_text()
    assert _steps(resumed) == list(range(N + 1, 2 * N + 1))

    want = _adapter(ref)
    for out in (multi, resumed):
        got = _adapter(out)
        assert got.keys() == want.keys()
        for k in want:
            np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=1e-6, err_msg=f"{out.name}: {k}")
    # The adapter did train (a decoder starts at zero).
    assert any(np.abs(v).max() > 0 for k, v in want.items() if "decoder" in k or "lora_B" in k)


def test_sigterm_on_one_host_stops_every_host_after_the_same_step(tiny_llama_dir, tmp_path):
    """A preempted VM gets SIGTERM alone: every process must stop after the same step and save it (one
    stopping early would leave the others waiting in the next step's collectives until the timeout)."""
    data, out = _write_data(tmp_path / "train.json"), tmp_path / "multi"
    coordinator = f"'127.0.0.1:{_free_port()}'"
    long_run = ["train.max_steps=400", "checkpoint.every=1000", "checkpoint.async_save=False"]
    procs = {}
    for i in range(2):
        dist = [f"distributed.coordinator_address={coordinator}", "distributed.num_processes=2"]
        args = _overrides(tiny_llama_dir, data, out, "[1,2,2]") + [*dist, f"distributed.process_id={i}"]
        log = tmp_path / f"multi{i}.log"
        procs[f"process {i}"] = (_start(args + long_run, 2, log), log)
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline and procs["process 0"][0].poll() is None:
        metrics = out / "metrics.jsonl"
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            procs["process 1"][0].send_signal(signal.SIGTERM)  # the non-lead process only
            break
        time.sleep(0.1)
    _wait_all(procs)

    log0 = (tmp_path / "multi0.log").read_text()
    saved = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"]
    assert 2 <= saved < 400
    assert f"stop requested on process 1: saved step {saved}" in log0
    assert sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == [saved]
    assert not (out / "adapter").exists()  # stopped, not finished: nothing exported


# --- start-up decisions of init_distributed (jax.distributed.initialize replaced by a recorder) ----------
_LAUNCH_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_JOB_ID", "SLURM_NTASKS",
               "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES")  # fmt: skip


@pytest.fixture
def initialize(monkeypatch):
    import jax

    calls = []
    for name in _LAUNCH_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    monkeypatch.setattr(jax.config, "update", lambda *a: None)  # keep this process's CPU backend as it is
    return calls


def _dist(**kw):
    from denselora_jax import config as cfglib

    return cfglib.DistributedSection(**kw)


def test_single_process_does_not_initialize(initialize):
    from denselora_jax.train import init_distributed

    init_distributed(_dist())
    assert initialize == []


def test_config_keys_win_over_environment(initialize, monkeypatch):
    from denselora_jax.train import init_distributed

    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
    monkeypatch.setenv("JAX_PROCESS_ID", "3")
    init_distributed(_dist())
    init_distributed(_dist(num_processes=8, process_id=5))
    assert initialize == [
        {"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3},
        {"coordinator_address": "10.0.0.1:1234", "num_processes": 8, "process_id": 5},
    ]


def test_cluster_launchers_let_jax_detect_the_rest(initialize, monkeypatch):
    from denselora_jax.train import init_distributed

    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_NTASKS", "16")
    init_distributed(_dist())
    assert initialize == [{"coordinator_address": None, "num_processes": None, "process_id": None}]


def test_incomplete_settings_are_refused(initialize, monkeypatch):
    from denselora_jax.config import ConfigError
    from denselora_jax.train import init_distributed

    with pytest.raises(ConfigError, match=r"needs distributed\.num_processes, distributed\.process_id"):
        init_distributed(_dist(coordinator_address="10.0.0.1:1234"))
    with pytest.raises(ConfigError, match=r"needs distributed\.coordinator_address"):
        init_distributed(_dist(initialize="true"))
    monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
    with pytest.raises(ConfigError, match="JAX_NUM_PROCESSES='two' must be a non-negative integer"):
        init_distributed(_dist(coordinator_address="10.0.0.1:1234"))
    init_distributed(_dist(initialize="false"))
    assert initialize == []
