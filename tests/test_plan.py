"""The memory planner against XLA's compiled memory analysis of the real training step (tiny configs).

Stated tolerance: the step's arguments (weights, adapter, optimizer state, batch) are counted exactly; the
temporaries XLA allocates (gradients, saved activations, working sets) are estimated within -40% / +40% on
these configs, fsdp meshes included: the model pins its activations to the batch sharding (llama.constrain);
without that, XLA kept them 2.5-3.5x larger on the (1, 8, 1) mesh.
"""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from denselora_jax import AdapterConfig, ModelConfig
from denselora_jax.adapters.core import abstract_adapter, adapter_axes
from denselora_jax.config import OptimizerSection
from denselora_jax.model.llama import abstract_params, param_axes
from denselora_jax.plan import main, parse_bytes, plan_memory, saved_residual_bytes
from denselora_jax.sharding import (
    batch_sharding,
    logical_to_mesh,
    make_mesh,
    mesh_axes,
    opt_state_shardings,
    replicated,
    shard_shape,
)
from denselora_jax.step import jit_train_step, make_optimizer

CONFIG_8B = str(pathlib.Path(__file__).resolve().parents[1] / "configs" / "llama3_8b_denselora_r16.yaml")
MESH = (2, 1, 4)
ROWS, T, ACCUM = 2, 128, 2


def _config(remat: str) -> ModelConfig:
    return ModelConfig(
        vocab_size=4096, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=4, remat=remat, dtype="bfloat16", param_dtype="bfloat16",
    )  # fmt: skip


def _xla_memory(mc: ModelConfig, ac: AdapterConfig, shape):
    mesh = make_mesh(shape, jax.devices()[: int(np.prod(shape))])
    ad_sh = logical_to_mesh(adapter_axes(mc, ac), mesh)
    tx = make_optimizer(OptimizerSection(), total_steps=10)
    abstract_ad = abstract_adapter(mc, ac)
    step = jit_train_step(
        mc, ac, tx, skip_nonfinite=False, adapter_sh=ad_sh, opt_sh=opt_state_shardings(tx, abstract_ad, ad_sh, mesh),
        base_sh=logical_to_mesh(param_axes(mc), mesh), batch_sh=batch_sharding(mesh), repl=replicated(mesh),
    )  # fmt: skip
    rows = ROWS * shape[0] * shape[1]
    batch = {
        k: jax.ShapeDtypeStruct((ACCUM, rows, T), jnp.int32)
        for k in ("input_ids", "attention_mask", "loss_mask")
    }
    lowered = step.lower(
        abstract_ad, jax.eval_shape(tx.init, abstract_ad), abstract_params(mc), batch, jax.random.key(0)
    )
    return lowered.compile().memory_analysis()


@pytest.mark.parametrize(
    "mesh,remat",
    [(MESH, "none"), (MESH, "full"), (MESH, "save_dots"), ((1, 8, 1), "none"), ((1, 8, 1), "full"),
     ((1, 8, 1), "save_dots"), ((2, 2, 2), "full")],
)  # fmt: skip
def test_plan_matches_xla_memory_analysis(mesh, remat):
    mc, ac = _config(remat), AdapterConfig(rank=8)
    xla = _xla_memory(mc, ac, mesh)
    p = plan_memory(mc, ac, mesh_shape=mesh, micro_batch=ROWS, seq_len=T, accum_steps=ACCUM)
    assert p.base + p.adapter + p.opt_state + p.batch == xla.argument_size_in_bytes
    temp = p.gradients + p.activations + p.largest_temporary
    assert 0.6 * xla.temp_size_in_bytes <= temp <= 1.4 * xla.temp_size_in_bytes, (
        temp,
        xla.temp_size_in_bytes,
    )


def test_remat_policies_order_the_activations():
    plans = {r: plan_memory(_config(r), AdapterConfig(rank=8), mesh_shape=MESH, micro_batch=ROWS, seq_len=T)
             for r in ("none", "save_dots", "full")}  # fmt: skip
    assert plans["none"].activations > plans["save_dots"].activations > plans["full"].activations
    # Saved activations grow with the micro-batch; the weights do not.
    bigger = plan_memory(
        _config("none"), AdapterConfig(rank=8), mesh_shape=MESH, micro_batch=2 * ROWS, seq_len=T
    )
    assert bigger.activations > 1.8 * plans["none"].activations and bigger.base == plans["none"].base


def test_per_device_weights_follow_the_rules_table_on_fsdp_meshes():
    """Weights per device on a (2, 2, 2) mesh: the sum of each parameter's device block, as JAX shards it."""
    mc = _config("full")
    mesh = make_mesh((2, 2, 2))
    abstract, specs = abstract_params(mc), mesh_axes(param_axes(mc))
    shardings = logical_to_mesh(param_axes(mc), mesh)
    want = sum(
        np.prod(sh.shard_shape(a.shape)) * jnp.dtype(a.dtype).itemsize
        for a, sh in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings))
    )
    for a, s, sh in zip(
        jax.tree.leaves(abstract),
        jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)),
        jax.tree.leaves(shardings),
    ):
        assert shard_shape(a.shape, s, dict(mesh.shape)) == sh.shard_shape(a.shape)
    assert plan_memory(mc, AdapterConfig(), mesh_shape=(2, 2, 2), micro_batch=1, seq_len=16).base == want


def test_cli_llama3_8b_on_8_chips(capsys):
    code = main(["--config", CONFIG_8B, "--preset", "llama3-8b", "--mesh", "1x8x1",
                 "--device-memory", "16GiB", "--micro-batch", "2"])  # fmt: skip
    out = capsys.readouterr().out
    assert "fsdp=8" in out and "base weights" in out and "remat=full" in out
    assert ("fits in 16.00 GiB" in out) == (code == 0)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--mesh", "1x1x3"], "tensor axis (3) does not divide"),
        (["--mesh", "2x2"], "data x fsdp x tensor"),
        (["--device-memory", "lots"], "not a size"),
    ],
)
def test_cli_refuses_bad_input(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--config", CONFIG_8B, "--preset", "llama3-8b", *argv])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_parse_bytes():
    assert (
        parse_bytes("80GiB") == 80 * 2**30
        and parse_bytes("16 GB") == 16 * 10**9
        and parse_bytes("1024") == 1024
    )


def test_full_remat_activations_do_not_count_the_weights():
    """Under remat=full only each layer's input is kept: a 4x wider MLP changes no saved activation (the
    stacked weights the layer scan passes as uint16 bitcasts are inputs, not new buffers)."""
    mc, ac = _config("full"), AdapterConfig(rank=8)
    wide = mc.replace(intermediate_size=4 * mc.intermediate_size)
    narrow_bytes = saved_residual_bytes(mc, ac, ROWS, T)
    assert saved_residual_bytes(wide, ac, ROWS, T) == narrow_bytes
    assert narrow_bytes >= mc.num_hidden_layers * ROWS * T * mc.hidden_size * 2  # the layer inputs
