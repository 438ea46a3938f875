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
_ACTIVATIONS = {
    Activation.GELU: lambda x: jax.nn.gelu(x, approximate=False),
    Activation.IDENTITY: lambda x: x,
    Activation.SILU: jax.nn.silu,
    Activation.RELU: jax.nn.relu,
}


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


def _dropout(x, rate, rng):
    if rng is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def _mm(x, w):
    return jnp.dot(x, w.astype(x.dtype), preferred_element_type=jnp.float32)


def adapted_projection(ac, x_bi, w_io, b_o, y_bo, p, rng):
    """y = W0 x (+ b), already computed as y_bo (float32), plus the adapter of one projection in one layer.

    p holds this layer's slice of the target's tensors (shared ones merged in); rng is None when not
    training (no dropout).
    """
    k_in, k_mid, k_out = jax.random.split(rng, 3) if rng is not None else (None, None, None)
    s, rate = ac.scaling, ac.dropout
    if ac.method == Method.DENSELORA:
        act = _ACTIVATIONS[ac.activation]
        h = act(_mm(_dropout(x_bi, rate, k_in), p["encoder"]))
        h = _dropout(h, rate, k_mid)
        u = act(_mm(_mm(h, p["dense"]), p["decoder"]))
        return y_bo + s * _dropout(u, rate, k_out)
    x_d = _dropout(x_bi, rate, k_in)
    lora = _mm(_mm(x_d, p["lora_A"]), p["lora_B"])
    if ac.method == Method.LORA:
        return y_bo + s * lora
    # DoRA exactly as peft computes it: the weight norm is detached from the graph.
    scale = p["magnitude"] / jax.lax.stop_gradient(dora_weight_norm(w_io, p["lora_A"], p["lora_B"], s))
    base = y_bo - (b_o if b_o is not None else 0.0) if x_d is x_bi else _mm(x_d, w_io)
    return y_bo + (scale - 1.0) * base + scale * s * lora
