"""Model-level properties: scan keeps the program size independent of depth; remat, unrolling and the
KV-cache path compute the same function; bf16 compute stays close to float32."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from denselora_jax import AdapterConfig, ModelConfig, forward, init_adapter, init_params
from denselora_jax.model.llama import forward_cached, init_cache

MC = ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=2)  # fmt: skip
AC = AdapterConfig(rank=4, targets=("q_proj", "v_proj", "o_proj", "down_proj"), dropout=0.1)


def _inputs():
    ids = np.random.RandomState(0).randint(0, MC.vocab_size, (2, 10))
    mask = np.ones_like(ids)
    mask[1, :3] = 0  # left padding
    return ids, mask


def _nonzero_adapter(mc):
    ad = init_adapter(mc, AC, jax.random.key(1))
    return jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.key(2), x.shape), ad)


def _program_size(layers, scan):
    mc = MC.replace(num_hidden_layers=layers, scan_layers=scan)
    params = jax.eval_shape(lambda: init_params(mc, jax.random.key(0)))
    adapter = jax.eval_shape(lambda: init_adapter(mc, AC, jax.random.key(0)))
    ids = jax.ShapeDtypeStruct((2, 16), jnp.int32)

    def loss(a, p, x):
        return forward(mc, p, x, adapter=a, adapter_config=AC, rng=jax.random.key(0)).sum()

    return len(jax.jit(jax.grad(loss)).lower(adapter, params, ids).as_text())


def test_scanned_program_does_not_grow_with_depth():
    small, deep = _program_size(2, True), _program_size(24, True)
    assert deep < 1.05 * small, (small, deep)
    assert _program_size(6, False) > 1.3 * _program_size(2, False)  # the unrolled control does grow


@pytest.mark.parametrize("variant", [dict(remat="full"), dict(remat="save_dots"), dict(scan_layers=False)])
def test_remat_and_unrolling_compute_the_same_function(variant):
    params, adapter = init_params(MC, jax.random.key(0)), _nonzero_adapter(MC)
    ids, mask = _inputs()

    def loss(mc, a):
        logits = forward(mc, params, ids, mask, adapter=a, adapter_config=AC, rng=jax.random.key(3))
        return jnp.sum(logits * mask[..., None])

    ref_val, ref_grad = jax.value_and_grad(lambda a: loss(MC, a))(adapter)
    val, grad = jax.value_and_grad(lambda a: loss(MC.replace(**variant), a))(adapter)
    np.testing.assert_allclose(val, ref_val, rtol=1e-5)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5), grad, ref_grad)


def test_cached_prefill_equals_full_forward():
    params, adapter = init_params(MC, jax.random.key(0)), _nonzero_adapter(MC)
    ids, mask = _inputs()
    full = forward(MC, params, ids, mask, adapter=adapter, adapter_config=AC)
    pos = np.maximum(np.cumsum(mask, -1) - 1, 0)
    cache = init_cache(MC, 2, 16)
    kv_mask = np.concatenate([mask, np.zeros((2, 6), mask.dtype)], axis=1)
    cached, _ = forward_cached(MC, params, ids, pos, kv_mask, cache, 0, adapter=adapter, adapter_config=AC)
    np.testing.assert_allclose(np.asarray(cached)[mask > 0], np.asarray(full)[mask > 0], atol=1e-5)


def test_bfloat16_compute_tracks_float32():
    params = init_params(MC, jax.random.key(0))
    ids, mask = _inputs()
    ref = forward(MC, params, ids, mask)
    bf = MC.replace(dtype="bfloat16", param_dtype="bfloat16")
    out = forward(bf, jax.tree.map(lambda x: x.astype(jnp.bfloat16), params), ids, mask)
    assert out.dtype == jnp.float32  # logits are returned in float32
    sel = mask > 0
    assert np.abs(np.asarray(out)[sel] - np.asarray(ref)[sel]).max() < 0.05 * np.abs(np.asarray(ref)).max()
