"""`python -m denselora_jax.plan`: will a run fit? Per-device memory of a training step, from shapes alone.

    python -m denselora_jax.plan --config configs/llama3_8b_denselora_r16.yaml --preset llama3-8b \
        --mesh 1x8x1 --device-memory 16GiB [--micro-batch N] [--seq-len N] [key.sub=value ...]

Nothing is allocated and nothing is compiled. Weights, adapter, optimizer state, gradients and the batch are
counted exactly from the abstract trees and the sharding rules (sharding.py), per device of the mesh. The
activations are the residuals JAX saves for the backward pass under the config's remat policy, traced
abstractly (jax.make_jaxpr of the step's vjp) on one device's share of the model: micro_batch_size rows
(the batch is split over data x fsdp) and 1/tensor of the heads, kv heads, MLP and vocabulary. The largest
temporary is the working set of the backward pass of one layer (its activations and their cotangents), or
of the output head, whichever is larger, plus the weights FSDP gathers for it. tests/test_plan.py checks
the total against XLA's compiled memory analysis on tiny configs.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import sys

import jax
import jax.numpy as jnp
from jax.extend.core import Literal

from denselora_jax import config as cfglib
from denselora_jax.adapters.config import AdapterConfig
from denselora_jax.adapters.core import abstract_adapter, adapter_axes
from denselora_jax.model.config import ModelConfig, Remat
from denselora_jax.model.llama import abstract_params, param_axes
from denselora_jax.sharding import MESH_AXES, mesh_axes, opt_state_axes, shard_shape
from denselora_jax.step import loss_sums, make_optimizer

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_KEY_BYTES = 8  # a threefry PRNG key: two uint32


def _nbytes(aval) -> int:
    if jax.dtypes.issubdtype(aval.dtype, jax.dtypes.prng_key):
        return math.prod(aval.shape) * _KEY_BYTES
    return math.prod(aval.shape) * jnp.dtype(aval.dtype).itemsize


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Bytes per device of one training step (the peak, as the parts below add up)."""

    mesh_shape: tuple[int, int, int]
    micro_batch: int  # rows per device per micro-step
    seq_len: int
    accum_steps: int
    remat: Remat
    base: int  # frozen weights
    adapter: int
    opt_state: int
    gradients: int  # the accumulated gradient and one micro-batch's gradient (float32, like the adapter)
    batch: int  # the step's token, attention and loss-mask arrays (and its PRNG key)
    activations: int  # saved for the backward pass of one micro-batch, under `remat`
    largest_temporary: int  # backward working set of one layer or of the head, + weights FSDP gathers
    device_memory: int | None = None

    @property
    def total(self) -> int:
        return (
            self.base + self.adapter + self.opt_state + self.gradients + self.batch + self.activations
            + self.largest_temporary
        )  # fmt: skip

    @property
    def fits(self) -> bool | None:
        return None if self.device_memory is None else self.total <= self.device_memory


def _per_device(abstract, logical_specs, mesh_sizes: dict[str, int]) -> int:
    """Bytes one device holds of a tree of abstract arrays sharded by its logical specs."""
    specs = jax.tree.leaves(
        mesh_axes(logical_specs), is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)
    )
    leaves = jax.tree.leaves(abstract)
    assert len(specs) == len(leaves)
    return sum(
        math.prod(shard_shape(a.shape, s, mesh_sizes)) * jnp.dtype(a.dtype).itemsize
        for a, s in zip(leaves, specs)
    )


def device_share(mc: ModelConfig, tensor: int) -> ModelConfig:
    """The model as one device of a `tensor`-way tensor-parallel group computes it: its share of the
    heads, kv heads, MLP width and vocabulary (the residual stream stays whole)."""
    kv = max(1, mc.num_key_value_heads // tensor)
    return mc.replace(
        num_attention_heads=max(kv, mc.num_attention_heads // tensor),
        num_key_value_heads=kv,
        head_dim=mc.head_dim,
        intermediate_size=-(-mc.intermediate_size // tensor),
        vocab_size=-(-mc.vocab_size // tensor),
    )


def saved_residual_bytes(mc: ModelConfig, ac: AdapterConfig, rows: int, seq_len: int) -> int:
    """Bytes JAX keeps from the forward pass of one micro-batch [rows, seq_len] for its backward pass
    (adapter gradients only; the model's remat policy applies). Inputs (weights, batch) are not counted."""
    batch = {
        k: jax.ShapeDtypeStruct((rows, seq_len), jnp.int32)
        for k in ("input_ids", "attention_mask", "loss_mask")
    }
    rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)

    def fwd(adapter, base, batch, key):
        return jax.vjp(lambda a: loss_sums(mc, ac, a, base, batch, key), adapter)

    closed, shapes = jax.make_jaxpr(fwd, return_shape=True)(
        abstract_adapter(mc, ac), abstract_params(mc), batch, rng
    )
    n_res = len(jax.tree.leaves(shapes[1]))
    inputs, seen, total = set(closed.jaxpr.invars), set(), 0
    producer = {o: e for e in closed.jaxpr.eqns for o in e.outvars}

    def input_buffer(v) -> bool:
        """v is an input, or a same-width bitcast of one (the stacked weights ride the layer scan as
        uint16): no new buffer."""
        while v not in inputs:
            e = producer.get(v)
            if e is None or e.primitive.name != "bitcast_convert_type":
                return False
            if e.invars[0].aval.dtype.itemsize != v.aval.dtype.itemsize:
                return False
            v = e.invars[0]
        return True

    for v in closed.jaxpr.outvars[len(closed.jaxpr.outvars) - n_res :]:
        if isinstance(v, Literal) or v in seen or input_buffer(v):
            continue
        seen.add(v)
        total += _nbytes(v.aval)
    return total


def _working_sets(share: ModelConfig, ac: AdapterConfig, rows: int, seq_len: int) -> tuple[int, int, int]:
    """(one layer's full activations, the head's activations, the head's weight-only residuals), from
    residuals without remat at 1 and 2 layers (the difference is one layer) and at `rows` and 2 x `rows`
    (activations grow with the rows, values computed from weights alone do not)."""
    plain = share.replace(remat=Remat.NONE)
    r = {
        (n, b): saved_residual_bytes(plain.replace(num_hidden_layers=n), ac, b, seq_len)
        for n in (1, 2)
        for b in (rows, 2 * rows)
    }
    layer = r[2, rows] - r[1, rows]
    head, head_2x = r[1, rows] - layer, r[1, 2 * rows] - (r[2, 2 * rows] - r[1, 2 * rows])
    head_rows = head_2x - head
    return layer, head_rows, head - head_rows


def _layer_weight_bytes(mc: ModelConfig, tensor: int) -> tuple[int, int]:
    """(one layer's frozen weights, the output head's) as one device of the tensor group holds them
    once FSDP has gathered them."""
    params = abstract_params(mc)
    specs = param_axes(mc)
    gathered = dict.fromkeys(MESH_AXES, 1) | {"tensor": tensor}
    layers = _per_device(params["layers"], specs["layers"], gathered) // mc.num_hidden_layers
    head_key = "embed_tokens" if mc.tie_word_embeddings else "lm_head"
    return layers, _per_device(params[head_key], specs[head_key], gathered)


def plan_memory(
    mc: ModelConfig,
    ac: AdapterConfig,
    *,
    mesh_shape: tuple[int, int, int],
    micro_batch: int,
    seq_len: int,
    accum_steps: int = 1,
    optimizer: cfglib.OptimizerSection | None = None,
    device_memory: int | None = None,
) -> MemoryPlan:
    """Per-device memory of a training step of `mc` + `ac` on a (data, fsdp, tensor) mesh."""
    sizes = dict(zip(MESH_AXES, mesh_shape))
    tensor, fsdp = sizes["tensor"], sizes["fsdp"]
    tx = make_optimizer(optimizer or cfglib.OptimizerSection(), total_steps=1)
    abstract_ad, ad_specs = abstract_adapter(mc, ac), adapter_axes(mc, ac)
    adapter = _per_device(abstract_ad, ad_specs, sizes)
    opt_state = _per_device(
        jax.eval_shape(tx.init, abstract_ad), opt_state_axes(tx, abstract_ad, ad_specs), sizes
    )
    base = _per_device(abstract_params(mc), param_axes(mc), sizes)

    share = device_share(mc, tensor)
    activations = saved_residual_bytes(share, ac, micro_batch, seq_len)
    layer_act, head_rows, head_fixed = _working_sets(share, ac, micro_batch, seq_len)
    layer_w, head_w = _layer_weight_bytes(mc, tensor) if fsdp > 1 else (0, 0)
    # An activation and its cotangent are alive together during that part of the backward pass; values
    # computed from weights alone (e.g. a weight cast to float32) get no cotangent.
    largest = max(2 * layer_act + layer_w, 2 * head_rows + head_fixed + head_w)
    return MemoryPlan(
        mesh_shape=tuple(mesh_shape), micro_batch=micro_batch, seq_len=seq_len, accum_steps=accum_steps,
        remat=mc.remat, base=base, adapter=adapter, opt_state=opt_state, gradients=2 * adapter,
        batch=3 * 4 * accum_steps * micro_batch * seq_len + _KEY_BYTES, activations=activations, largest_temporary=largest,
        device_memory=device_memory,
    )  # fmt: skip


# --- command line --------------------------------------------------------------------------------------
def parse_bytes(text: str) -> int:
    """'80GiB', '16 GB', '24e9' -> bytes."""
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([A-Za-z]*)\s*", text)
    unit = m and m.group(2).upper()
    if not m or unit not in _UNITS:
        raise ValueError(f"device memory {text!r} is not a size; write e.g. 80GiB, 16GiB or 24GB.")
    return int(float(m.group(1)) * _UNITS[unit])


def parse_mesh(text: str) -> tuple[int, int, int]:
    parts = text.lower().replace(",", "x").split("x")
    if len(parts) != 3 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"--mesh {text!r}: give data x fsdp x tensor sizes, e.g. 1x8x1.")
    return int(parts[0]), int(parts[1]), int(parts[2])


def human(n: int) -> str:
    for unit in ("GiB", "MiB", "KiB"):
        if n >= _UNITS[unit.upper()]:
            return f"{n / _UNITS[unit.upper()]:.2f} {unit}"
    return f"{n} B"


def format_plan(name: str, p: MemoryPlan) -> str:
    d, f, t = p.mesh_shape
    rows = [
        ("base weights", p.base), ("adapter", p.adapter), ("optimizer state", p.opt_state),
        ("gradients", p.gradients), ("batch", p.batch), (f"activations (remat={p.remat})", p.activations),
        ("largest temporary", p.largest_temporary),
    ]  # fmt: skip
    lines = [
        f"{name} on mesh data={d} x fsdp={f} x tensor={t} ({d * f * t} devices); per device: micro-batch "
        f"{p.micro_batch} x {p.seq_len} tokens, {p.accum_steps} accumulation step(s)",
        *(f"  {label:<28}{human(n):>12}" for label, n in rows),
        f"  {'total':<28}{human(p.total):>12}",
    ]
    if p.device_memory is not None:
        verdict = "fits" if p.fits else "does NOT fit"
        lines.append(f"  {verdict} in {human(p.device_memory)} ({100 * p.total / p.device_memory:.0f}% used)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m denselora_jax.plan",
        description="Per-device memory of a training run (weights, adapter, optimizer, activations) and "
        "whether it fits, computed from shapes without allocating anything.",
    )
    ap.add_argument("--config", default=cfglib.DEFAULT_CONFIG, help="run config YAML (default: the demo)")
    ap.add_argument("--preset", help="model preset instead of model.path's config (e.g. llama3-8b)")
    ap.add_argument("--mesh", help="data x fsdp x tensor, e.g. 1x8x1 (default: mesh.shape, else 1x1x1)")
    ap.add_argument("--device-memory", help="memory of one device, e.g. 80GiB")
    ap.add_argument("--micro-batch", type=int, help="rows per device per micro-step (train.micro_batch_size)")
    ap.add_argument("--seq-len", type=int, help="tokens per row (default data.cutoff_len)")
    ap.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    args = ap.parse_args(argv)
    try:
        overrides = list(args.overrides)
        if args.micro_batch is not None:
            overrides.append(f"train.micro_batch_size={args.micro_batch}")
        cfg = cfglib.load_config(args.config, overrides)
        mesh = parse_mesh(args.mesh) if args.mesh else tuple(cfg.mesh.shape or (1, 1, 1))
        cfg = cfg.override(f"mesh.shape=[{','.join(map(str, mesh))}]")
        cfglib.validate_against_devices(cfg, math.prod(mesh))
        rt = cfg.model.runtime_kwargs()
        if args.preset:
            mc, name = ModelConfig.from_preset(args.preset, **rt), args.preset
        else:
            from denselora_jax.params import read_model_config

            path = cfglib.resolve_model_path(cfg.model.path)
            mc, name = read_model_config(path).replace(**rt), cfg.model.path
        cfglib.validate_against_model(cfg, mc)
        # Plan for an accelerator (activations in the compute dtype), even when run on a CPU host.
        mc = mc.replace(activation_dtype=mc.activation_dtype or mc.dtype)
        device_memory = parse_bytes(args.device_memory) if args.device_memory else None
        dp = mesh[0] * mesh[1]
        plan = plan_memory(
            mc, cfg.adapter, mesh_shape=mesh, micro_batch=cfg.train.micro_batch_size,
            seq_len=args.seq_len or cfg.data.cutoff_len,
            accum_steps=cfg.train.batch_size // (cfg.train.micro_batch_size * dp),
            optimizer=cfg.optimizer, device_memory=device_memory,
        )  # fmt: skip
    except (ValueError, OSError) as e:  # ConfigError is a ValueError
        ap.exit(2, f"{ap.prog}: error: {e}\n")
    print(format_plan(name, plan))
    return 0 if plan.fits is not False else 1


if __name__ == "__main__":
    sys.exit(main())
