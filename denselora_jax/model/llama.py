"""The frozen LLaMA decoder as Flax linen modules, with adapters interposed functionally.

Parameter names mirror HF (see weights.py for the conversion table). Layers are stacked on a `layers` axis
and run with nn.scan (scan_layers=False fully unrolls the same scan, keeping one parameter layout). The
adapter tree is an ordinary argument: per-layer tensors are scanned with the layers, DenseLoRA's shared
encoders/decoders are broadcast into every layer, never copied.
"""

from __future__ import annotations

import math
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from denselora_jax.adapters.config import AdapterConfig
from denselora_jax.adapters.core import adapted_projection
from denselora_jax.model.config import ModelConfig, Remat, RopeType

f32 = jnp.float32
_SAVED = ("q", "k", "v", "resid", "gate", "up")  # the projection outputs SAVE_DOTS keeps (checkpoint_name)
_REMAT_POLICY = {
    Remat.FULL: jax.checkpoint_policies.nothing_saveable,
    Remat.SAVE_DOTS: jax.checkpoint_policies.save_only_these_names(*_SAVED),
}


def constrain(x_btd):
    """Pin an activation [batch, length, embed] to the batch-sharded layout (rows over data x fsdp, embed
    whole). A no-op unless the caller's jit traces under a mesh and the rules table (sharding.with_rules):
    without it XLA may keep fsdp-gathered activations, several times larger (see plan.py)."""
    return nn.with_logical_constraint(x_btd, ("batch", "length", "activation_embed"))


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


class Kernel(nn.Module):
    """The frozen weights of one projection (an HF linear), [in_shape..., out_shape...], and its bias."""

    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    axes: tuple[str, ...]
    use_bias: bool
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self):
        init = nn.initializers.normal(0.02)
        w = self.param(
            "kernel",
            nn.with_logical_partitioning(init, self.axes),
            self.in_shape + self.out_shape,
            self.param_dtype,
        )
        if not self.use_bias:
            return w, None
        axes = self.axes[len(self.in_shape) :]
        b = self.param(
            "bias",
            nn.with_logical_partitioning(nn.initializers.zeros, axes),
            self.out_shape,
            self.param_dtype,
        )
        return w, b


@jax.custom_vjp
def linear(x_bi, w_io):
    """x @ w with float32 accumulation, whose backward runs its matmuls in the operands' dtype.

    Autodiff's transpose would multiply the float32 cotangent with the bf16 weight, i.e. upcast every weight
    and run float32 GEMMs (half the speed on CPU); here the cotangent is cast to the weight's dtype first, as
    mixed-precision training does. The weight's gradient is formed only when the weight is differentiated.
    """
    return jnp.dot(x_bi, w_io, preferred_element_type=f32)


def _linear_fwd(x_bi, w_io):
    x, w = x_bi.value, w_io.value
    return linear(x, w), (x if w_io.perturbed else None, w)


def _linear_bwd(res, g):
    x, w = res
    g = g.astype(w.dtype)
    dx = jnp.dot(g, w.T, preferred_element_type=f32).astype(w.dtype)
    if x is None:
        return dx, None
    lead = tuple(range(x.ndim - 1))
    dw = jax.lax.dot_general(x, g, ((lead, lead), ((), ())), preferred_element_type=f32)
    return dx, dw.astype(w.dtype)


linear.defvjp(_linear_fwd, _linear_bwd, symbolic_zeros=True)


def project(x, kernels, adapt, mdt, adt):
    """Apply projections that share the input x ([..., *in_shape]), each with its adapter.

    kernels: [(name, Kernel)]. Returns one output per kernel, [..., *out_shape], in dtype adt; the matmul
    takes its operands in mdt and accumulates in float32. (One matmul per kernel: concatenating the kernels
    of q/k/v or gate/up into one wider matmul measured slower on CPU, see benchmarks/results.md.)
    """
    outs = []
    for name, k in kernels:
        w, b = k()
        d_in = math.prod(k.in_shape)
        lead = x.shape[: x.ndim - len(k.in_shape)]
        x_bi = x.reshape(*lead, d_in).astype(mdt)
        w_io = w.reshape(d_in, -1).astype(mdt)
        y_bo = linear(x_bi, w_io)
        b_o = None if b is None else b.reshape(-1).astype(f32)
        if b_o is not None:
            y_bo = y_bo + b_o
        if adapt is not None:
            y_bo = adapt(name, x_bi, w_io, b_o, y_bo)
        outs.append(y_bo.astype(adt).reshape(*lead, *k.out_shape))
    return outs


def activation_dtype(c: ModelConfig) -> jnp.dtype:
    """dtype of the activations between matmuls: config.activation_dtype when set, else the compute dtype,
    except float32 on CPU.

    XLA:CPU has no native bf16 arithmetic: every bf16 element-wise op converts to float32 and back, and it
    upcasts bf16 dynamic slices (scan residuals) to float32; keeping activations in float32 there and
    casting only the matmul operands to bf16 measured faster (benchmarks/results.md), and is more precise.
    """
    if c.activation_dtype is not None:
        return jnp.dtype(c.activation_dtype)
    dt = jnp.dtype(c.dtype)
    return f32 if dt.itemsize < 4 and jax.default_backend() == "cpu" else dt


class Attention(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x_btd, adapt, pos_bt, kv_mask_bs, cache, cache_index):
        c = self.config
        mdt, adt, pdt, bias = (
            jnp.dtype(c.dtype),
            activation_dtype(c),
            jnp.dtype(c.param_dtype),
            c.attention_bias,
        )
        H, KV, hd, D = c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.hidden_size
        G = H // KV
        q_btnh, k_btkh, v_btkh = project(
            x_btd,
            [
                ("q_proj", Kernel((D,), (H, hd), ("embed", "heads", "head_dim"), bias, pdt, name="q_proj")),
                (
                    "k_proj",
                    Kernel((D,), (KV, hd), ("embed", "kv_heads", "head_dim"), bias, pdt, name="k_proj"),
                ),
                (
                    "v_proj",
                    Kernel((D,), (KV, hd), ("embed", "kv_heads", "head_dim"), bias, pdt, name="v_proj"),
                ),
            ],
            adapt,
            mdt,
            adt,
        )
        inv_freq = rope_inv_freq(c)
        q_btnh, k_btkh = apply_rope(q_btnh, pos_bt, inv_freq), apply_rope(k_btkh, pos_bt, inv_freq)
        # The attention products take q, k, v in the matmul dtype: round (and save, for SAVE_DOTS) them there.
        q_btnh, k_btkh, v_btkh = (
            _saveable(a.astype(mdt), n) for a, n in ((q_btnh, "q"), (k_btkh, "k"), (v_btkh, "v"))
        )
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
        # Head-major operands, [b, kv, (group, t), hd]: every score / value product is one plain batched GEMM
        # per kv head, which XLA:CPU runs without the transposed element-wise fusions the [b, t, ...] layout
        # costs it (measured: benchmarks/results.md).
        q_bkmh = q_btnh.reshape(b, t, KV, G, hd).transpose(0, 2, 3, 1, 4).reshape(b, KV, G * t, hd)
        k_bksh = k_btkh.astype(mdt).transpose(0, 2, 1, 3)
        v_bksh = v_btkh.astype(mdt).transpose(0, 2, 1, 3)
        scores = jnp.einsum("bkmh,bksh->bkms", q_bkmh, k_bksh, preferred_element_type=f32)
        allowed_b1ms = jnp.broadcast_to(allowed_bts[:, None, None], (b, 1, G, t, s)).reshape(b, 1, G * t, s)
        scores = jnp.where(allowed_b1ms, scores * (1.0 / math.sqrt(hd)), jnp.finfo(f32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(mdt)
        o_bkmh = jnp.einsum("bkms,bksh->bkmh", probs, v_bksh, preferred_element_type=f32).astype(adt)
        o_btnh = o_bkmh.reshape(b, KV, G, t, hd).transpose(0, 3, 1, 2, 4).reshape(b, t, H, hd)
        o_kernel = Kernel((H, hd), (D,), ("heads", "head_dim", "embed"), bias, pdt, name="o_proj")
        return project(o_btnh, [("o_proj", o_kernel)], adapt, mdt, adt)[0], cache


class MLP(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x_btd, adapt):
        c = self.config
        mdt, adt, pdt, bias = jnp.dtype(c.dtype), activation_dtype(c), jnp.dtype(c.param_dtype), c.mlp_bias
        D, F = c.hidden_size, c.intermediate_size
        gate, up = project(
            x_btd,
            [
                ("gate_proj", Kernel((D,), (F,), ("embed", "mlp"), bias, pdt, name="gate_proj")),
                ("up_proj", Kernel((D,), (F,), ("embed", "mlp"), bias, pdt, name="up_proj")),
            ],
            adapt,
            mdt,
            adt,
        )
        down = Kernel((F,), (D,), ("mlp", "embed"), bias, pdt, name="down_proj")
        gate, up = _saveable(gate.astype(mdt), "gate"), _saveable(up.astype(mdt), "up")
        return project(jax.nn.silu(gate) * up, [("down_proj", down)], adapt, mdt, adt)[0]


class DecoderLayer(nn.Module):
    config: ModelConfig
    adapter_config: AdapterConfig | None

    @nn.compact
    def __call__(self, x_btd, layer_ad, shared_ad, rng, pos_bt, kv_mask_bs, cache, cache_index):
        c, ac = self.config, self.adapter_config
        adt, pdt = activation_dtype(c), jnp.dtype(c.param_dtype)

        def adapt(name, x_bi, w_io, b_o, y_bo):
            if ac is None or name not in ac.targets:
                return y_bo
            p = {**(shared_ad or {}).get(name, {}), **layer_ad[name]}
            key = None if rng is None else jax.random.fold_in(rng, ac.targets.index(name))
            return adapted_projection(ac, x_bi, w_io, b_o, y_bo, p, key)

        h_btd = constrain(RMSNorm(c.rms_norm_eps, adt, pdt, name="input_layernorm")(x_btd))
        a_btd, cache = Attention(c, name="self_attn")(h_btd, adapt, pos_bt, kv_mask_bs, cache, cache_index)
        x_btd = checkpoint_name(constrain(x_btd + a_btd), "resid")
        h_btd = constrain(RMSNorm(c.rms_norm_eps, adt, pdt, name="post_attention_layernorm")(x_btd))
        return constrain(x_btd + MLP(c, name="mlp")(h_btd, adapt)), cache


def _saveable(x, name: str):
    """x, tagged for the SAVE_DOTS remat policy. A 16-bit float is saved as its uint16 bits: XLA:CPU would
    stack bf16 scan residuals in float32 and convert them both ways."""
    if x.dtype not in (jnp.bfloat16, jnp.float16):
        return checkpoint_name(x, name)
    return _named_bits(x, name)


def _bits_round_trip(x, name):
    return jax.lax.bitcast_convert_type(checkpoint_name(_as_bits(x), name), x.dtype)


@partial(jax.custom_jvp, nondiff_argnums=(1,))
def _named_bits(x, name):
    """The identity, through a named uint16 bitcast (which alone would cut the gradient)."""
    return _bits_round_trip(x, name)


@_named_bits.defjvp
def _named_bits_jvp(name, primals, tangents):
    # The round trip is traced here, not behind the custom_jvp, so that the remat policy sees the name.
    return _bits_round_trip(primals[0], name), tangents[0]


def _as_bits(x):
    """16-bit floats ride the layer scan as uint16 (a free bitcast): XLA:CPU upcasts a bf16 dynamic slice to
    float32 and hoists the conversion of the whole stacked weight out of the loop, every step."""
    return jax.lax.bitcast_convert_type(x, jnp.uint16) if x.dtype in (jnp.bfloat16, jnp.float16) else x


def scan_layers(
    c: ModelConfig, ac, layer_params, x_btd, adapter, rng, pos_bt, kv_mask_bs, cache, cache_index
):
    """Run the stacked decoder layers over x with jax.lax.scan (unrolled when not config.scan_layers), each
    layer rematerialised by config.remat's policy. layer_params: the ["layers"] subtree, [L, ...] leaves."""
    L = c.num_hidden_layers
    dtypes = jax.tree.map(lambda p: p.dtype, layer_params)
    adapter = adapter or {}
    shared = adapter.get("shared")

    def body(x_btd, xs):
        bits, layer_ad, key, layer_cache = xs
        params = jax.tree.map(
            lambda b, dt: b if b.dtype == dt else jax.lax.bitcast_convert_type(b, dt), bits, dtypes
        )
        layer = DecoderLayer(c, ac, parent=None)
        return layer.apply(
            {"params": params}, x_btd, layer_ad, shared, key, pos_bt, kv_mask_bs, layer_cache, cache_index
        )

    if c.remat != Remat.NONE:
        body = jax.checkpoint(body, policy=_REMAT_POLICY[c.remat], prevent_cse=False)
    keys = None if rng is None else jax.random.split(rng, L)
    xs = (jax.tree.map(_as_bits, layer_params), adapter.get("layers"), keys, cache)
    return jax.lax.scan(body, x_btd, xs, length=L, unroll=1 if c.scan_layers else L)


class Llama(nn.Module):
    config: ModelConfig
    adapter_config: AdapterConfig | None = None
    head: bool = True  # False: return the final-normed hidden states instead of the logits

    @nn.compact
    def __call__(self, input_ids_bt, pos_bt, kv_mask_bs, adapter, rng, cache, cache_index, embeds_btd=None):
        c = self.config
        mdt, adt, pdt, L = (
            jnp.dtype(c.dtype),
            activation_dtype(c),
            jnp.dtype(c.param_dtype),
            c.num_hidden_layers,
        )
        emb_vd = Embed(c.vocab_size, c.hidden_size, pdt, name="embed_tokens")()
        x_btd = jnp.take(emb_vd, input_ids_bt, axis=0) if embeds_btd is None else embeds_btd
        x_btd = constrain(x_btd.astype(adt))
        if self.is_initializing():  # nn.scan creates the stacked, logically annotated layer parameters
            scanned = nn.scan(
                DecoderLayer,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(0, nn.broadcast, 0, nn.broadcast, nn.broadcast, 0, nn.broadcast),
                length=L,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            adapter = adapter or {}
            rngs = None if rng is None else jax.random.split(rng, L)
            x_btd, cache = scanned(c, self.adapter_config, name="layers")(
                x_btd,
                adapter.get("layers"),
                adapter.get("shared"),
                rngs,
                pos_bt,
                kv_mask_bs,
                cache,
                cache_index,
            )
        else:
            layer_params = nn.unbox(self.variables["params"]["layers"])
            x_btd, cache = scan_layers(
                c,
                self.adapter_config,
                layer_params,
                x_btd,
                adapter,
                rng,
                pos_bt,
                kv_mask_bs,
                cache,
                cache_index,
            )
        x_btd = constrain(RMSNorm(c.rms_norm_eps, adt, pdt, name="norm")(x_btd))
        if not self.head:
            return x_btd, cache
        if c.tie_word_embeddings:
            logits_btv = jnp.einsum(
                "btd,vd->btv", x_btd.astype(mdt), emb_vd.astype(mdt), preferred_element_type=f32
            )
        else:
            head = Kernel((c.hidden_size,), (c.vocab_size,), ("embed", "vocab"), False, pdt, name="lm_head")
            # Operands in the compute dtype, float32 accumulation: no float32 copy of the [D, V] weight.
            logits_btv = project(x_btd, [("lm_head", head)], None, mdt, f32)[0]
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
    logits, _ = _apply(config, params, input_ids, attention_mask, adapter, adapter_config, rng, positions)
    return logits


def hidden_states(
    config: ModelConfig,
    params,
    input_ids,
    attention_mask=None,
    *,
    adapter=None,
    adapter_config: AdapterConfig | None = None,
    rng=None,
    embeds=None,
):
    """The final-normed hidden states [B, T, D] (compute dtype): forward() without the LM head, for losses
    that apply the head themselves (see head_weight). embeds [B, T, D], when given, replace the embedding
    lookup of input_ids (e.g. to differentiate with respect to the model's input)."""
    x_btd, _ = _apply(
        config, params, input_ids, attention_mask, adapter, adapter_config, rng, None, embeds, head=False
    )
    return x_btd


def _apply(
    config,
    params,
    input_ids,
    attention_mask,
    adapter,
    adapter_config,
    rng,
    positions,
    embeds=None,
    *,
    head=True,
):
    """The model over a whole sequence (no KV cache): (logits or final hidden states, None)."""
    if adapter is not None and adapter_config is None:
        raise ValueError("forward: an adapter was given without its adapter_config.")
    input_ids = jnp.asarray(input_ids, jnp.int32)
    mask = jnp.ones_like(input_ids) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
    pos = positions_from_mask(mask) if positions is None else positions
    model = Llama(config, adapter_config if adapter is not None else None, head=head)
    return model.apply({"params": params}, input_ids, pos, mask, adapter, rng, None, 0, embeds)


def head_weight(config: ModelConfig, params) -> tuple[jax.Array, bool]:
    """The LM head's weight and whether it is vocabulary-major: ([V, D], True) when tied to the embedding,
    else the lm_head kernel ([D, V], False). logits = hidden @ W^T or hidden @ W accordingly."""
    if config.tie_word_embeddings:
        return params["embed_tokens"]["embedding"], True
    return params["lm_head"]["kernel"], False


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
