"""The adapters as pure functions: parameter trees, their logical axes, init, and the adapted projection.

Tree layout (kernels in JAX [in, out] orientation; per-layer tensors stacked on a leading `layers` axis so
they ride the layer scan; DenseLoRA's shared encoder/decoder live under "shared", outside the scan):

  denselora: {"shared": {t: {"encoder": [d_in, r], "decoder": [r, d_out]}},
              "layers": {t: {"dense": [L, r, r]}}}
             (share_across_layers=False: encoder/decoder move into "layers" with a leading L axis)
  lora:      {"layers": {t: {"lora_A": [L, d_in, r], "lora_B": [L, r, d_out]}}}
  dora:      lora + {"layers": {t: {"magnitude": [L, d_out]}}}
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp

from denselora_jax.adapters.config import Activation, AdapterConfig, Method
from denselora_jax.model.config import ModelConfig

# Logical axis of each projection's input and output width (flattened heads count as `heads`).
_IO_AXES = {
    "q_proj": ("embed", "heads"),
    "k_proj": ("embed", "kv_heads"),
    "v_proj": ("embed", "kv_heads"),
    "o_proj": ("heads", "embed"),
    "gate_proj": ("embed", "mlp"),
    "up_proj": ("embed", "mlp"),
    "down_proj": ("mlp", "embed"),
}
_SQRT_HALF, _INV_SQRT_2PI = 0.5**0.5, (2 * math.pi) ** -0.5


def _spec(mc: ModelConfig, ac: AdapterConfig) -> dict:
    """{(group, target, name): (shape, logical axes, init)}: the one definition of what is trainable."""
    r, L = ac.rank, mc.num_hidden_layers
    out = {}
    for t in ac.targets:
        d_in, d_out = mc.projection_dims()[t]
        a_in, a_out = _IO_AXES[t]
        kaiming_in, kaiming_r = (
            ("uniform", d_in),
            ("uniform", r),
        )  # kaiming-uniform(a=sqrt 5): U(+-1/sqrt(fan_in))
        if ac.method == Method.DENSELORA:
            grp, lead, lax_ = ("shared", (), ()) if ac.share_across_layers else ("layers", (L,), ("layers",))
            out[grp, t, "encoder"] = (lead + (d_in, r), lax_ + (a_in, "lora_rank"), kaiming_in)
            out[grp, t, "decoder"] = (lead + (r, d_out), lax_ + ("lora_rank", a_out), ("zeros",))
            out["layers", t, "dense"] = ((L, r, r), ("layers", "lora_rank", "lora_rank_out"), kaiming_r)
        else:
            out["layers", t, "lora_A"] = ((L, d_in, r), ("layers", a_in, "lora_rank"), kaiming_in)
            out["layers", t, "lora_B"] = ((L, r, d_out), ("layers", "lora_rank", a_out), ("zeros",))
            if ac.method == Method.DORA:
                out["layers", t, "magnitude"] = ((L, d_out), ("layers", a_out), ("weight_norm",))
    return out


def _nest(flat: dict) -> dict:
    tree: dict = {}
    for (grp, t, name), v in flat.items():
        tree.setdefault(grp, {}).setdefault(t, {})[name] = v
    return tree


def adapter_axes(mc: ModelConfig, ac: AdapterConfig) -> dict:
    """Logical axis names of every adapter tensor (same tree structure as the adapter)."""
    return _nest({k: jax.sharding.PartitionSpec(*axes) for k, (_, axes, _) in _spec(mc, ac).items()})


def abstract_adapter(mc: ModelConfig, ac: AdapterConfig) -> dict:
    return _nest({k: jax.ShapeDtypeStruct(shape, jnp.float32) for k, (shape, _, _) in _spec(mc, ac).items()})


def count_adapter_params(mc: ModelConfig, ac: AdapterConfig) -> int:
    n = 0
    for shape, _, _ in _spec(mc, ac).values():
        size = 1
        for s in shape:
            size *= s
        n += size
    return n


def init_adapter(mc: ModelConfig, ac: AdapterConfig, rng: jax.Array, base_params: dict | None = None) -> dict:
    """Fresh adapter parameters (float32). DoRA's magnitude is the column norm of W0, so it needs the base."""
    flat = {}
    for i, (key, (shape, _, init)) in enumerate(sorted(_spec(mc, ac).items())):
        if init[0] == "uniform":
            bound = init[1] ** -0.5
            flat[key] = jax.random.uniform(jax.random.fold_in(rng, i), shape, jnp.float32, -bound, bound)
        elif init[0] == "zeros":
            flat[key] = jnp.zeros(shape, jnp.float32)
        else:  # DoRA magnitude = ||W0|| over the input axis, per output unit (as peft initialises it)
            if base_params is None:
                raise ValueError("DoRA's magnitude is initialised from the base weights: pass base_params.")
            w = base_kernel_2d(mc, base_params, key[1])
            a, b = flat[(*key[:2], "lora_A")], flat[(*key[:2], "lora_B")]  # sorted keys: A, B come first
            # Per layer, the very expression the forward divides by: magnitude / norm is exactly 1 at init.
            flat[key] = jnp.stack([dora_weight_norm(w[i], a[i], b[i], ac.scaling) for i in range(shape[0])])
    return _nest(flat)


def base_kernel_2d(mc: ModelConfig, base_params: dict, target: str) -> jax.Array:
    """The stacked frozen kernel of a projection as [L, d_in, d_out]."""
    grp = "self_attn" if target in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
    w = base_params["layers"][grp][target]["kernel"]
    d_in, d_out = mc.projection_dims()[target]
    return w.reshape(w.shape[0], d_in, d_out)


def dora_weight_norm(w_io, lora_A, lora_B, s):
    """||W0 + s (A B)|| over the input axis, one value per output unit (peft's DoRA weight norm)."""
    return jnp.linalg.norm(w_io.astype(jnp.float32) + s * (lora_A @ lora_B), axis=0)


def _fmix32(h):
    """MurmurHash3's 32-bit finaliser: a bijection of uint32 with full avalanche."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def keep_mask(rng, rate: float, shape) -> jax.Array:
    """Dropout keep-mask: True with probability 1 - rate (to within 2**-32), a function of the key.

    Each entry hashes its flat index with a seed word drawn from the key (MurmurHash3's finaliser, a
    bijection of uint32 with full avalanche): about 7 integer operations per entry, where
    jax.random.bernoulli's partitionable threefry costs a 20-round block per entry (measured: most of a CPU
    training step). Like threefry-partitionable it depends only on the key and the entry's index, so it is
    the same on every mesh.
    """
    n = math.prod(shape)
    if n > 2**32:
        raise ValueError(f"dropout over {n} entries: more than 2**32 entries in one mask is not supported.")
    seed = jax.random.bits(rng, (), jnp.uint32)
    h = _fmix32(jax.lax.iota(jnp.uint32, n).reshape(shape) ^ seed)
    return h >= jnp.uint32(min(round(rate * 2**32), 2**32 - 1))


def _dropout(x, rate, rng):
    if rng is None or rate == 0.0:
        return x
    return jnp.where(keep_mask(rng, rate, x.shape), x / (1.0 - rate), 0).astype(x.dtype)


def _mm(x, w):
    return jnp.dot(x, w.astype(x.dtype), preferred_element_type=jnp.float32)


def _sum_outer(a, g):
    """sum over the leading (token) axes of a[..., i] g[..., j]: a weight's gradient, in float32 (XLA:CPU has
    no bf16 x bf16 -> f32 kernel for this token-contracting shape).

    The wide operand goes on the right and the small product is transposed after: XLA:CPU then transposes
    the narrow [tokens, r] operand rather than writing the wide one transposed (a slow fusion).
    """
    lead = tuple(range(a.ndim - 1))
    dims = ((lead, lead), ((), ()))
    a, g = a.astype(jnp.float32), g.astype(jnp.float32)
    if a.shape[-1] > g.shape[-1]:
        return jax.lax.dot_general(g, a, dims, preferred_element_type=jnp.float32).T
    return jax.lax.dot_general(a, g, dims, preferred_element_type=jnp.float32)


def _act_and_grad(kind: Activation, v):
    """(act(v), act'(v)) in one pass; GELU is the exact one, through erf (as torch computes it)."""
    if kind == Activation.GELU:
        cdf = 0.5 + 0.5 * jax.lax.erf(v * _SQRT_HALF)
        return v * cdf, cdf + v * jnp.exp(-0.5 * v * v) * _INV_SQRT_2PI
    if kind == Activation.SILU:
        sig = jax.nn.sigmoid(v)
        return v * sig, sig * (1.0 + v * (1.0 - sig))
    if kind == Activation.RELU:
        return jnp.maximum(v, 0.0), (v > 0).astype(v.dtype)
    return v, jnp.ones_like(v)


def _masked(v, keys, i, rate):
    """v * dropout mask i of keys (None: no dropout), scaled by 1 / (1 - rate)."""
    if keys is None:
        return v
    return jnp.where(keep_mask(keys[i], rate, v.shape), v * (1.0 / (1.0 - rate)), 0).astype(v.dtype)


@partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _denselora(act, rate, s, x_bi, enc, dense, dec, keys):
    """s * drop(act(drop(act(drop(x) E)) M D)): DenseLoRA's branch, keys = the three dropout keys or None.

    A custom VJP because on CPU the automatic one was a fifth of the training step: XLA fused the activation's
    derivative (erfc) into every consumer, twice, once writing a transposed layout. Here the backward computes
    each activation's derivative once, regenerates the dropout masks from their keys instead of storing them,
    and keeps only the rank-r intermediates.
    """
    return _denselora_fwd(act, rate, s, x_bi, enc, dense, dec, keys)[0]


def _denselora_fwd(act, rate, s, x_bi, enc, dense, dec, keys):
    a_br = _mm(_masked(x_bi, keys, 0, rate), enc)
    h_br = _masked(_act_and_grad(act, a_br)[0], keys, 1, rate)
    m_br = _mm(h_br, dense)
    u_bo = _act_and_grad(act, _mm(m_br, dec))[0]
    return s * _masked(u_bo, keys, 2, rate), (x_bi, enc, dense, dec, keys, a_br, m_br)


def _denselora_bwd(act, rate, s, res, g_bo):
    x_bi, enc, dense, dec, keys, a_br, m_br = res
    _, du_bo = _act_and_grad(act, _mm(m_br, dec))
    g_bo = _masked(g_bo * s, keys, 2, rate) * du_bo
    d_dec = _sum_outer(m_br, g_bo)
    g_br = _mm(g_bo, dec.T)
    h_act, dh_br = _act_and_grad(act, a_br)
    d_dense = _sum_outer(_masked(h_act, keys, 1, rate), g_br)
    g_br = _masked(_mm(g_br, dense.T), keys, 1, rate) * dh_br
    x_d = _masked(x_bi, keys, 0, rate)
    d_enc = _sum_outer(x_d, g_br)
    d_x = _masked(_mm(g_br.astype(x_d.dtype), enc.T), keys, 0, rate).astype(x_bi.dtype)
    cast = lambda g, p: g.astype(p.dtype)  # noqa: E731
    return d_x, cast(d_enc, enc), cast(d_dense, dense), cast(d_dec, dec), None


_denselora.defvjp(_denselora_fwd, _denselora_bwd)


def adapted_projection(ac, x_bi, w_io, b_o, y_bo, p, rng):
    """y = W0 x (+ b), already computed as y_bo (float32), plus the adapter of one projection in one layer.

    p holds this layer's slice of the target's tensors (shared ones merged in); rng is None when not
    training (no dropout).
    """
    k_in, k_mid, k_out = jax.random.split(rng, 3) if rng is not None else (None, None, None)
    s, rate = ac.scaling, ac.dropout
    if ac.method == Method.DENSELORA:
        keys = None if rng is None or rate == 0.0 else jnp.stack([k_in, k_mid, k_out])
        return y_bo + _denselora(ac.activation, rate, s, x_bi, p["encoder"], p["dense"], p["decoder"], keys)
    x_d = _dropout(x_bi, rate, k_in)
    lora = _mm(_mm(x_d, p["lora_A"]), p["lora_B"])
    if ac.method == Method.LORA:
        return y_bo + s * lora
    # DoRA exactly as peft computes it: the weight norm is detached from the graph.
    scale = p["magnitude"] / jax.lax.stop_gradient(dora_weight_norm(w_io, p["lora_A"], p["lora_B"], s))
    base = y_bo - (b_o if b_o is not None else 0.0) if x_d is x_bi else _mm(x_d, w_io)
    return y_bo + (scale - 1.0) * base + scale * s * lora
