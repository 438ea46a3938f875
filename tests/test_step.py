"""The training step: exact loss/gradient/AdamW, accumulation, learning, masking, and mesh equivalence."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from denselora_jax import AdapterConfig, ModelConfig, init_adapter, init_params
from denselora_jax.adapters.core import adapter_axes
from denselora_jax.model.llama import forward, param_axes
from denselora_jax.sharding import batch_sharding, logical_to_mesh, make_mesh, opt_state_shardings, replicated
from denselora_jax.step import jit_train_step, make_optimizer, train_step

MC = ModelConfig(
    vocab_size=64,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=8,
    num_key_value_heads=4,
)
AC = AdapterConfig(rank=4, alpha=8.0, dropout=0.0)


@dataclasses.dataclass(frozen=True)
class Opt:
    learning_rate: float = 1e-2
    warmup_steps: int = 2
    weight_decay: float = 0.01
    max_grad_norm: float | None = None
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8


def _setup(ac=AC, seed=0):
    base = init_params(MC, jax.random.key(seed))
    adapter = init_adapter(MC, ac, jax.random.key(seed + 1))
    # A non-zero decoder, so that every adapter tensor gets a gradient from the first step.
    adapter = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(7), x.shape), adapter)
    return base, adapter


def _batch(rng, accum, rows, t, lengths=None):
    ids = rng.randint(0, MC.vocab_size, (accum, rows, t)).astype(np.int32)
    att = np.ones_like(ids)
    if lengths is not None:
        att = (np.arange(t)[None, None, :] < np.asarray(lengths)[..., None]).astype(np.int32)
    loss = att.copy()
    loss[..., :2] = 0  # an unmasked "prompt" of two tokens
    return {"input_ids": ids, "attention_mask": att, "loss_mask": loss}


def _reference_loss(adapter, base, batch):
    flat = {k: v.reshape(-1, v.shape[-1]) for k, v in batch.items()}
    logits = forward(MC, base, flat["input_ids"], flat["attention_mask"], adapter=adapter, adapter_config=AC)
    logp = jax.nn.log_softmax(logits[:, :-1], -1)
    nll = -jnp.take_along_axis(logp, flat["input_ids"][:, 1:, None], -1)[..., 0]
    w = flat["loss_mask"][:, 1:]
    return jnp.sum(nll * w) / jnp.sum(w)


def test_one_step_equals_reference_adamw():
    base, adapter = _setup()
    batch = _batch(np.random.RandomState(0), 2, 3, 12, lengths=[[12, 7, 9], [5, 12, 10]])
    oc = Opt()
    tx = make_optimizer(oc, total_steps=10)
    new, _, m = train_step(MC, AC, tx, False, adapter, tx.init(adapter), base, batch, None)
    loss, grads = jax.value_and_grad(_reference_loss)(adapter, base, batch)
    np.testing.assert_allclose(m["loss"], loss, rtol=1e-5)
    lr = oc.learning_rate * 1 / oc.warmup_steps * 0  # step 0 of a linear warmup from 0: lr = 0
    lr1 = float(tx_lr(oc, 0))
    assert lr1 == lr
    # Second step, at lr = peak/2: compare with hand-written AdamW (bias-corrected, decoupled decay).
    opt_state = tx.init(adapter)
    a1, s1, _ = train_step(MC, AC, tx, False, adapter, opt_state, base, batch, None)
    a2, _, _ = train_step(MC, AC, tx, False, a1, s1, base, batch, None)
    g0 = grads
    g1 = jax.grad(_reference_loss)(a1, base, batch)

    def adamw(p, g0, g1):
        m_, v_ = 0.1 * g0, 0.001 * g0**2
        m_, v_ = 0.9 * m_ + 0.1 * g1, 0.999 * v_ + 0.001 * g1**2
        mh, vh = m_ / (1 - 0.9**2), v_ / (1 - 0.999**2)
        return p - float(tx_lr(oc, 1)) * (mh / (jnp.sqrt(vh) + oc.eps) + oc.weight_decay * p)

    expected = jax.tree.map(adamw, a1, g0, g1)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6), a2, expected)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(x, y), a1, adapter)  # lr 0 at step 0
    assert new is not None


def tx_lr(oc, step):
    from denselora_jax.step import learning_rate_schedule

    return learning_rate_schedule(oc, 10)(step)


def test_accumulation_equals_one_large_batch():
    base, adapter = _setup()
    batch = _batch(np.random.RandomState(1), 4, 2, 10, lengths=[[10, 3], [6, 10], [4, 4], [10, 9]])
    big = {k: v.reshape(1, 8, 10) for k, v in batch.items()}
    tx = make_optimizer(Opt(warmup_steps=0), total_steps=10)
    a_acc, _, m_acc = train_step(MC, AC, tx, False, adapter, tx.init(adapter), base, batch, None)
    a_big, _, m_big = train_step(MC, AC, tx, False, adapter, tx.init(adapter), base, big, None)
    np.testing.assert_allclose(m_acc["loss"], m_big["loss"], rtol=1e-6)
    np.testing.assert_allclose(m_acc["grad_norm"], m_big["grad_norm"], rtol=1e-5)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), a_acc, a_big)


def test_all_masked_batch_contributes_nothing():
    base, adapter = _setup()
    batch = _batch(np.random.RandomState(2), 1, 2, 8)
    batch["loss_mask"][:] = 0
    tx = make_optimizer(Opt(warmup_steps=0), total_steps=10)
    new, _, m = train_step(MC, AC, tx, False, adapter, tx.init(adapter), base, batch, None)
    assert np.isfinite(m["loss"]) and float(m["loss"]) == 0.0 and bool(m["skipped"])
    jax.tree.map(np.testing.assert_array_equal, new, adapter)


def test_loss_falls_on_learnable_task():
    base = init_params(MC, jax.random.key(0))
    # A random head with std 0.02 caps every logit near zero (the final RMSNorm fixes the input scale), so
    # give the frozen head the scale of a trained model's logits.
    base["lm_head"]["kernel"] = base["lm_head"]["kernel"] * 25
    adapter = init_adapter(MC, AC, jax.random.key(3))
    tx = make_optimizer(Opt(learning_rate=1e-2, warmup_steps=0, weight_decay=0.0), total_steps=40)
    step = jax.jit(lambda a, s, b: train_step(MC, AC, tx, False, a, s, base, b, None))
    rng = np.random.RandomState(0)
    state, losses = tx.init(adapter), []
    for _ in range(40):
        # Learnable: each next token is the current one plus one, modulo 16.
        ids = ((rng.randint(0, 16, (1, 8, 1)) + np.arange(12)) % 16).astype(np.int32)
        b = {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": np.ones_like(ids)}
        adapter, state, m = step(adapter, state, b)
        losses.append(float(m["loss"]))
    assert np.mean(losses[-5:]) < 0.2 * np.mean(losses[:5]), losses


ALL_MESHES = [(1, 1, 1), (8, 1, 1), (2, 2, 2), (1, 4, 2), (1, 8, 1), (4, 2, 1), (1, 2, 4)]


@pytest.mark.parametrize(
    "method,meshes", [("denselora", ALL_MESHES), ("lora", [(1, 1, 1), (2, 2, 2), (1, 2, 4)])]
)
def test_mesh_shapes_give_same_result(method, meshes):
    ac = AdapterConfig(method=method, rank=4, alpha=8.0, dropout=0.05)
    base0, adapter0 = _setup(ac)
    batches = [_batch(np.random.RandomState(10 + i), 2, 8, 16, lengths=None) for i in range(2)]
    results = {}
    for shape in meshes:
        devices = jax.devices()[: int(np.prod(shape))]
        mesh = make_mesh(shape, devices)
        base_sh = logical_to_mesh(param_axes(MC), mesh)
        ad_sh = logical_to_mesh(adapter_axes(MC, ac), mesh)
        tx = make_optimizer(Opt(warmup_steps=1), total_steps=10)
        opt_sh = opt_state_shardings(tx, jax.eval_shape(lambda: adapter0), ad_sh, mesh)
        step = jit_train_step(
            MC,
            ac,
            tx,
            skip_nonfinite=False,
            adapter_sh=ad_sh,
            opt_sh=opt_sh,
            base_sh=base_sh,
            batch_sh=batch_sharding(mesh),
            repl=replicated(mesh),
        )
        base = jax.device_put(base0, base_sh)
        adapter = jax.device_put(jax.tree.map(jnp.copy, adapter0), ad_sh)
        state = jax.device_put(tx.init(adapter0), opt_sh)
        losses = []
        for i, b in enumerate(batches):
            adapter, state, m = step(adapter, state, base, b, jax.random.fold_in(jax.random.key(0), i))
            losses.append(float(m["loss"]))
        results[shape] = (losses, jax.tree.map(np.asarray, adapter))
    ref_losses, ref_ad = results[(1, 1, 1)]
    for shape, (losses, ad) in results.items():
        np.testing.assert_allclose(losses, ref_losses, rtol=2e-5, err_msg=str(shape))
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5), ad, ref_ad)
    assert ref_losses[-1] != ref_losses[0]
