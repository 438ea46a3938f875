"""Checkpoints of a run's trainable state: Orbax managers for the latest N and the best-by-validation step.

Owns `output_dir/checkpoints` (latest `max_to_keep` steps) and `output_dir/checkpoints_best` (the single
step with the lowest validation loss, as the paper keeps it). Each step holds three Orbax items: `adapter`
and `opt_state` (pytrees of arrays, sharded as the trainer holds them) and `meta` (the trainer's JSON dict:
data position, config, base fingerprint, seed ...). The frozen base is never written.

Orbax provides atomicity (a step is written to a temporary directory and renamed on commit), async saves,
multi-host coordination (every process calls save/restore; JSON is written by the primary host only) and
retention. On top of it this file adds what Orbax does not check:
- no NaN/Inf is ever written (`save*` raise `NonFiniteError`);
- a per-leaf digest of the saved bits, stored in the step's Orbax custom metadata and verified on restore,
  because a damaged chunk can decode to wrong values without any error;
- stored shapes and dtypes are compared with the requested ones (Orbax silently casts dtypes), a
  mismatch is a config error (`CheckpointMismatchError`), not damage;
- an unreadable or damaged step is skipped with a warning, the next older one is restored, and the
  damaged one is moved to `output_dir/checkpoints_corrupt/` so the resumed run can save that step again.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

log = logging.getLogger(__name__)

LATEST_DIR = "checkpoints"
BEST_DIR = "checkpoints_best"
CORRUPT_DIR = "checkpoints_corrupt"
_DIGEST_KEY = "denselora_digest"


class NonFiniteError(ValueError):
    """The state to be saved holds NaN or Inf; nothing was written."""


class CheckpointMismatchError(ValueError):
    """A stored checkpoint's tree, shapes or dtypes differ from what the run asks to restore."""


class CheckpointCorruptError(RuntimeError):
    """Checkpoints exist but none of them can be restored intact."""


class Restored(NamedTuple):
    """What restore_latest/restore_best return (unpacks as `step, adapter, opt_state, meta`)."""

    step: int
    adapter: Any
    opt_state: Any  # None when restored without an abstract optimizer state
    meta: dict


def _uint_view(x: jax.Array) -> jax.Array:
    """The raw bits of x as uint32 (8-byte types gain a trailing axis of 2)."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if jnp.issubdtype(x.dtype, jnp.complexfloating):
        x = jnp.stack([x.real, x.imag])
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _leaf_check(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(all finite, digest). The digest sums a bijective mix of (bits, flat index) per element modulo 2**32:
    integer sums do not depend on reduction order or sharding, and any single changed element changes it."""
    finite = jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.bool_(True)
    bits = _uint_view(x)
    index = jnp.zeros(bits.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(bits.ndim)):  # flat index without a reshape, which could reshard
        index = index + jax.lax.broadcasted_iota(jnp.uint32, bits.shape, axis) * np.uint32(stride % 2**32)
        stride *= bits.shape[axis]
    mixed = (bits ^ (index * np.uint32(0x9E3779B1))) * np.uint32(0x85EBCA77)
    mixed = mixed ^ (mixed >> 15)
    return finite, jnp.sum(mixed, dtype=jnp.uint32)


_all_checks = jax.jit(lambda flats: jax.tree.map(_leaf_check, flats))


def _flat(tree: Any) -> dict[str, Any]:
    """Leaves keyed 'a/b/0' the same way for arrays, abstract arrays and Orbax metadata trees."""
    return {"/".join(key): leaf for key, leaf in ocp.tree.to_flat_dict(tree).items()}


def _inspect(items: Mapping[str, Any]) -> tuple[dict[str, dict[str, int]], list[str]]:
    """Digests per item and leaf, and the names of leaves holding NaN/Inf (one device sync in all)."""
    flats = {name: _flat(tree) for name, tree in items.items()}
    # One program for every leaf: many small cross-process programs in flight at once can stall
    # multi-process CPU runs (seen with gloo), and one dispatch is faster anyway.
    checks = jax.device_get(_all_checks(jax.tree.map(jnp.asarray, flats)))
    digests = {n: {k: int(d) for k, (_, d) in c.items()} for n, c in checks.items()}
    bad = [f"{n}/{k}" for n, c in checks.items() for k, (finite, _) in c.items() if not finite]
    return digests, bad


def _json_meta(meta: Mapping[str, Any]) -> dict:
    """meta as plain JSON (numpy scalars become Python numbers); refuses NaN and unserialisable values."""

    def default(value):
        if isinstance(value, np.generic | np.ndarray | jax.Array) and np.ndim(value) == 0:
            return np.asarray(value).item()
        raise TypeError(f"{type(value).__name__} value {value!r} is not JSON-serialisable")

    if not isinstance(meta, Mapping):
        raise TypeError(f"checkpoint meta must be a dict of JSON values, got {type(meta).__name__}")
    try:
        return json.loads(json.dumps(dict(meta), default=default, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"checkpoint meta is not plain JSON ({e}); pass str/int/float/bool/None, lists and dicts only "
            "(convert arrays with .tolist(), NaN/Inf are refused)"
        ) from e


def _abstract(tree: Any, what: str) -> Any:
    """Restore targets: ShapeDtypeStructs with a sharding (concrete jax.Arrays lend theirs)."""

    def leaf(path, x):
        if isinstance(x, jax.Array):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        if isinstance(x, jax.ShapeDtypeStruct) and x.sharding is not None:
            return x
        raise ValueError(
            f"{what}{jax.tree_util.keystr(path)} must be a jax.ShapeDtypeStruct with .sharding set (got {x!r}): "
            "build it with jax.eval_shape and attach the run's shardings, e.g. jax.tree.map(lambda s, sh: "
            "jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), abstract, shardings)"
        )

    return jax.tree_util.tree_map_with_path(leaf, tree)


def _check_compatible(directory: epath.Path, step: int, name: str, stored: Any, wanted: Any) -> None:
    """Raise CheckpointMismatchError when the stored tree differs in leaves, shapes or dtypes."""
    have = {k: (tuple(m.shape), np.dtype(m.dtype)) for k, m in _flat(stored).items()}
    want = {k: (tuple(s.shape), np.dtype(s.dtype)) for k, s in _flat(wanted).items()}
    diffs = [f"{k}: not in the checkpoint" for k in want.keys() - have.keys()]
    diffs += [f"{k}: in the checkpoint but not in this run" for k in have.keys() - want.keys()]
    diffs += [
        f"{k}: stored {have[k][0]} {have[k][1]}, this run {want[k][0]} {want[k][1]}"
        for k in sorted(want.keys() & have.keys())
        if have[k] != want[k]
    ]
    if diffs:
        raise CheckpointMismatchError(
            f"checkpoint step {step} in {directory} does not match this run's {name}: "
            + "; ".join(sorted(diffs)[:5])
            + (f" (and {len(diffs) - 5} more)" if len(diffs) > 5 else "")
            + ". The model or adapter config changed: resume with the original config, or start over in a "
            "new output_dir (or with --no-resume)."
        )


class _Damaged(Exception):
    """A step that exists but cannot be restored intact."""


class Checkpointer:
    """Latest-N and best-by-validation checkpoints of (adapter, opt_state, meta) under `output_dir`.

    Every process of a multi-host job constructs it and calls every method with the same arguments.
    """

    def __init__(
        self,
        output_dir: str | epath.PathLike,
        *,
        max_to_keep: int = 3,
        every: int = 1,
        async_save: bool = True,
    ):
        if not isinstance(max_to_keep, int) or max_to_keep < 1:
            raise ValueError(f"checkpoint.max_to_keep must be an integer >= 1, got {max_to_keep!r}")
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"checkpoint.every must be an integer >= 1, got {every!r}")
        # Orbax's OCDBT writer needs absolute paths (a relative one fails in the background save thread).
        path = os.fspath(output_dir)
        self.output_dir = epath.Path(path if "://" in path else os.path.abspath(path))
        self._barriers = 0

        def options(name: str, **kw) -> ocp.CheckpointManagerOptions:
            return ocp.CheckpointManagerOptions(
                enable_async_checkpointing=async_save,
                # Remove uncommitted steps a killed process left behind (primary host, at start).
                cleanup_tmp_directories=True,
                # Two managers in one job: without distinct barrier names their multi-host syncs cross-wire.
                multiprocessing_options=ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=name),
                **kw,
            )

        policies = ocp.checkpoint_managers
        self._latest = ocp.CheckpointManager(
            self.output_dir / LATEST_DIR,
            options=options(
                "denselora_latest",
                max_to_keep=max_to_keep,
                # No InitialSavePolicy: the first save is not special; preemption notices do force one.
                save_decision_policy=policies.AnySavePolicy(
                    [policies.FixedIntervalPolicy(every), policies.PreemptionCheckpointingPolicy()]
                ),
            ),
            handler_registry=self._registry(),
        )
        # BestN(1) over the `val_loss` metric: Orbax deletes the previous best only after the new one commits.
        self._best = ocp.CheckpointManager(
            self.output_dir / BEST_DIR,
            options=options(
                "denselora_best", max_to_keep=1, best_fn=lambda metrics: metrics["val_loss"], best_mode="min"
            ),
            handler_registry=self._registry(),
        )
        self._best_val_loss = self._stored_best_val_loss()

    @staticmethod
    def _registry() -> ocp.handlers.DefaultCheckpointHandlerRegistry:
        # Registered up front so item metadata is readable before this process has saved anything.
        registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
        for item in ("adapter", "opt_state"):
            registry.add(item, ocp.args.StandardSave)
            registry.add(item, ocp.args.StandardRestore)
        registry.add("meta", ocp.args.JsonSave)
        registry.add("meta", ocp.args.JsonRestore)
        return registry

    def _stored_best_val_loss(self) -> float | None:
        # Cached by the caller: Manager.metrics(step) reads a file that is absent while an async save runs.
        step = self._best.best_step()
        metrics = None if step is None else self._best.metrics(step)
        return None if not metrics else float(metrics["val_loss"])

    # -- queries ---------------------------------------------------------------------------------------
    def latest_step(self) -> int | None:
        return self._latest.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._latest.all_steps())

    def best_step(self) -> int | None:
        return self._best.best_step()

    def best_val_loss(self) -> float | None:
        """The kept best's validation loss (read from disk at start, so it survives restarts)."""
        return self._best_val_loss

    # -- saving ----------------------------------------------------------------------------------------
    def save(
        self, step: int, adapter: Any, opt_state: Any, meta: Mapping[str, Any], *, force: bool = False
    ) -> bool:
        """Save `step` when it is due (a multiple of `every`, or a preemption notice) or when `force`.

        Returns whether a save started (with async_save it completes in the background; `wait()` joins it).
        A step already saved returns False; a step older than the latest saved one is refused.
        """
        step = self._check_step(step)
        latest = self._latest.latest_step()
        if latest is not None and step < latest:
            raise ValueError(
                f"cannot save step {step}: {self._latest.directory} already holds step {latest}. Resume from "
                "it (restore_latest), or start over in a new output_dir (or with --no-resume)."
            )
        if step == latest or (not force and not self._latest.should_save(step)):
            return False
        self._write(self._latest, step, adapter, opt_state, meta, metrics=None)
        return True

    def save_best(
        self, step: int, adapter: Any, opt_state: Any, meta: Mapping[str, Any], val_loss: float
    ) -> bool:
        """Keep this step as the best when `val_loss` is lower than the stored best's; returns whether it did."""
        step = self._check_step(step)
        val_loss = float(val_loss)
        if not math.isfinite(val_loss):
            raise NonFiniteError(f"refusing to keep step {step} as best: validation loss is {val_loss}")
        best = self.best_val_loss()
        if best is not None and not val_loss < best:
            return False
        if step in self._best.all_steps():  # same step re-evaluated after a resume
            return False
        self._write(self._best, step, adapter, opt_state, meta, metrics={"val_loss": val_loss})
        self._best_val_loss = val_loss
        return True

    def _write(self, manager, step, adapter, opt_state, meta, metrics) -> None:
        # A failed background save (disk full, bad path) stops the run here, at the next save.
        self._latest.check_for_errors()
        self._best.check_for_errors()
        meta = _json_meta(meta)
        digests, bad = _inspect({"adapter": adapter, "opt_state": opt_state})
        if bad:
            raise NonFiniteError(
                f"refusing to checkpoint step {step}: NaN/Inf in {', '.join(bad[:8])}"
                + (f" and {len(bad) - 8} more leaves" if len(bad) > 8 else "")
                + f". Nothing was written; {manager.directory} still holds the last finite state."
            )
        args = ocp.args.Composite(
            adapter=ocp.args.StandardSave(adapter),
            opt_state=ocp.args.StandardSave(opt_state),
            meta=ocp.args.JsonSave(meta),
        )
        # Orbax copies the arrays to host before returning, so the caller may donate them right after.
        manager.save(step, args=args, metrics=metrics, force=True, custom_metadata={_DIGEST_KEY: digests})

    @staticmethod
    def _check_step(step: Any) -> int:
        if isinstance(step, bool) or not isinstance(step, int | np.integer) or step < 0:
            raise ValueError(f"checkpoint step must be a non-negative integer, got {step!r}")
        return int(step)

    # -- restoring -------------------------------------------------------------------------------------
    def latest_meta(self) -> dict | None:
        """The JSON meta of the newest checkpoint that has a readable one (no arrays read), or None."""
        self.wait()
        for step in sorted(self._latest.all_steps(), reverse=True):
            try:
                meta = self._latest.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))[
                    "meta"
                ]
            except Exception:  # a damaged step: restore_latest will skip it with a warning
                continue
            if isinstance(meta, dict):
                return meta
        return None

    def restore_latest(self, abstract_adapter: Any, abstract_opt_state: Any) -> Restored | None:
        """The newest intact checkpoint (older ones are tried when newer ones are damaged), or None if none
        exist. Arrays come back with the shardings of the abstract targets."""
        return self._restore(self._latest, abstract_adapter, abstract_opt_state)

    def restore_best(self, abstract_adapter: Any, abstract_opt_state: Any = None) -> Restored | None:
        """The best-by-validation checkpoint, or None if none was kept (opt_state None when not asked for)."""
        return self._restore(self._best, abstract_adapter, abstract_opt_state)

    def _restore(self, manager, abstract_adapter, abstract_opt_state) -> Restored | None:
        self.wait()
        targets = {"adapter": _abstract(abstract_adapter, "abstract_adapter")}
        if abstract_opt_state is not None:
            targets["opt_state"] = _abstract(abstract_opt_state, "abstract_opt_state")
        damaged: list[tuple[int, str]] = []
        for step in sorted(manager.all_steps(), reverse=True):
            try:
                restored = self._restore_step(manager, step, targets)
            except CheckpointMismatchError:
                raise
            except Exception as e:  # anything else means this step cannot be trusted
                first_line = (str(e).splitlines() or [""])[0].split(" See full TensorStore details")[0]
                reason = first_line if isinstance(e, _Damaged) else f"{type(e).__name__}: {first_line[:300]}"
                log.warning(
                    "checkpoint step %d in %s is damaged and skipped (%s)", step, manager.directory, reason
                )
                damaged.append((step, reason))
                continue
            if damaged:
                self._quarantine(manager, [s for s, _ in damaged])
                log.warning("restored step %d from %s instead", step, manager.directory)
            return restored
        if damaged:
            raise CheckpointCorruptError(
                f"no checkpoint in {manager.directory} can be restored intact: "
                + "; ".join(f"step {s}: {r}" for s, r in damaged)
                + ". Move the directory away to start over."
            )
        return None

    def _restore_step(self, manager, step: int, targets: dict[str, Any]) -> Restored:
        stored = manager.item_metadata(step)
        for name, target in targets.items():
            if stored.get(name) is None:
                raise _Damaged(f"item {name!r} is missing or its metadata is unreadable")
            _check_compatible(manager.directory, step, name, stored[name].tree, target)
        record = (manager.metadata(step).custom_metadata or {}).get(_DIGEST_KEY)
        if not record:
            raise _Damaged("its integrity record (_CHECKPOINT_METADATA) is missing")
        args = {name: ocp.args.StandardRestore(target) for name, target in targets.items()}
        out = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore(), **args))
        digests, _ = _inspect({name: out[name] for name in targets})
        for name in targets:
            differ = sorted(k for k, d in digests[name].items() if record.get(name, {}).get(k) != d)
            if differ:
                raise _Damaged(f"{name} leaves {differ[:5]} do not match the digest written at save time")
        if not isinstance(out["meta"], dict):
            raise _Damaged("its meta item is unreadable")
        return Restored(step, out["adapter"], out.get("opt_state"), out["meta"])

    def _quarantine(self, manager, steps: list[int]) -> None:
        """Move damaged steps out of Orbax's sight (kept for inspection) so those steps can be saved again."""
        if jax.process_index() == 0:
            dest_root = self.output_dir / CORRUPT_DIR
            dest_root.mkdir(parents=True, exist_ok=True)
            for step in steps:
                src = manager.directory / str(step)  # default Orbax step naming: the bare step number
                dest, n = dest_root / f"{manager.directory.name}_{step}", 0
                while dest.exists():
                    n += 1
                    dest = dest_root / f"{manager.directory.name}_{step}.{n}"
                src.rename(dest)
                log.warning("moved damaged checkpoint %s to %s", src, dest)
        self._barriers += 1
        ocp.multihost.sync_global_processes(f"denselora_checkpoint_quarantine_{self._barriers}")
        manager.reload()
        if manager is self._best:
            self._best_val_loss = self._stored_best_val_loss()

    # -- lifecycle -------------------------------------------------------------------------------------
    def wait(self) -> None:
        """Block until in-flight async saves have committed (re-raising their errors)."""
        self._latest.wait_until_finished()
        self._best.wait_until_finished()

    def close(self) -> None:
        self._latest.close()
        self._best.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
