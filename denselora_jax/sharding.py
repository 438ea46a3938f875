"""The device mesh and the one rules table that maps logical axis names to mesh axes.

Base weights are sharded over `fsdp` (embed) and `tensor` (heads, kv_heads, mlp, vocab); the batch over
`data` and `fsdp`; the adapter rank axis and the layer axis are never sharded. The adapter and the
optimizer moments use the same table (moments shard like their parameter), so one change here moves all
three trees; tests/golden/partition_specs.json records the result.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("lora_rank", None),
    ("lora_rank_out", None),  # the second rank axis of the dense r x r matrix
    ("length", None),
    ("activation_embed", None),  # activations keep their hidden axis whole; the batch carries fsdp
)


def make_mesh(shape: Sequence[int] | None = None, devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh; shape None puts every device on `data`."""
    devices = list(jax.devices() if devices is None else devices)
    shape = tuple(shape) if shape is not None else (len(devices), 1, 1)
    if len(shape) != len(MESH_AXES):
        raise ValueError(f"mesh.shape must have {len(MESH_AXES)} entries {MESH_AXES}, got {list(shape)}.")
    if math.prod(shape) != len(devices):
        raise ValueError(
            f"mesh.shape {list(shape)} holds {math.prod(shape)} devices but {len(devices)} are present; "
            f"make the product of mesh.shape equal {len(devices)}."
        )
    # Classic GSPMD (Auto axes): jit propagates shardings from the explicit in/out shardings.
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(shape), devices=devices)


def with_rules(fn, mesh: Mesh, rules=RULES):
    """fn, traced with `mesh` and the rules table in context, so that the model's activation constraints
    (llama.constrain) bind to mesh axes. jit it; outside such a context those constraints are no-ops."""

    @functools.wraps(fn)
    def traced(*args, **kwargs):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
            return fn(*args, **kwargs)

    return traced


def logical_to_mesh(specs, mesh: Mesh, rules=RULES):
    """A tree of logical PartitionSpecs -> a tree of NamedShardings on `mesh`."""
    return nn.logical_to_mesh_sharding(specs, mesh, rules)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, leading: int = 1) -> NamedSharding:
    """For [accum, rows, T] (leading=1) or [rows, T] (leading=0) batch arrays: rows over data x fsdp."""
    return NamedSharding(mesh, PartitionSpec(*([None] * leading), ("data", "fsdp"), None))


def mesh_axes(logical_specs, rules=RULES):
    """A tree of logical PartitionSpecs -> the same tree of mesh-axis PartitionSpecs (no mesh needed)."""
    return jax.tree.map(
        lambda s: nn.logical_to_mesh_axes(s, rules),
        logical_specs,
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def opt_state_axes(tx: optax.GradientTransformation, abstract_adapter, adapter_specs):
    """PartitionSpecs of the optimizer state: moments like their parameter, scalars (counts) replicated."""
    return optax.tree_map_params(
        tx,
        lambda _, spec: spec,
        jax.eval_shape(tx.init, abstract_adapter),
        adapter_specs,
        transform_non_params=lambda _: PartitionSpec(),
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def opt_state_shardings(tx: optax.GradientTransformation, abstract_adapter, adapter_shardings, mesh: Mesh):
    """Optimizer moments shard like the adapter; scalars (step counts) are replicated."""
    abstract_state = jax.eval_shape(tx.init, abstract_adapter)
    return optax.tree_map_params(
        tx,
        lambda _, sh: sh,
        abstract_state,
        adapter_shardings,
        transform_non_params=lambda _: replicated(mesh),
    )


def spec_table(tree) -> dict[str, PartitionSpec]:
    """{"a/b/c": PartitionSpec} of a tree of Shardings or PartitionSpecs (for reports and golden files)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, PartitionSpec))[0]
    return {
        jax.tree_util.keystr(path, simple=True, separator="/"): getattr(leaf, "spec", leaf)
        for path, leaf in leaves
    }


def shard_shape(shape: Sequence[int], spec: PartitionSpec, mesh_shape: dict[str, int]) -> tuple[int, ...]:
    """The per-device block of a global `shape` under a mesh-axis `spec` (ceil where the axis does not
    divide, as XLA pads), for a mesh given only by its axis sizes."""
    out = []
    for i, n in enumerate(shape):
        entry = spec[i] if i < len(spec) else None
        names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        out.append(-(-n // math.prod(mesh_shape[a] for a in names)))
    return tuple(out)


def data_parallel_size(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


def put_global_batch(batch: dict[str, np.ndarray], sharding: NamedSharding, global_rows: int, axis: int):
    """Assemble a global array from this process's rows (each process holds only its share)."""

    def one(x):
        shape = list(x.shape)
        shape[axis] = global_rows
        return jax.make_array_from_process_local_data(sharding, x, tuple(shape))

    return {k: one(v) for k, v in batch.items()}
