"""`python -m denselora_jax.train`: fine-tune a frozen LLaMA with DenseLoRA (or LoRA/DoRA).

Owns the run: distributed start-up, mesh, loading, data, the jitted step, validation, Orbax checkpoints
(resume by default), SIGTERM/SIGINT handling, metrics and the final adapter export. With no arguments it
runs the packaged demo (configs/demo.yaml).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from denselora_jax import config as cfglib
from denselora_jax.adapters.core import abstract_adapter, adapter_axes, init_adapter
from denselora_jax.adapters.io import save_adapter
from denselora_jax.checkpoint import Checkpointer
from denselora_jax.data import BatchLayout, TrainBatches, eval_batches, prepare_data
from denselora_jax.model.llama import param_axes
from denselora_jax.model.loading import fingerprint, load_pretrained, load_tokenizer, open_checkpoint
from denselora_jax.sharding import (
    batch_sharding,
    data_parallel_size,
    logical_to_mesh,
    make_mesh,
    opt_state_shardings,
    put_global_batch,
    replicated,
)
from denselora_jax.step import jit_eval_step, jit_train_step, learning_rate_schedule, make_optimizer


class NonFiniteLossError(RuntimeError):
    pass


def _env_int(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    if not value.isdigit():
        raise cfglib.ConfigError(f"environment variable {name}={value!r} must be a non-negative integer.")
    return int(value)


def _cluster_launcher() -> str | None:
    """The multi-process launcher jax.distributed.initialize() configures itself from, if any; looked up
    in the environment (and the PCI bus for TPU chips) without starting JAX's backends."""
    env = os.environ
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return "JAX_COORDINATOR_ADDRESS"
    if env.get("SLURM_JOB_ID") and (_env_int("SLURM_NTASKS") or 1) > 1:
        return "SLURM"
    if (_env_int("OMPI_COMM_WORLD_SIZE") or 1) > 1:
        return "Open MPI"
    if "," in env.get("TPU_WORKER_HOSTNAMES", "") + env.get("TPU_PROCESS_ADDRESSES", ""):
        return "Cloud TPU (GKE)"
    try:  # private, but how JAX itself finds TPU chips before start-up; a TPU VM learns its slice from GCE
        from jax._src import hardware_utils

        if hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0:
            return "Cloud TPU VM"
    except (ImportError, AttributeError, OSError):
        pass
    return None


def init_distributed(dc: cfglib.DistributedSection) -> None:
    """jax.distributed.initialize when asked: by the config (distributed.*), by JAX_COORDINATOR_ADDRESS
    (+ JAX_NUM_PROCESSES, JAX_PROCESS_ID), or automatically under SLURM, Open MPI and on Cloud TPU (where
    every worker runs the same command). Config keys win over environment variables."""
    if dc.initialize == cfglib.DistInit.FALSE or jax.distributed.is_initialized():
        return
    address = dc.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
    num = dc.num_processes if dc.num_processes is not None else _env_int("JAX_NUM_PROCESSES")
    pid = dc.process_id if dc.process_id is not None else _env_int("JAX_PROCESS_ID")
    launcher = _cluster_launcher()
    if dc.initialize == cfglib.DistInit.AUTO and launcher is None and (address, num, pid) == (None,) * 3:
        return  # a single process
    if launcher in (None, "JAX_COORDINATOR_ADDRESS") and None in (address, num, pid):
        missing = [k for k, v in (("coordinator_address", address), ("num_processes", num),
                                  ("process_id", pid)) if v is None]  # fmt: skip
        raise cfglib.ConfigError(
            f"multi-process start-up needs distributed.{', distributed.'.join(missing)} (no SLURM, Open MPI "
            "or Cloud TPU environment provides them): set distributed.coordinator_address=HOST:PORT of "
            "process 0, distributed.num_processes and distributed.process_id on every process (or "
            "JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID), or distributed.initialize=false."
        )
    # Cross-process collectives of the CPU backend (tests, CPU clusters) go over gloo; GPU/TPU ignore it.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=address, num_processes=num, process_id=pid)


def _with_shardings(abstract, shardings):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


class MetricsLog:
    """output_dir/metrics.jsonl (one line per logged step) and TensorBoard events; process 0 only."""

    def __init__(self, out: str, tensorboard: bool, enabled: bool):
        self.file = open(os.path.join(out, "metrics.jsonl"), "a") if enabled else None  # noqa: SIM115
        self.writer = None
        if enabled and tensorboard:
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(os.path.join(out, "tensorboard"))

    def write(self, record: dict) -> None:
        if self.file is None:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        for k, v in record.items():
            if self.writer is not None and k != "step":
                self.writer.add_scalar(k, v, record["step"])

    def close(self) -> None:
        for f in (self.file, self.writer):
            if f is not None:
                f.close()


class Run:
    """Everything a training run holds; built by setup(), driven by train()."""

    def __init__(self, cfg: cfglib.RunConfig, resume: bool):
        self.cfg, c = cfg, cfg
        self.lead = jax.process_index() == 0
        mesh_shape = cfglib.validate_against_devices(c, jax.device_count())
        model_path = cfglib.resolve_model_path(c.model.path)
        with open_checkpoint(model_path) as src:  # config only: validate before reading any weight
            arch = src.config()
        cfglib.validate_against_model(c, arch)
        self.ckpt = self._checkpointer()
        if not resume:
            self._start_over()
        saved = self.ckpt.latest_meta()
        if saved is not None:  # refuse an incompatible earlier run before any compute
            cfglib.check_resume_compatible(cfglib.RunConfig.from_dict(saved["config"]), c)
        self.mesh = make_mesh(mesh_shape)
        self.log(
            f"mesh {dict(self.mesh.shape)} on {jax.device_count()} devices, {jax.process_count()} process(es)"
        )
        rt = c.model.runtime_kwargs()
        base_sh = logical_to_mesh(param_axes(arch), self.mesh)
        mc, self.base = load_pretrained(
            model_path, dtype=rt["param_dtype"], shardings=base_sh, compute_dtype=rt["dtype"],
            scan_layers=rt["scan_layers"], remat=rt["remat"],
        )  # fmt: skip
        self.mc, ac = mc, c.adapter
        self.base_fp = fingerprint(mc, self.base)
        self.tokenizer = load_tokenizer(c.model.tokenizer or model_path)
        self.data = prepare_data(
            cfglib.resolve_data_files(c.data.train_files), self.tokenizer, cutoff_len=c.data.cutoff_len,
            val_size=c.data.val_size, train_on_inputs=c.data.train_on_inputs,
            skip_invalid=c.data.skip_invalid, seed=c.train.seed,
        )  # fmt: skip
        self.log(self.data.summary())
        self.layout = BatchLayout(
            c.train.batch_size, c.train.micro_batch_size, data_parallel_size=data_parallel_size(self.mesh),
            process_index=jax.process_index(), process_count=jax.process_count(),
        )  # fmt: skip
        self.batches = TrainBatches(self.data.train, self.layout, seed=c.train.seed)
        self.total_steps = c.train.max_steps or c.train.epochs * self.batches.steps_per_epoch
        self.tx = make_optimizer(c.optimizer, self.total_steps)
        self.lr = learning_rate_schedule(c.optimizer, self.total_steps)

        abstract_ad = abstract_adapter(mc, ac)
        self.ad_sh = logical_to_mesh(adapter_axes(mc, ac), self.mesh)
        self.opt_sh = opt_state_shardings(self.tx, abstract_ad, self.ad_sh, self.mesh)
        repl = replicated(self.mesh)
        kw = dict(adapter_sh=self.ad_sh, base_sh=base_sh, repl=repl)
        self.train_step = jit_train_step(
            mc, ac, self.tx, skip_nonfinite=c.train.skip_nonfinite, opt_sh=self.opt_sh,
            batch_sh=batch_sharding(self.mesh, 1), **kw,
        )  # fmt: skip
        self.eval_step = jit_eval_step(mc, ac, batch_sh=batch_sharding(self.mesh, 0), **kw)

        self.step, restored = 0, None
        if self.ckpt.latest_step() is not None:
            abstract_opt = jax.eval_shape(self.tx.init, abstract_ad)
            restored = self.ckpt.restore_latest(
                _with_shardings(abstract_ad, self.ad_sh), _with_shardings(abstract_opt, self.opt_sh)
            )
        if restored is not None:
            if restored.meta.get("base_fingerprint") not in (None, self.base_fp):
                raise cfglib.ConfigError(
                    f"{c.output_dir} was trained on different base weights (fingerprint mismatch); choose "
                    "another output_dir, or pass --no-resume to start over there."
                )
            self.step, self.adapter, self.opt_state = restored.step, restored.adapter, restored.opt_state
            self.log(f"resumed from step {self.step} in {c.output_dir}")
        else:
            init = jax.jit(
                lambda b: init_adapter(mc, ac, jax.random.key(c.train.seed), b), out_shardings=self.ad_sh
            )
            self.adapter = init(self.base)
            self.opt_state = jax.jit(self.tx.init, out_shardings=self.opt_sh)(self.adapter)
        self.stop_signal: str | None = None
        # Skipped non-finite updates, counted over the whole run (restarts included).
        self.nonfinite_skipped = int(restored.meta.get("nonfinite_skipped", 0)) if restored else 0

    # --- helpers -------------------------------------------------------------------------------------
    def log(self, msg: str) -> None:
        if self.lead:
            tqdm.write(f"[denselora_jax] {msg}", file=sys.stderr)

    def _checkpointer(self) -> Checkpointer:
        c = self.cfg.checkpoint
        return Checkpointer(
            self.cfg.output_dir, max_to_keep=c.max_to_keep, every=c.every, async_save=c.async_save
        )

    def _start_over(self) -> None:
        """--no-resume: earlier checkpoints are moved aside (never deleted), then a fresh manager."""
        self.ckpt.close()
        if self.lead:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            for name in ("checkpoints", "checkpoints_best"):
                old = os.path.join(self.cfg.output_dir, name)
                if os.path.isdir(old):
                    os.replace(old, f"{old}.old-{stamp}")
        multihost_utils.sync_global_devices("denselora_start_over")
        self.ckpt = self._checkpointer()

    def meta(self) -> dict:
        return {
            "step": self.step, "data_position": self.step, "config": self.cfg.to_dict(),
            "base_fingerprint": self.base_fp, "data_fingerprint": self.data.train.fingerprint(),
            "nonfinite_skipped": self.nonfinite_skipped,
        }  # fmt: skip

    def validation_loss(self) -> float | None:
        if self.data.val is None:
            return None
        nll, n = 0.0, 0.0
        p = dict(process_index=jax.process_index(), process_count=jax.process_count())
        for eb in eval_batches(self.data.val, self.layout.micro_rows, **p):
            arrays = put_global_batch(
                eb.arrays(), batch_sharding(self.mesh, 0), self.layout.micro_rows, axis=0
            )
            s, k = self.eval_step(self.adapter, self.base, arrays)
            nll, n = nll + float(s), n + float(k)
        return nll / max(n, 1.0)

    def _on_signal(self, signum, frame) -> None:
        self.stop_signal = signal.Signals(signum).name  # finish the step, save, exit 0

    def _agreed_stop(self) -> str | None:
        """The stop request, agreed by every process: a signal reaching one host (a preempted VM) stops all
        of them after the same step, so that none is left waiting in the next step's collectives."""
        stop = self.stop_signal
        if jax.process_count() == 1:
            return stop
        flags = multihost_utils.process_allgather(np.int32(stop is not None))
        if stop is None and np.any(flags):
            stop = f"stop requested on process {int(np.argmax(flags))}"
        return stop

    # --- the loop -------------------------------------------------------------------------------------
    def train(self, until_step: int | None = None) -> dict:
        """Train to the end (or stop after `until_step`, saving, as a preempted run would)."""
        c, out = self.cfg, self.cfg.output_dir
        os.makedirs(out, exist_ok=True)
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, self._on_signal)
        metrics = MetricsLog(out, c.logging.tensorboard, enabled=self.lead)
        val_before = self.validation_loss()
        if val_before is not None:
            self.log(f"validation loss at step {self.step}: {val_before:.4f}")
        bar = tqdm(
            total=self.total_steps, initial=self.step, disable=not (self.lead and c.logging.progress_bar)
        )
        repl_rows = self.layout.micro_rows
        val_loss, t_last, tok_since = None, time.perf_counter(), 0
        for batch in self.batches(self.step, self.total_steps):
            arrays = put_global_batch(batch.arrays(), batch_sharding(self.mesh, 1), repl_rows, axis=1)
            rng = jax.random.fold_in(jax.random.key(c.train.seed), batch.step)
            self.adapter, self.opt_state, m = self.train_step(
                self.adapter, self.opt_state, self.base, arrays, rng
            )
            self.step = batch.step + 1
            m = jax.device_get(m)
            if not m["finite"]:
                if not c.train.skip_nonfinite:
                    raise NonFiniteLossError(
                        f"non-finite loss or gradient at step {batch.step} (loss={m['loss']}); no checkpoint "
                        f"was written for it. Lower optimizer.learning_rate, set optimizer.max_grad_norm, or "
                        f"set train.skip_nonfinite=true to skip such updates."
                    )
                self.nonfinite_skipped += 1
                self.log(f"step {batch.step}: non-finite loss or gradient, update skipped")
            tok_since += batch.num_tokens
            bar.update(1)
            record = None
            if self.step % c.train.log_every == 0 or self.step == self.total_steps:
                now = time.perf_counter()
                record = {
                    "step": self.step, "loss": float(m["loss"]), "lr": float(self.lr(batch.step)),
                    "grad_norm": float(m["grad_norm"]), "tokens_per_s": tok_since / (now - t_last),
                }  # fmt: skip
                if c.train.skip_nonfinite:
                    record["skipped_updates"] = self.nonfinite_skipped  # so far, over resumes too
                t_last, tok_since = now, 0
                bar.set_postfix(
                    loss=f"{record['loss']:.4f}",
                    lr=f"{record['lr']:.2e}",
                    tok_s=f"{record['tokens_per_s']:.0f}",
                )
            if self.step % c.train.eval_every == 0 or self.step == self.total_steps:
                val_loss = self.validation_loss()
                if val_loss is not None:
                    record = {**(record or {"step": self.step}), "val_loss": val_loss}
                    self.log(f"step {self.step}: validation loss {val_loss:.4f}")
                    self.ckpt.save_best(self.step, self.adapter, self.opt_state, self.meta(), val_loss)
            if record is not None:
                metrics.write(record)
            if until_step is not None and self.step >= until_step and self.stop_signal is None:
                self.stop_signal = f"until_step={until_step}"
            stop = (
                self._agreed_stop()
            )  # read once: a signal arriving during the save stops after the next step
            last = self.step == self.total_steps or stop is not None
            self.ckpt.save(self.step, self.adapter, self.opt_state, self.meta(), force=last)
            if stop is not None:
                self.log(f"{stop}: saved step {self.step}; rerun the same command to continue")
                break
        bar.close()
        self.ckpt.wait()
        if self.step >= self.total_steps:
            self.export()
        metrics.close()
        self.ckpt.close()
        return {"step": self.step, "val_loss_before": val_before, "val_loss_after": val_loss}

    def export(self) -> None:
        """The adapter (best by validation when validation ran, else the last) as save_adapter files."""
        adapter, which = self.adapter, "last"
        if self.ckpt.best_step() is not None:
            abstract = _with_shardings(abstract_adapter(self.mc, self.cfg.adapter), self.ad_sh)
            adapter, which = self.ckpt.restore_best(abstract).adapter, f"best (step {self.ckpt.best_step()})"
        host = multihost_utils.process_allgather(adapter, tiled=True)
        if self.lead:
            path = os.path.join(self.cfg.output_dir, "adapter")
            save_adapter(
                path, jax.tree.map(np.asarray, host), self.cfg.adapter, base_fingerprint=self.base_fp
            )
            self.log(f"exported the {which} adapter to {path}")


def main(argv=None) -> int:
    cfg, flags = cfglib.parse_args(argv)
    try:
        init_distributed(cfg.distributed)
        run = Run(cfg, resume=flags.resume)
    except (cfglib.ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        result = run.train()
    except NonFiniteLossError as e:
        run.ckpt.close()  # let the last finite state's save (async) commit before exiting
        print(f"error: {e}", file=sys.stderr)
        return 1
    # None when validation is off, or (after) when no evaluation ran: stopped early, or resumed at the end.
    if None not in (result["val_loss_before"], result["val_loss_after"]) and jax.process_index() == 0:
        print(
            f"validation loss: before {result['val_loss_before']:.4f}, after {result['val_loss_after']:.4f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
