"""The frozen LLaMA decoder as Flax linen modules, with adapters interposed functionally.

Parameter names mirror HF (see weights.py for the conversion table). Layers are stacked on a `layers` axis
and run with nn.scan (scan_layers=False fully unrolls the same scan, keeping one parameter layout). The
adapter tree is an ordinary argument: per-layer tensors are scanned with the layers, DenseLoRA's shared
encoders/decoders are broadcast into every layer, never copied.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from denselora_jax.adapters.config import AdapterConfig
from denselora_jax.adapters.core import adapted_projection
from denselora_jax.model.config import ModelConfig, Remat, RopeType

f32 = jnp.float32
_REMAT_POLICY = {
    Remat.FULL: jax.checkpoint_policies.nothing_saveable,
    Remat.SAVE_DOTS: jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def rope_inv_freq(c: ModelConfig) -> np.ndarray:
    """Inverse RoPE frequencies, computed as HF does (float32), with linear/llama3 scaling."""
    dim = c.head_dim
    inv = (1.0 / (np.float32(c.rope_theta) ** (np.arange(0, dim, 2).astype(np.float32) / dim))).astype(
        np.float32
    )
    rs = c.rope_scaling
    if rs is None or rs.rope_type == RopeType.DEFAULT:
        return inv
    if rs.rope_type == RopeType.LINEAR:
        return (inv / rs.factor).astype(np.float32)
    old = rs.original_max_position_embeddings
    low_wavelen, high_wavelen = old / rs.low_freq_factor, old / rs.high_freq_factor
    wavelen = 2 * math.pi / inv
    inv_l = np.where(wavelen > low_wavelen, inv / rs.factor, inv)
    smooth = (old / wavelen - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor)
    smoothed = (1 - smooth) * inv_l / rs.factor + smooth * inv_l
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, inv_l).astype(np.float32)


def apply_rope(x_btnh, pos_bt, inv_freq):
    freqs = pos_bt.astype(f32)[..., None] * inv_freq  # [b, t, h/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(emb).astype(x_btnh.dtype), jnp.sin(emb).astype(x_btnh.dtype)
    x1, x2 = jnp.split(x_btnh, 2, axis=-1)
    return x_btnh * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


class RMSNorm(nn.Module):
    eps: float
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    axes: tuple = ("embed",)

    @nn.compact
    def __call__(self, x):
        w = self.param(
            "weight",
            nn.with_logical_partitioning(nn.initializers.ones, self.axes),
            x.shape[-1:],
            self.param_dtype,
        )
        x32 = x.astype(f32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return w.astype(self.dtype) * y.astype(self.dtype)


class Proj(nn.Module):
    """A frozen linear map over the trailing `in_shape` dims, with an optional adapter around it."""

    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    axes: tuple[str, ...]
    use_bias: bool
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x, adapt=None):
        init = nn.initializers.normal(0.02)
        w = self.param(
            "kernel",
            nn.with_logical_partitioning(init, self.axes),
            self.in_shape + self.out_shape,
            self.param_dtype,
        )
        d_in, d_out = math.prod(self.in_shape), math.prod(self.out_shape)
        lead = x.shape[: x.ndim - len(self.in_shape)]
        x_bi = x.reshape(*lead, d_in).astype(self.dtype)
        w_io = w.reshape(d_in, d_out)
        y_bo = jnp.dot(x_bi, w_io.astype(self.dtype), preferred_element_type=f32)
        b_o = None
        if self.use_bias:
            axes = self.axes[len(self.in_shape) :]
            b = self.param(
                "bias",
                nn.with_logical_partitioning(nn.initializers.zeros, axes),
                self.out_shape,
                self.param_dtype,
            )
            b_o = b.reshape(d_out).astype(f32)
            y_bo = y_bo + b_o
        if adapt is not None:
            y_bo = adapt(self.name, x_bi, w_io, b_o, y_bo)
        return y_bo.astype(self.dtype).reshape(*lead, *self.out_shape)


class Attention(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x_btd, adapt, pos_bt, kv_mask_bs, cache, cache_index):
        c = self.config
        dt, pdt, bias = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype), c.attention_bias
        H, KV, hd, D = c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.hidden_size
        q_btnh = Proj((D,), (H, hd), ("embed", "heads", "head_dim"), bias, dt, pdt, name="q_proj")(
            x_btd, adapt
        )
        k_btkh = Proj((D,), (KV, hd), ("embed", "kv_heads", "head_dim"), bias, dt, pdt, name="k_proj")(
            x_btd, adapt
        )
        v_btkh = Proj((D,), (KV, hd), ("embed", "kv_heads", "head_dim"), bias, dt, pdt, name="v_proj")(
            x_btd, adapt
        )
        inv_freq = rope_inv_freq(c)
        q_btnh, k_btkh = apply_rope(q_btnh, pos_bt, inv_freq), apply_rope(k_btkh, pos_bt, inv_freq)
        b, t = x_btd.shape[:2]
        if cache is not None:  # decoding: write this chunk's keys/values at cache_index, attend to the cache
            k_btkh = jax.lax.dynamic_update_slice_in_dim(
                cache["k"], k_btkh.astype(cache["k"].dtype), cache_index, 1
            )
            v_btkh = jax.lax.dynamic_update_slice_in_dim(
                cache["v"], v_btkh.astype(cache["v"].dtype), cache_index, 1
            )
            cache = {"k": k_btkh, "v": v_btkh}
        s = k_btkh.shape[1]
        # Causal over slots (query slot = cache_index + i) and only keys the mask marks as real tokens.
        q_slot = cache_index + jnp.arange(t)
        allowed_bts = (jnp.arange(s)[None, :] <= q_slot[:, None])[None] & (kv_mask_bs[:, None, :] > 0)
        q_btkgh = q_btnh.reshape(b, t, KV, H // KV, hd)
        scores = jnp.einsum("btkgh,bskh->bkgts", q_btkgh, k_btkh.astype(dt), preferred_element_type=f32)
        scores = jnp.where(allowed_bts[:, None, None], scores / math.sqrt(hd), jnp.finfo(f32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(dt)
        o_btkgh = jnp.einsum("bkgts,bskh->btkgh", probs, v_btkh.astype(dt), preferred_element_type=f32)
        o_btnh = o_btkgh.reshape(b, t, H, hd).astype(dt)
        o_proj = Proj((H, hd), (D,), ("heads", "head_dim", "embed"), bias, dt, pdt, name="o_proj")
        return o_proj(o_btnh, adapt), cache


class MLP(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x_btd, adapt):
        c = self.config
        dt, pdt, bias, D, F = (
            jnp.dtype(c.dtype),
            jnp.dtype(c.param_dtype),
            c.mlp_bias,
            c.hidden_size,
            c.intermediate_size,
        )
        gate = Proj((D,), (F,), ("embed", "mlp"), bias, dt, pdt, name="gate_proj")(x_btd, adapt)
        up = Proj((D,), (F,), ("embed", "mlp"), bias, dt, pdt, name="up_proj")(x_btd, adapt)
        return Proj((F,), (D,), ("mlp", "embed"), bias, dt, pdt, name="down_proj")(
            jax.nn.silu(gate) * up, adapt
        )


class DecoderLayer(nn.Module):
    config: ModelConfig
    adapter_config: AdapterConfig | None

    @nn.compact
    def __call__(self, x_btd, layer_ad, shared_ad, rng, pos_bt, kv_mask_bs, cache, cache_index):
        c, ac = self.config, self.adapter_config
        dt, pdt = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)

        def adapt(name, x_bi, w_io, b_o, y_bo):
            if ac is None or name not in ac.targets:
                return y_bo
            p = {**(shared_ad or {}).get(name, {}), **layer_ad[name]}
            key = None if rng is None else jax.random.fold_in(rng, ac.targets.index(name))
            return adapted_projection(ac, x_bi, w_io, b_o, y_bo, p, key)

        h_btd = RMSNorm(c.rms_norm_eps, dt, pdt, name="input_layernorm")(x_btd)
        a_btd, cache = Attention(c, name="self_attn")(h_btd, adapt, pos_bt, kv_mask_bs, cache, cache_index)
        x_btd = x_btd + a_btd
        h_btd = RMSNorm(c.rms_norm_eps, dt, pdt, name="post_attention_layernorm")(x_btd)
        return x_btd + MLP(c, name="mlp")(h_btd, adapt), cache


class Llama(nn.Module):
    config: ModelConfig
    adapter_config: AdapterConfig | None = None

    @nn.compact
    def __call__(self, input_ids_bt, pos_bt, kv_mask_bs, adapter, rng, cache, cache_index):
        c = self.config
        dt, pdt, L = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype), c.num_hidden_layers
        emb_vd = Embed(c.vocab_size, c.hidden_size, pdt, name="embed_tokens")()
        x_btd = jnp.take(emb_vd, input_ids_bt, axis=0).astype(dt)

        layer_cls = DecoderLayer
        if c.remat != Remat.NONE:
            layer_cls = nn.remat(layer_cls, policy=_REMAT_POLICY[c.remat], prevent_cse=False)
        scanned = nn.scan(
            layer_cls,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(0, nn.broadcast, 0, nn.broadcast, nn.broadcast, 0, nn.broadcast),
            length=L,
            unroll=1 if c.scan_layers else L,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        adapter = adapter or {}
        rngs = None if rng is None else jax.random.split(rng, L)
        x_btd, cache = scanned(c, self.adapter_config, name="layers")(
            x_btd, adapter.get("layers"), adapter.get("shared"), rngs, pos_bt, kv_mask_bs, cache, cache_index
        )
        x_btd = RMSNorm(c.rms_norm_eps, dt, pdt, name="norm")(x_btd)
        if c.tie_word_embeddings:
            logits_btv = jnp.einsum("btd,vd->btv", x_btd, emb_vd.astype(dt), preferred_element_type=f32)
        else:
            head = Proj(
                (c.hidden_size,), (c.vocab_size,), ("embed", "vocab"), False, f32, pdt, name="lm_head"
            )
            logits_btv = head(x_btd)
        return logits_btv, cache


class Embed(nn.Module):
    vocab_size: int
    features: int
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self):
        init = nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed"))
        return self.param("embedding", init, (self.vocab_size, self.features), self.param_dtype)


# --- functional API ----------------------------------------------------------------------------------------


def positions_from_mask(mask_bt: jax.Array) -> jax.Array:
    """Position ids as HF generate derives them: count of real tokens before each one (pads get 0)."""
    return jnp.maximum(jnp.cumsum(mask_bt, axis=-1) - 1, 0).astype(jnp.int32)


def forward(
    config: ModelConfig,
    params,
    input_ids,
    attention_mask=None,
    *,
    adapter=None,
    adapter_config: AdapterConfig | None = None,
    rng=None,
    positions=None,
):
    """Logits [B, T, V] (float32) of the base model, or of base + adapter when one is given.

    rng enables the adapter's dropout (training); None is deterministic. attention_mask marks real
    tokens (left or right padding); position ids derive from it unless given.
    """
    if adapter is not None and adapter_config is None:
        raise ValueError("forward: an adapter was given without its adapter_config.")
    input_ids = jnp.asarray(input_ids, jnp.int32)
    mask = jnp.ones_like(input_ids) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
    pos = positions_from_mask(mask) if positions is None else positions
    model = Llama(config, adapter_config if adapter is not None else None)
    logits, _ = model.apply({"params": params}, input_ids, pos, mask, adapter, rng, None, 0)
    return logits


def forward_cached(
    config, params, input_ids, positions, kv_mask, cache, cache_index, *, adapter=None, adapter_config=None
):
    """One decoding chunk: tokens [B, T] at slots cache_index.. of the KV cache; kv_mask [B, S] marks the
    cache slots holding real tokens (this chunk's included). Returns (logits [B, T, V], new cache)."""
    model = Llama(config, adapter_config if adapter is not None else None)
    return model.apply({"params": params}, input_ids, positions, kv_mask, adapter, None, cache, cache_index)


def init_cache(config: ModelConfig, batch: int, max_len: int, dtype=None) -> dict:
    shape = (config.num_hidden_layers, batch, max_len, config.num_key_value_heads, config.head_dim)
    dt = jnp.dtype(dtype or config.dtype)
    return {"k": jnp.zeros(shape, dt), "v": jnp.zeros(shape, dt)}


def _init_boxed(config: ModelConfig, rng):
    ids = jnp.zeros((1, 1), jnp.int32)
    return Llama(config).init(rng, ids, ids, jnp.ones_like(ids), None, None, None, 0)["params"]


def init_params(config: ModelConfig, rng) -> dict:
    """Random base parameters (for tests and benchmarks); real ones come from load_pretrained."""
    return nn.unbox(_init_boxed(config, rng))


def abstract_params(config: ModelConfig) -> dict:
    """Shapes and dtypes of the base parameters, nothing allocated."""
    return nn.unbox(jax.eval_shape(lambda: _init_boxed(config, jax.random.key(0))))


def param_axes(config: ModelConfig) -> dict:
    """Logical axis names (PartitionSpecs of logical names) of every base parameter."""
    return nn.get_partition_spec(jax.eval_shape(lambda: _init_boxed(config, jax.random.key(0))))


def count_params(config: ModelConfig) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_params(config)))
