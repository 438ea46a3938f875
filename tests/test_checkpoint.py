"""Checkpointer: bitwise sharded round trips, retention, best-by-validation across restarts, async saves,
SIGKILL mid-save, damaged checkpoints skipped, non-finite state refused, size, multi-host save and restore."""

import glob
import json
import logging
import os
import pathlib
import pickle
import signal
import socket
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from denselora_jax.checkpoint import (
    CheckpointCorruptError,
    Checkpointer,
    CheckpointMismatchError,
    NonFiniteError,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TX = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(optax.linear_schedule(0.0, 1e-2, 10)))


def mesh_2x2x2():
    return Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 2), ("data", "fsdp", "tensor"))


def make_adapter(seed, mesh=None, rank=4):
    """A small adapter-like tree (f32 matrices, a bf16 vector) with distinct values per seed."""
    k1, k2 = jax.random.split(jax.random.key(seed))
    tree = {
        "q_proj": {"A": jax.random.normal(k1, (16, rank)), "B": jax.random.normal(k2, (rank, 8))},
        "scale": jnp.arange(3, dtype=jnp.bfloat16) + seed,
    }
    if mesh is not None:
        specs = {"q_proj": {"A": P("fsdp", "tensor"), "B": P(None, "data")}, "scale": P()}
        tree = jax.device_put(tree, jax.tree.map(lambda s: NamedSharding(mesh, s), specs))
    return tree


def trained_state(adapter):
    """The optimizer state after one real AdamW update (non-zero moments, count 1)."""
    opt = jax.jit(TX.init)(adapter)
    grads = jax.tree.map(lambda x: jnp.sin(x.astype(jnp.float32)).astype(x.dtype), adapter)
    updates, opt = jax.jit(TX.update)(grads, opt, adapter)
    return optax.apply_updates(adapter, updates), opt


def abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def host_copy(tree):
    return jax.tree.map(lambda x: np.array(x, copy=True), tree)


def assert_bitwise(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        g, w = np.asarray(g), np.asarray(w)
        assert g.dtype == w.dtype and g.shape == w.shape
        assert g.tobytes() == w.tobytes()


@pytest.mark.parametrize("async_save", [True, False])
def test_round_trip_is_bitwise_and_keeps_shardings(tmp_path, async_save):
    mesh = mesh_2x2x2()
    adapter, opt = trained_state(make_adapter(0, mesh))
    meta = {"step": 7, "data": {"epoch": 1, "index": np.int64(96)}, "config": {"rank": 4}, "seed": 0}
    with Checkpointer(tmp_path, async_save=async_save) as ck:
        assert ck.save(7, adapter, opt, meta)
    # A restart: a new Checkpointer, targets built the way the trainer does (eval_shape + its shardings).
    shapes = jax.eval_shape(TX.init, adapter)
    shardings = jax.tree.map(lambda x: x.sharding, opt)
    abstract_opt = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings
    )
    with Checkpointer(tmp_path) as ck:
        step, got_adapter, got_opt, got_meta = ck.restore_latest(abstract(adapter), abstract_opt)
    assert step == 7
    assert got_meta == {"step": 7, "data": {"epoch": 1, "index": 96}, "config": {"rank": 4}, "seed": 0}
    assert_bitwise(got_adapter, adapter)
    assert_bitwise(got_opt, opt)
    for got, want in zip(jax.tree.leaves((got_adapter, got_opt)), jax.tree.leaves((adapter, opt))):
        assert got.sharding.is_equivalent_to(want.sharding, got.ndim)
    assert got_adapter["q_proj"]["A"].sharding.spec == P("fsdp", "tensor")


def test_async_save_does_not_need_the_arrays_after_returning(tmp_path):
    """The trainer donates adapter and optimizer state to the next step right after save() returns."""
    adapter, opt = trained_state(make_adapter(1))
    want = host_copy((adapter, opt))
    ck = Checkpointer(tmp_path, async_save=True)
    assert ck.save(1, adapter, opt, {"step": 1})
    for leaf in jax.tree.leaves((adapter, opt)):
        leaf.delete()  # what donation does to the buffers
    ck.wait()
    restored = ck.restore_latest(abstract(make_adapter(1)), abstract(trained_state(make_adapter(1))[1]))
    assert_bitwise((restored.adapter, restored.opt_state), want)
    ck.close()


def test_relative_output_dir_saves_and_restores(tmp_path, monkeypatch):
    """The demo's output_dir is relative (runs/demo): Orbax's background writer needs absolute paths."""
    monkeypatch.chdir(tmp_path)
    adapter, opt = trained_state(make_adapter(3))
    want = host_copy((adapter, opt))
    with Checkpointer("runs/x", async_save=True) as ck:
        assert ck.save(2, adapter, opt, {"step": 2})
        assert ck.save_best(2, adapter, opt, {"step": 2}, val_loss=1.0)
        ck.wait()
    with Checkpointer("runs/x") as ck:
        for restored in (
            ck.restore_latest(abstract(adapter), abstract(opt)),
            ck.restore_best(abstract(adapter), abstract(opt)),
        ):
            assert restored.step == 2
            assert_bitwise((restored.adapter, restored.opt_state), want)
    assert sorted(os.listdir(tmp_path / "runs" / "x" / "checkpoints")) == ["2"]


def test_max_to_keep_every_and_step_order(tmp_path):
    adapter, opt = trained_state(make_adapter(2))
    with Checkpointer(tmp_path, max_to_keep=2, every=2) as ck:
        saved = [ck.save(s, adapter, opt, {"step": s}) for s in range(1, 8)]
        assert saved == [False, True, False, True, False, True, False]
        assert ck.save(7, adapter, opt, {"step": 7}, force=True)  # e.g. on SIGTERM
        assert not ck.save(7, adapter, opt, {"step": 7}, force=True)  # already there
        with pytest.raises(ValueError, match="already holds step 7"):
            ck.save(5, adapter, opt, {"step": 5}, force=True)
        ck.wait()
        assert ck.all_steps() == [6, 7]
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["6", "7"]


def test_best_is_kept_by_validation_loss_across_restarts(tmp_path):
    abstract_adapter = abstract(make_adapter(0))
    with Checkpointer(tmp_path) as ck:
        assert ck.best_val_loss() is None and ck.restore_best(abstract_adapter) is None
        assert ck.save_best(2, *trained_state(make_adapter(2)), {"step": 2}, val_loss=1.0)
        assert not ck.save_best(
            4, *trained_state(make_adapter(4)), {"step": 4}, val_loss=1.5
        )  # async: in flight
        with pytest.raises(NonFiniteError):
            ck.save_best(5, *trained_state(make_adapter(5)), {"step": 5}, val_loss=float("nan"))
    with Checkpointer(tmp_path) as ck:  # restart: the stored best's loss is read back
        assert ck.best_val_loss() == 1.0 and ck.best_step() == 2
        assert not ck.save_best(6, *trained_state(make_adapter(6)), {"step": 6}, val_loss=1.2)
        best_adapter, best_opt = trained_state(make_adapter(8))
        assert ck.save_best(8, best_adapter, best_opt, {"step": 8}, val_loss=np.float32(0.7))
        ck.wait()
        assert sorted(os.listdir(tmp_path / "checkpoints_best")) == ["8"]
        restored = ck.restore_best(abstract_adapter)
        assert restored.step == 8 and restored.meta == {"step": 8} and restored.opt_state is None
        assert_bitwise(restored.adapter, best_adapter)
    assert not os.path.exists(tmp_path / "checkpoints") or os.listdir(tmp_path / "checkpoints") == []


CHILD = textwrap.dedent(
    """
    import asyncio, sys, time
    import jax, jax.numpy as jnp, optax
    from denselora_jax.checkpoint import Checkpointer
    out, mode = sys.argv[1], sys.argv[2]
    ck = Checkpointer(out)
    small = {"w": jnp.arange(16.0)}
    ck.save(1, small, optax.adamw(1e-3).init(small), {"step": 1})
    ck.wait()
    if mode == "commit":  # block in Orbax's commit (rename of the fully written temporary directory)
        from orbax.checkpoint._src.path import atomicity
        async def hang(self):
            print("KILL", flush=True)
            await asyncio.sleep(3600)
        atomicity.AtomicRenameTemporaryPath.finalize = hang
    big = {"w": jax.random.normal(jax.random.key(1), (4 * 2**20 if mode == "write" else 16,))}
    ck.save(2, big, optax.adamw(1e-3).init(big), {"step": 2})
    if mode == "write":  # save() has returned; 48 MiB are being written in the background
        print("KILL", flush=True)
    time.sleep(3600)
    """
)


@pytest.mark.parametrize("moment", ["write", "commit"])
def test_sigkill_mid_save_keeps_the_previous_checkpoint(tmp_path, moment):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(tmp_path), moment],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout.readline().strip() == "KILL", "the child failed before the step-2 save"
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        child.kill()
    leftovers = glob.glob(str(tmp_path / "checkpoints" / "2.orbax-checkpoint-tmp*"))
    assert leftovers, "the kill did not land inside the step-2 save"
    small = {"w": jnp.arange(16.0)}
    opt = optax.adamw(1e-3).init(small)
    with Checkpointer(tmp_path) as ck:
        assert ck.all_steps() == [1]
        restored = ck.restore_latest(abstract(small), abstract(opt))
        assert restored.step == 1 and restored.meta == {"step": 1}
        assert_bitwise((restored.adapter, restored.opt_state), (small, opt))
        assert ck.save(2, small, opt, {"step": 2})  # the leftover does not block saving that step again
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2"]


def _truncate_largest_chunk(step_dir):
    chunk = max(glob.glob(f"{step_dir}/adapter/**/d/*", recursive=True), key=os.path.getsize)
    os.truncate(chunk, os.path.getsize(chunk) // 2)


def _flip_bit_in_largest_chunk(step_dir):
    # Decodes without any error to different values: only the stored digest catches it.
    chunk = max(glob.glob(f"{step_dir}/adapter/**/d/*", recursive=True), key=os.path.getsize)
    data = bytearray(pathlib.Path(chunk).read_bytes())
    data[len(data) // 2] ^= 0x01
    pathlib.Path(chunk).write_bytes(data)


CORRUPTIONS = {
    "truncated array chunk": _truncate_largest_chunk,
    "flipped bit in array chunk": _flip_bit_in_largest_chunk,
    "removed array metadata": lambda d: os.remove(f"{d}/adapter/_METADATA"),
    "removed OCDBT manifest": lambda d: os.remove(f"{d}/adapter/manifest.ocdbt"),
    "truncated meta JSON": lambda d: os.truncate(f"{d}/meta/metadata", 5),
    "removed step metadata": lambda d: os.remove(f"{d}/_CHECKPOINT_METADATA"),
}


# After a failed TensorStore read, Orbax's asyncio callbacks can hit a closed event loop (harmless noise).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_damaged_latest_is_skipped_with_a_warning(tmp_path, corruption, caplog):
    states = {s: trained_state(make_adapter(s, rank=32)) for s in (1, 2, 3)}
    with Checkpointer(tmp_path, async_save=False) as ck:
        for s, (adapter, opt) in states.items():
            ck.save(s, adapter, opt, {"step": s})
    CORRUPTIONS[corruption](tmp_path / "checkpoints" / "3")
    with Checkpointer(tmp_path) as ck, caplog.at_level(logging.WARNING, logger="denselora_jax.checkpoint"):
        restored = ck.restore_latest(abstract(states[1][0]), abstract(states[1][1]))
        assert restored.step == 2 and restored.meta == {"step": 2}
        assert_bitwise((restored.adapter, restored.opt_state), states[2])
        assert any("step 3" in r.getMessage() and "damaged" in r.getMessage() for r in caplog.records)
        # Moved aside, not deleted, so the resumed run can write step 3 again.
        assert os.listdir(tmp_path / "checkpoints_corrupt") == ["checkpoints_3"]
        assert ck.all_steps() == [1, 2]
        assert ck.save(3, *states[3], {"step": 3})


def test_all_damaged_is_an_error_not_a_fresh_start(tmp_path):
    adapter, opt = trained_state(make_adapter(0, rank=32))
    with Checkpointer(tmp_path) as ck:
        ck.save(1, adapter, opt, {"step": 1})
    _flip_bit_in_largest_chunk(tmp_path / "checkpoints" / "1")
    with Checkpointer(tmp_path) as ck, pytest.raises(CheckpointCorruptError, match="step 1"):
        ck.restore_latest(abstract(adapter), abstract(opt))
    assert os.listdir(tmp_path / "checkpoints") == ["1"]  # left in place for the user to inspect


def test_config_mismatch_is_refused_not_skipped(tmp_path):
    adapter, opt = trained_state(make_adapter(0, rank=4))
    with Checkpointer(tmp_path) as ck:
        ck.save(1, adapter, opt, {"step": 1})
    other_rank, other_opt = trained_state(make_adapter(0, rank=8))
    with Checkpointer(tmp_path) as ck:
        with pytest.raises(
            CheckpointMismatchError, match=r"q_proj/A: stored \(16, 4\) float32, this run \(16, 8\)"
        ):
            ck.restore_latest(abstract(other_rank), abstract(other_opt))
        # Orbax alone would silently cast a stored float32 to the requested bfloat16.
        as_bf16 = jax.tree.map(
            lambda s: jax.ShapeDtypeStruct(s.shape, jnp.bfloat16, sharding=s.sharding), abstract(adapter)
        )
        with pytest.raises(CheckpointMismatchError, match=r"stored .* float32, this run .* bfloat16"):
            ck.restore_latest(as_bf16, abstract(opt))
        assert ck.all_steps() == [1]


def test_non_finite_state_is_never_written(tmp_path):
    adapter, opt = trained_state(make_adapter(0))
    bad_adapter = {
        **adapter,
        "q_proj": {**adapter["q_proj"], "B": adapter["q_proj"]["B"].at[0, 0].set(jnp.nan)},
    }
    bad_opt = jax.tree.map(lambda x: x.at[..., 0].set(jnp.inf) if x.ndim == 2 else x, opt)
    with Checkpointer(tmp_path) as ck:
        ck.save(1, adapter, opt, {"step": 1})
        with pytest.raises(NonFiniteError, match=r"adapter/q_proj/B") as err:
            ck.save(2, bad_adapter, opt, {"step": 2})
        assert "opt_state" not in str(err.value)
        with pytest.raises(NonFiniteError, match=r"opt_state/.*mu/q_proj/A"):
            ck.save(2, adapter, bad_opt, {"step": 2})
        with pytest.raises(NonFiniteError):
            ck.save_best(2, bad_adapter, opt, {"step": 2}, val_loss=0.5)
        with pytest.raises(ValueError, match="not plain JSON"):
            ck.save(2, adapter, opt, {"val_loss": float("nan")})
        ck.wait()
        assert ck.all_steps() == [1] and ck.best_step() is None
    assert os.listdir(tmp_path / "checkpoints") == ["1"]


def test_checkpoint_size_is_of_the_order_of_the_adapter(tmp_path):
    """adapter + AdamW moments (3x the adapter) + small fixed overhead; a base model would dwarf this."""
    adapter, opt = trained_state({"A": jax.random.normal(jax.random.key(0), (256, 1024))})  # 1 MiB
    adapter_bytes = adapter["A"].nbytes
    with Checkpointer(tmp_path) as ck:
        ck.save(1, adapter, opt, {"step": 1})
    size = sum(
        os.path.getsize(f)
        for f in glob.glob(f"{tmp_path}/checkpoints/1/**", recursive=True)
        if os.path.isfile(f)
    )
    assert 2.5 * adapter_bytes < size < 3 * adapter_bytes + 256 * 1024


def test_bad_arguments_get_clear_errors(tmp_path):
    adapter, opt = trained_state(make_adapter(0))
    with pytest.raises(ValueError, match="max_to_keep"):
        Checkpointer(tmp_path, max_to_keep=0)
    with Checkpointer(tmp_path) as ck:
        with pytest.raises(ValueError, match="not plain JSON"):
            ck.save(1, adapter, opt, {"x": object()})
        with pytest.raises(ValueError, match="non-negative integer"):
            ck.save(-1, adapter, opt, {})
        ck.save(1, adapter, opt, {})
        no_sharding = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), adapter)
        with pytest.raises(ValueError, match=r"abstract_adapter\['q_proj'\]\['A'\] .*eval_shape"):
            ck.restore_latest(no_sharding, abstract(opt))


MULTIHOST_CHILD = textwrap.dedent(
    """
    import pickle, sys
    import jax
    pid, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=pid)
    import jax.numpy as jnp, numpy as np, optax
    from jax.experimental import multihost_utils
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from denselora_jax.checkpoint import Checkpointer
    mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "fsdp"))
    full = np.random.default_rng(0).standard_normal((8, 6)).astype(np.float32)
    sharding = NamedSharding(mesh, P("data", "fsdp"))
    adapter = {"A": jax.make_array_from_callback(full.shape, sharding, lambda idx: full[idx]),
               "s": jax.device_put(jnp.arange(3, dtype=jnp.bfloat16), NamedSharding(mesh, P()))}
    tx = optax.adamw(1e-2)
    opt = jax.jit(tx.init)(adapter)
    updates, opt = jax.jit(tx.update)(jax.tree.map(jnp.sin, adapter), opt, adapter)
    adapter = jax.jit(optax.apply_updates)(adapter, updates)
    with Checkpointer(out) as ck:  # every process saves; Orbax writes each one's shards, JSON once
        assert ck.save(3, adapter, opt, {"step": 3, "processes": jax.process_count()})
        assert ck.save_best(3, adapter, opt, {"step": 3}, val_loss=0.5)
        ck.wait()
        abstract = lambda t: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), t)
        restored = ck.restore_latest(abstract(adapter), abstract(opt))
        for got, want in zip(jax.tree.leaves((restored.adapter, restored.opt_state)), jax.tree.leaves((adapter, opt))):
            for g, w in zip(got.addressable_shards, want.addressable_shards):
                assert g.index == w.index and np.asarray(g.data).tobytes() == np.asarray(w.data).tobytes()
    gathered = multihost_utils.process_allgather((adapter, opt), tiled=True)  # a collective: all call it
    if pid == 0:  # pickle keeps bfloat16 (npz does not)
        pickle.dump([np.asarray(x) for x in jax.tree.leaves(gathered)], open(f"{out}/expected.pkl", "wb"))
    print("OK", flush=True)
    """
)


@pytest.mark.slow
def test_two_processes_save_one_process_restores(tmp_path):
    """2 processes x 2 devices save together; this 8-device process restores onto a different mesh."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", MULTIHOST_CHILD, str(pid), str(port), str(tmp_path)],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for pid in range(2)
    ]
    try:
        outputs = [p.communicate(timeout=180)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, out in zip(procs, outputs):
        assert p.returncode == 0 and "OK" in out, out[-3000:]
    assert sorted(os.listdir(tmp_path / "checkpoints" / "3" / "meta")) == ["commit_success.txt", "metadata"]
    assert json.loads((tmp_path / "checkpoints" / "3" / "meta" / "metadata").read_text()) == {
        "step": 3,
        "processes": 2,
    }

    want = pickle.loads((tmp_path / "expected.pkl").read_bytes())
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "fsdp"))
    adapter = {"A": jnp.zeros((8, 6)), "s": jnp.zeros((3,), jnp.bfloat16)}
    opt = optax.adamw(1e-2).init(adapter)
    on_mesh = lambda t, spec: jax.tree.map(  # noqa: E731
        lambda x: jax.ShapeDtypeStruct(
            x.shape, x.dtype, sharding=NamedSharding(mesh, spec if x.ndim == 2 else P())
        ),
        t,
    )
    with Checkpointer(tmp_path) as ck:
        for restored in (ck.restore_latest(on_mesh(adapter, P("data", "fsdp")), on_mesh(opt, P("fsdp", None))),
                         ck.restore_best(on_mesh(adapter, P(None, "fsdp")), on_mesh(opt, P("data", None)))):  # fmt: skip
            assert restored.step == 3
            assert restored.adapter["A"].sharding.mesh.devices.shape == (4, 2)
            assert_bitwise(jax.tree.leaves((restored.adapter, restored.opt_state)), want)
