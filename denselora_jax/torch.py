"""`denselora_jax.torch`: run a saved adapter (DenseLoRA, LoRA, DoRA) in PyTorch on a transformers LLaMA.

`apply_adapter(model, adapter_dir)` reads an adapter directory (save_adapter's format, or a PEFT LoRA/DoRA
directory, via `load_adapter`) and replaces exactly the adapted `nn.Linear` modules, by name
(`model.model.layers[i].self_attn.q_proj`, `...mlp.down_proj`, ...), with wrappers that compute what
`denselora_jax.forward` computes. Nothing global is patched. DenseLoRA's shared encoder/decoder are one
`nn.Parameter` each, held by every wrapper of that projection type, so an optimizer sees (and PyTorch's
autograd accumulates into) a single tensor, as in JAX. Dropout is `nn.Dropout`: active in `train()` mode
only. The base weights are frozen; only the adapter tensors require gradients. Needs the `torch` extra.

Why DenseLoRA is not registered with PEFT (`PeftModel.from_pretrained`), checked against peft 0.21.2:
PEFT can hold shared adapter state (VBLoRA's vector bank is one: a tuner may override
`_get_adapter_state_dict` / `_remap_adapter_state_dict_for_load`), but its plug-in function
`peft.utils.register_peft_method(name=...)` only accepts names that are already members of the closed enum
`peft.utils.peft_types.PeftType` ("Unknown PEFT type DENSELORA, please add an entry to
peft.utils.peft_types.PeftType"). A third-party package cannot add an Enum member without patching peft's
module globally, and `PeftConfig` dispatches on that `peft_type` when reading adapter_config.json. So the
registration is only possible inside peft's own source tree; `apply_adapter` is the supported route.
(tests/test_interop.py checks that this is still so, and will fail once peft opens the mechanism.)
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from denselora_jax.adapters.config import Activation, AdapterConfig, Method
from denselora_jax.adapters.io import load_adapter
from denselora_jax.model.config import ModelConfig
from denselora_jax.model.loading import fingerprint

_ACTIVATIONS = {
    Activation.GELU: F.gelu,  # exact (erf) GELU, as jax.nn.gelu(approximate=False)
    Activation.IDENTITY: lambda x: x,
    Activation.SILU: F.silu,
    Activation.RELU: F.relu,
}
_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


class DenseLoRALinear(nn.Module):
    """y = W0 x (+ b) + s * drop(act(D @ M @ drop(act(E @ drop(x))))); E, D may be shared with other layers."""

    def __init__(self, base: nn.Linear, encoder, dense, decoder, ac: AdapterConfig):
        super().__init__()
        self.base, self.encoder, self.dense, self.decoder = base, encoder, dense, decoder
        self.scaling, self.act = ac.scaling, _ACTIVATIONS[ac.activation]
        self.drop_in, self.drop_mid, self.drop_out = (nn.Dropout(ac.dropout) for _ in range(3))

    def forward(self, x):
        y = self.base(x)
        x_a = x.to(self.encoder.dtype)
        h = self.drop_mid(self.act(F.linear(self.drop_in(x_a), self.encoder)))
        u = self.act(F.linear(F.linear(h, self.dense), self.decoder))
        return y + (self.scaling * self.drop_out(u)).to(y.dtype)


class LoRALinear(nn.Module):
    """y = W0 x (+ b) + s * B @ A @ drop(x)."""

    def __init__(self, base: nn.Linear, lora_A, lora_B, ac: AdapterConfig):
        super().__init__()
        self.base, self.lora_A, self.lora_B = base, lora_A, lora_B
        self.scaling, self.drop = ac.scaling, nn.Dropout(ac.dropout)

    def forward(self, x):
        y = self.base(x)
        lora = F.linear(F.linear(self.drop(x.to(self.lora_A.dtype)), self.lora_A), self.lora_B)
        return y + (self.scaling * lora).to(y.dtype)


class DoRALinear(LoRALinear):
    """DoRA exactly as peft (and adapters/core.py) computes it: the weight norm is detached."""

    def __init__(self, base: nn.Linear, lora_A, lora_B, magnitude, ac: AdapterConfig):
        super().__init__(base, lora_A, lora_B, ac)
        self.magnitude = magnitude

    def forward(self, x):
        y = self.base(x)
        s, w_oi = self.scaling, self.base.weight.to(self.lora_A.dtype)
        norm_o = torch.linalg.vector_norm(w_oi + s * (self.lora_B @ self.lora_A), dim=1).detach()
        scale_o = self.magnitude / norm_o
        x_d = self.drop(x.to(w_oi.dtype))
        lora = F.linear(F.linear(x_d, self.lora_A), self.lora_B)
        if not self.training or self.drop.p == 0.0:  # no dropout: reuse W0 x (its bias removed), as peft
            base = y.to(w_oi.dtype) - (0.0 if self.base.bias is None else self.base.bias.to(w_oi.dtype))
        else:
            base = F.linear(x_d, w_oi)
        return y + ((scale_o - 1.0) * base + scale_o * s * lora).to(y.dtype)


def _decoder_layers(model) -> nn.ModuleList:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList) or not hasattr(model, "config"):
        raise TypeError(
            f"apply_adapter: expected a transformers LlamaForCausalLM (model.model.layers), got "
            f"{type(model).__name__}; load the base with LlamaForCausalLM.from_pretrained."
        )
    return layers


def _base_fingerprint(model, mc: ModelConfig) -> str:
    """The project's fingerprint of the base, from the same tensors load_pretrained samples."""
    inner = model.model

    def host(p):
        return p.detach().float().cpu().numpy()

    sample = {
        "embed_tokens": {"embedding": host(inner.embed_tokens.weight)},
        "norm": {"weight": host(inner.norm.weight)},
    }
    return fingerprint(mc, sample)


def apply_adapter(model, adapter_dir: str | os.PathLike, *, force: bool = False):
    """Wrap the target Linear modules of a transformers LlamaForCausalLM with the adapter in `adapter_dir`.

    The model is changed in place and returned. Refused (with the reason): a model that is not LLaMA-shaped,
    an adapter made for another model shape, an adapter saved for a base with another fingerprint (unless
    force=True; shapes must still match), and a model that already carries an adapter.
    """
    layers = _decoder_layers(model)
    mc = ModelConfig.from_hf_dict(model.config.to_dict())
    tree, ac = load_adapter(
        adapter_dir, model_config=mc, base_fingerprint=_base_fingerprint(model, mc), force=force
    )
    targets = {}  # (layer, target) -> (parent module, the nn.Linear it holds)
    for i, layer in enumerate(layers):
        for t in ac.targets:
            parent = layer.self_attn if t in _ATTENTION else layer.mlp
            base = getattr(parent, t)
            if type(base) is not nn.Linear:
                raise ValueError(
                    f"apply_adapter: model.model.layers[{i}].{'self_attn' if t in _ATTENTION else 'mlp'}.{t} "
                    f"is a {type(base).__name__}, not an nn.Linear: the model already carries an adapter; "
                    "apply it to a freshly loaded model."
                )
            targets[i, t] = (parent, base)
    model.requires_grad_(False)
    device = next(model.parameters()).device

    def param(x, layer=None):  # ours is [in, out]; torch Linear weights are [out, in]
        x = np.asarray(x if layer is None else x[layer], np.float32)
        return nn.Parameter(torch.tensor(x.T.copy(), device=device))

    shared = {
        t: {name: param(x) for name, x in tensors.items()} for t, tensors in tree.get("shared", {}).items()
    }
    for (i, t), (parent, base) in targets.items():
        p = {**shared.get(t, {}), **{name: param(x, i) for name, x in tree["layers"][t].items()}}
        if ac.method == Method.DENSELORA:
            wrapped = DenseLoRALinear(base, p["encoder"], p["dense"], p["decoder"], ac)
        elif ac.method == Method.LORA:
            wrapped = LoRALinear(base, p["lora_A"], p["lora_B"], ac)
        else:
            wrapped = DoRALinear(base, p["lora_A"], p["lora_B"], p["magnitude"], ac)
        wrapped.train(model.training)
        setattr(parent, t, wrapped)
    return model
