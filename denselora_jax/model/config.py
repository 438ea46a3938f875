"""ModelConfig: the LLaMA architecture as read from an HF config.json (or a preset), plus run-time options.

Every size used anywhere in the project comes from here; nothing is hard-coded.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
from typing import Any

import yaml


class Remat(enum.StrEnum):
    NONE = "none"  # keep all activations
    FULL = "full"  # recompute each layer in the backward pass
    SAVE_DOTS = "save_dots"  # keep matmul outputs, recompute the cheap element-wise work


class RopeType(enum.StrEnum):
    DEFAULT = "default"
    LINEAR = "linear"
    LLAMA3 = "llama3"


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    rope_type: RopeType = RopeType.DEFAULT
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture (HF names) and how to run it. Hashable: it is a static argument of jitted steps."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    # Run-time options (not part of the checkpoint's architecture).
    dtype: str = "float32"  # compute dtype of activations and matmul inputs
    param_dtype: str = "float32"  # storage dtype of the frozen base weights
    scan_layers: bool = True  # nn.scan over layers (compile time independent of depth) or unrolled
    remat: Remat = Remat.NONE
    # dtype of the activations between matmuls; None: the compute dtype, except float32 on CPU (llama.py)
    activation_dtype: str | None = None

    def __post_init__(self):
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        object.__setattr__(self, "remat", Remat(self.remat))
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}; fix the model's config.json."
            )

    # Input and output width of each adaptable projection, by its HF name.
    def projection_dims(self) -> dict[str, tuple[int, int]]:
        d, q, kv, f = (
            self.hidden_size,
            self.num_attention_heads * self.head_dim,
            self.kv_dim,
            self.intermediate_size,
        )
        return {
            "q_proj": (d, q),
            "k_proj": (d, kv),
            "v_proj": (d, kv),
            "o_proj": (q, d),
            "gate_proj": (d, f),
            "up_proj": (d, f),
            "down_proj": (f, d),
        }

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def replace(self, **kw) -> ModelConfig:
        return dataclasses.replace(self, **kw)

    # --- construction -------------------------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], **runtime) -> ModelConfig:
        arch = d.get("architectures") or ["LlamaForCausalLM"]
        mtype = d.get("model_type", "llama")
        if mtype not in ("llama", "mistral") or not any(a in _SUPPORTED_ARCH for a in arch):
            raise ValueError(
                f"unsupported architecture {arch} (model_type={mtype!r}); denselora_jax loads "
                f"llama-architecture models ({', '.join(sorted(_SUPPORTED_ARCH))})."
            )
        if d.get("sliding_window") not in (None, 0) and mtype == "mistral":
            raise ValueError("sliding-window attention is not supported; use a llama-architecture model.")
        names = {f.name for f in dataclasses.fields(cls)} - set(_RUNTIME)
        kw = {k: d[k] for k in names if k in d and d[k] is not None}
        rs = d.get("rope_scaling") or d.get("rope_parameters")
        kw.pop("rope_scaling", None)
        if rs:
            rtype = rs.get("rope_type", rs.get("type", "default"))
            if rtype not in RopeType.__members__.values():
                raise ValueError(
                    f"unsupported rope_scaling type {rtype!r}; supported: default, linear, llama3."
                )
            if "rope_theta" in rs and "rope_theta" not in d:
                kw["rope_theta"] = rs["rope_theta"]
            if rtype != "default":
                fields = {f.name for f in dataclasses.fields(RopeScaling)} - {"rope_type"}
                kw["rope_scaling"] = RopeScaling(
                    rope_type=RopeType(rtype), **{k: v for k, v in rs.items() if k in fields}
                )
        return cls(**kw, **runtime)

    @classmethod
    def from_json(cls, path: str | os.PathLike, **runtime) -> ModelConfig:
        with open(path) as f:
            return cls.from_hf_dict(json.load(f), **runtime)

    @classmethod
    def from_preset(cls, name: str, **runtime) -> ModelConfig:
        presets = preset_table()
        if name not in presets:
            raise ValueError(f"unknown model preset {name!r}; known presets: {', '.join(presets)}.")
        return cls.from_hf_dict({"model_type": "llama", **presets[name]}, **runtime)

    def to_hf_dict(self) -> dict[str, Any]:
        """The HF config.json for this architecture (run-time options dropped)."""
        d = {k: v for k, v in dataclasses.asdict(self).items() if k not in _RUNTIME and v is not None}
        if self.rope_scaling is not None:
            d["rope_scaling"] = {
                **dataclasses.asdict(self.rope_scaling),
                "rope_type": str(self.rope_scaling.rope_type),
            }
        if isinstance(self.eos_token_id, tuple):
            d["eos_token_id"] = list(self.eos_token_id)
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu", **d}


_SUPPORTED_ARCH = {"LlamaForCausalLM", "MistralForCausalLM"}
_RUNTIME = ("dtype", "param_dtype", "scan_layers", "remat", "activation_dtype")


def preset_table() -> dict[str, dict[str, Any]]:
    with open(os.path.join(os.path.dirname(__file__), "presets.yaml")) as f:
        return yaml.safe_load(f)
