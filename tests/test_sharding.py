"""The sharding layout: a golden file of every PartitionSpec, its invariants, and sharded loading.

tests/golden/partition_specs.json holds {path: {shape, spec}} of the base, adapter (DenseLoRA shared and
LoRA) and AdamW state trees of a tiny config on a (2, 2, 2) mesh. A change of the rules table or of a tree
layout fails here; when it is intended, regenerate the file with UPDATE_GOLDEN=1 and review its diff.
"""

import json
import os
import pathlib

import jax
import numpy as np
import pytest
from test_loading import expected_tree, save_tiny

from denselora_jax import AdapterConfig, ModelConfig
from denselora_jax.adapters.core import abstract_adapter, adapter_axes
from denselora_jax.config import OptimizerSection
from denselora_jax.model.llama import abstract_params, param_axes
from denselora_jax.model.loading import fingerprint, load_pretrained
from denselora_jax.model.weights import CheckpointError
from denselora_jax.sharding import (
    logical_to_mesh,
    make_mesh,
    mesh_axes,
    opt_state_axes,
    opt_state_shardings,
    spec_table,
)
from denselora_jax.step import make_optimizer

GOLDEN = pathlib.Path(__file__).parent / "golden" / "partition_specs.json"
MESH_SHAPE = (2, 2, 2)
MC = ModelConfig(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)
ADAPTERS = {
    "denselora": AdapterConfig(
        method="denselora", rank=4, targets=("q_proj", "k_proj", "o_proj", "down_proj")
    ),
    "lora": AdapterConfig(method="lora", rank=4, targets=("q_proj", "k_proj", "o_proj", "down_proj")),
}
# Clipping on, so the golden file also covers the state of a chained transformation.
OPT = OptimizerSection(max_grad_norm=1.0)


def _json_spec(spec) -> list:
    return [list(e) if isinstance(e, tuple) else e for e in spec]


def _shapes(abstract) -> dict[str, tuple[int, ...]]:
    leaves = jax.tree_util.tree_flatten_with_path(abstract)[0]
    return {jax.tree_util.keystr(p, simple=True, separator="/"): tuple(x.shape) for p, x in leaves}


def _entries(shardings, abstract) -> dict:
    specs, shapes = spec_table(shardings), _shapes(abstract)
    assert specs.keys() == shapes.keys()
    return {k: {"shape": list(shapes[k]), "spec": _json_spec(v)} for k, v in specs.items()}


def _current() -> dict:
    mesh = make_mesh(MESH_SHAPE)
    out = {
        "mesh": dict(mesh.shape),
        "base": _entries(logical_to_mesh(param_axes(MC), mesh), abstract_params(MC)),
    }
    for name, ac in ADAPTERS.items():
        abstract_ad = abstract_adapter(MC, ac)
        ad_sh = logical_to_mesh(adapter_axes(MC, ac), mesh)
        tx = make_optimizer(OPT, total_steps=10)
        out[f"adapter_{name}"] = _entries(ad_sh, abstract_ad)
        out[f"opt_state_{name}"] = _entries(
            opt_state_shardings(tx, abstract_ad, ad_sh, mesh), jax.eval_shape(tx.init, abstract_ad)
        )
    return out


def _dump(golden: dict) -> str:
    """JSON with one line per parameter, so that a layout change reads as a short diff."""
    trees = []
    for tree, entries in sorted(golden.items()):
        if tree == "mesh":
            trees.append(f' "mesh": {json.dumps(entries)}')
            continue
        body = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in sorted(entries.items()))
        trees.append(f" {json.dumps(tree)}: {{\n{body}\n }}")
    return "{\n" + ",\n".join(trees) + "\n}\n"


def test_partition_specs_match_golden_file():
    current = _current()
    if os.environ.get("UPDATE_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(_dump(current))
    golden = json.loads(GOLDEN.read_text())
    for tree in sorted(set(golden) | set(current)):
        want, have = golden.get(tree, {}), current.get(tree, {})
        diffs = [f"{k}: golden {want.get(k)} now {have.get(k)}" for k in sorted(set(want) | set(have))]
        diffs = [d for d, k in zip(diffs, sorted(set(want) | set(have))) if want.get(k) != have.get(k)]
        assert not diffs, (
            f"{tree}: the sharding layout changed ({len(diffs)} entries):\n  "
            + "\n  ".join(diffs[:20])
            + "\nIf intended, regenerate with UPDATE_GOLDEN=1 pytest tests/test_sharding.py and commit the diff."
        )


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_rank_axis_replicated_and_shared_tensors_are_single(name):
    ac = ADAPTERS[name]
    mesh = make_mesh(MESH_SHAPE)
    sh, abstract = logical_to_mesh(adapter_axes(MC, ac), mesh), abstract_adapter(MC, ac)
    specs, shapes = spec_table(sh), _shapes(abstract)
    dims = MC.projection_dims()
    for path, spec in specs.items():
        tensor = path.split("/")[-1]
        rank_dims = {"encoder": [-1], "decoder": [-2], "dense": [-2, -1], "lora_A": [-1], "lora_B": [-2]}[
            tensor
        ]
        spec = tuple(spec) + (None,) * (len(shapes[path]) - len(spec))
        assert all(spec[d] is None for d in rank_dims), f"{path}: rank axis sharded ({spec})"
        assert all(shapes[path][d] == ac.rank for d in rank_dims)
        if path.startswith("layers/"):
            assert shapes[path][0] == MC.num_hidden_layers and spec[0] is None  # the scanned layer axis
    if ac.method == "denselora":
        for t in ac.targets:  # one encoder and one decoder per target for the whole model: no layer axis
            assert shapes[f"shared/{t}/encoder"] == (dims[t][0], ac.rank)
            assert shapes[f"shared/{t}/decoder"] == (ac.rank, dims[t][1])
            assert not any(p.startswith(f"layers/{t}/") and "coder" in p for p in specs)


def test_opt_state_axes_agree_with_shardings():
    ac, mesh = ADAPTERS["denselora"], make_mesh(MESH_SHAPE)
    tx = make_optimizer(OPT, total_steps=10)
    abstract_ad = abstract_adapter(MC, ac)
    from_axes = spec_table(opt_state_axes(tx, abstract_ad, mesh_axes(adapter_axes(MC, ac))))
    from_sh = spec_table(
        opt_state_shardings(tx, abstract_ad, logical_to_mesh(adapter_axes(MC, ac), mesh), mesh)
    )
    assert from_axes == from_sh
    # Every moment is sharded exactly like its parameter.
    ad = spec_table(mesh_axes(adapter_axes(MC, ac)))
    moments = {k: v for k, v in from_axes.items() if "/mu/" in k or "/nu/" in k}
    assert len(moments) == 2 * len(ad)
    for k, v in moments.items():
        assert v == ad[k.split("/mu/")[-1].split("/nu/")[-1]], k


@pytest.mark.parametrize("overrides", [dict(), dict(attention_bias=True, mlp_bias=True, head_dim=32)])
def test_sharded_loading_equals_unsharded(tmp_path, overrides):
    """Loading onto a (1, 8, 1) mesh (fsdp over all 8 devices) reads per-device slices; the values equal
    the unsharded load and the layout is the rules table's."""
    model = save_tiny(tmp_path, num_attention_heads=8, num_key_value_heads=8, **overrides)
    _, ref = load_pretrained(tmp_path)
    mesh = make_mesh((1, 8, 1))
    base_sh = logical_to_mesh(param_axes(_config_of(ref, tmp_path)), mesh)
    config, params = load_pretrained(tmp_path, shardings=base_sh)
    assert jax.tree.structure(params) == jax.tree.structure(ref)
    want = expected_tree(model)
    for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
        key = tuple(k.key for k in path)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(_get(ref, key)), err_msg=str(key))
        np.testing.assert_array_equal(np.asarray(x), want[key], err_msg=str(key))
        assert x.sharding == _get(base_sh, key), key
        shard_shapes = {s.data.shape for s in x.addressable_shards}
        assert shard_shapes == {x.sharding.shard_shape(x.shape)}
    # The embedding really is split over the 8 devices (embed axis over fsdp).
    emb = params["embed_tokens"]["embedding"]
    assert emb.addressable_shards[0].data.shape == (emb.shape[0], emb.shape[1] // 8)
    assert fingerprint(config, params) == fingerprint(config, ref)


def test_tensor_and_head_slices_with_tensor_parallel(tmp_path):
    """A (1, 2, 4) mesh cuts heads, kv heads, the MLP and the vocab over `tensor` and embed over `fsdp`."""
    model = save_tiny(tmp_path, num_attention_heads=8, num_key_value_heads=4, attention_bias=True)
    _, ref = load_pretrained(tmp_path)
    base_sh = logical_to_mesh(param_axes(_config_of(ref, tmp_path)), make_mesh((1, 2, 4)))
    _, params = load_pretrained(tmp_path, shardings=base_sh)
    want = expected_tree(model)
    for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
        key = tuple(k.key for k in path)
        np.testing.assert_array_equal(np.asarray(x), want[key], err_msg=str(key))
        assert x.sharding == _get(base_sh, key)


def _config_of(params, path):
    from denselora_jax.model.loading import open_checkpoint

    with open_checkpoint(path) as src:
        return src.config(param_dtype=np.dtype(params["embed_tokens"]["embedding"].dtype).name)


def _get(tree, key):
    for k in key:
        tree = tree[k]
    return tree


@pytest.mark.parametrize(
    "change,message",
    [
        (
            {"intermediate_size": 80},
            r"gate_proj\.weight has shape \(96, 64\), but the model config implies \(80, 64\)",
        ),
        ({"tie_word_embeddings": False}, r"tensor lm_head\.weight is missing"),
    ],
)
def test_sharded_loading_refuses_a_wrong_checkpoint(tmp_path, change, message):
    save_tiny(tmp_path, tie_word_embeddings=True)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, **change}))
    mesh = make_mesh((1, 8, 1))
    with pytest.raises(CheckpointError, match=message):
        load_pretrained(tmp_path, shardings=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
