"""Reading llama-architecture GGUF files (llama.cpp's format) as HF-named float tensors and a ModelConfig.

The `gguf` package does the parsing (memory-mapped) and the dequantization; this file maps GGUF tensor names
to HF ones (with gguf's own name table), undoes the row permutation llama.cpp applies to q/k projections, and
builds the ModelConfig from the `llama.*` metadata keys.
"""

from __future__ import annotations

import contextlib
import math
import os

import gguf
import numpy as np

from denselora_jax.model.config import ModelConfig
from denselora_jax.model.weights import CheckpointError, CheckpointNotFoundError, hf_tensors

ARCH = "llama"
_SUPPORTED_TYPES = "F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q6_K (and whatever else gguf dequantizes)"


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp convert_hf_to_gguf `permute`, which reorders each head's rows from HF's
    half-split rotary layout [r0..r(h/2-1), i0..] to interleaved pairs [r0, i0, r1, i1, ...]."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class GGUFCheckpoint(contextlib.AbstractContextManager):
    """A .gguf file opened for reading; tensors come out dequantized to float32 in HF names and layout."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise CheckpointNotFoundError(f"{self.path}: no such GGUF file.")
        try:
            self.reader = gguf.GGUFReader(self.path)
        except Exception as e:  # the reader raises ValueError, IndexError, ... on damaged files
            raise CheckpointError(
                f"{self.path}: cannot read GGUF ({type(e).__name__}: {e}); the file is truncated or corrupt, "
                "re-download it."
            ) from None
        self._tensors = {t.name: t for t in self.reader.tensors}
        size = os.path.getsize(self.path)
        for t in self.reader.tensors:
            if t.data_offset + t.n_bytes > size:
                raise CheckpointError(
                    f"{self.path}: tensor {t.name} ends at byte {t.data_offset + t.n_bytes} but the file has "
                    f"{size} bytes; the file is truncated, re-download it."
                )
        arch = self._field("general.architecture")
        if arch != ARCH:
            raise CheckpointError(
                f"{self.path}: unsupported GGUF architecture {arch!r}; denselora_jax loads llama-architecture "
                "models (general.architecture = 'llama')."
            )
        self._config = self._read_config()
        names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, self._config.num_hidden_layers)
        self._gguf_name = {}
        for hf_name, _, _ in hf_tensors(self._config):
            base, suffix = hf_name.rsplit(".", 1)
            self._gguf_name[hf_name] = f"{names.get_name(base)}.{suffix}"

    def __exit__(self, *exc):
        return None  # the reader's memory map is released with the object

    # --- metadata -----------------------------------------------------------------------------------
    def _field(self, key: str, default=None):
        field = self.reader.fields.get(key)
        return default if field is None else field.contents()

    def _key(self, name: str, default=None, *, required: bool = False):
        value = self._field(f"{ARCH}.{name}", default)
        if required and value is None:
            raise CheckpointError(
                f"{self.path}: metadata key {ARCH}.{name} is missing; not a complete llama GGUF."
            )
        if isinstance(value, list):  # per-layer values (not used by llama models) must agree
            if len(set(value)) != 1:
                raise CheckpointError(f"{self.path}: per-layer {ARCH}.{name}={value} is not supported.")
            value = value[0]
        return value

    def _read_config(self) -> ModelConfig:
        d = {
            "model_type": "llama",
            "hidden_size": self._key("embedding_length", required=True),
            "intermediate_size": self._key("feed_forward_length", required=True),
            "num_hidden_layers": self._key("block_count", required=True),
            "num_attention_heads": self._key("attention.head_count", required=True),
            "num_key_value_heads": self._key("attention.head_count_kv"),
            "head_dim": self._key("attention.key_length") or self._key("rope.dimension_count"),
            "rms_norm_eps": self._key("attention.layer_norm_rms_epsilon", 1e-5),
            "rope_theta": self._key("rope.freq_base", 10000.0),
            "max_position_embeddings": self._key("context_length", 2048),
            "tie_word_embeddings": "output.weight" not in self._tensors,
            "attention_bias": "blk.0.attn_q.bias" in self._tensors,
            "mlp_bias": "blk.0.ffn_gate.bias" in self._tensors,
            "bos_token_id": self._field("tokenizer.ggml.bos_token_id"),
            "eos_token_id": self._field("tokenizer.ggml.eos_token_id"),
            "pad_token_id": self._field("tokenizer.ggml.padding_token_id"),
        }
        vocab = self._key("vocab_size") or len(self._field("tokenizer.ggml.tokens", []))
        if not vocab and "token_embd.weight" in self._tensors:
            vocab = int(self._tensors["token_embd.weight"].shape[1])
        d["vocab_size"] = vocab
        d["rope_scaling"] = self._rope_scaling(d)
        try:
            return ModelConfig.from_hf_dict(d)
        except (ValueError, TypeError) as e:
            raise CheckpointError(f"{self.path}: {e}") from None

    def _rope_scaling(self, d: dict) -> dict | None:
        kind = self._key("rope.scaling.type")
        if kind not in (None, "none", "linear"):
            raise CheckpointError(
                f"{self.path}: rope scaling {kind!r} is not supported (only linear and llama3)."
            )
        if kind == "linear":
            return {"rope_type": "linear", "factor": float(self._key("rope.scaling.factor", 1.0))}
        if "rope_freqs.weight" not in self._tensors:
            return None
        # llama.cpp stores llama3 scaling only as per-frequency factors (rope_freqs); recover the parameters.
        factors = np.asarray(self._dequantize("rope_freqs.weight"), np.float64).reshape(-1)
        head_dim = d["head_dim"] or d["hidden_size"] // d["num_attention_heads"]
        original = int(self._key("rope.scaling.original_context_length", 8192))
        return _llama3_from_factors(factors, float(d["rope_theta"]), head_dim, original, self.path)

    def config(self, **runtime) -> ModelConfig:
        return self._config.replace(**runtime)

    # --- tensors ------------------------------------------------------------------------------------
    def float_dtype(self) -> np.dtype:
        return np.dtype(np.float32)  # quantized blocks have no native float type

    def location(self, hf_name: str) -> str:
        return f"{self.path} (tensor {self._gguf_name.get(hf_name, hf_name)})"

    def _dequantize(self, name: str) -> np.ndarray:
        t = self._tensors[name]
        try:
            w = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise CheckpointError(
                f"{self.path}: tensor {name} has type {t.tensor_type.name}, which cannot be dequantized; "
                f"supported: {_SUPPORTED_TYPES}. Re-quantize the model with one of those."
            ) from None
        return w.reshape(tuple(int(n) for n in reversed(t.shape)))  # GGUF dims are innermost-first

    def get(self, hf_name: str) -> np.ndarray:
        name = self._gguf_name.get(hf_name)
        if name not in self._tensors:
            raise CheckpointError(
                f"{self.path}: tensor {name or hf_name} is missing, but the metadata implies it; "
                "the GGUF is incomplete."
            )
        w = self._dequantize(name)
        c = self._config
        if ".attn_q." in name:
            w = unpermute_rows(w, c.num_attention_heads)
        elif ".attn_k." in name:
            w = unpermute_rows(w, c.num_key_value_heads)
        return w


def llama3_factors(theta: float, head_dim: int, factor: float, low: float, high: float, original: int):
    """Per-frequency wavelength factors of llama3 rope scaling, as llama.cpp's converter computes them."""
    inv_freq = theta ** -(np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / inv_freq
    smooth = (original / wavelen - low) / (high - low)
    medium = 1.0 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < original / high, 1.0, np.where(wavelen > original / low, factor, medium))


def _llama3_from_factors(factors, theta: float, head_dim: int, original: int, path: str) -> dict | None:
    """Recover llama3 rope-scaling parameters from llama.cpp's per-frequency factors.

    Between the two cut-offs 1/f = 1/factor + s (1 - 1/factor), with s = (original * x - low) / (high - low)
    linear in x = inv_freq / 2pi. Only the line (and factor) matter, so low = 1 (Meta's value) loses nothing:
    two smoothed frequencies give the line; with one, high = 4 (Meta's) is assumed; with none, only the
    cut-offs matter and `original` (metadata or llama.cpp's default 8192) is checked against them.
    """
    if factors.shape != (head_dim // 2,):
        raise CheckpointError(f"{path}: rope_freqs has shape {factors.shape}, expected ({head_dim // 2},).")
    if np.allclose(factors, 1.0):
        return None
    factor = round(float(factors.max()), 6)
    if np.allclose(factors, factor, rtol=1e-6):
        return {"rope_type": "linear", "factor": factor}
    x = theta ** -(np.arange(0, head_dim, 2, dtype=np.float64) / head_dim) / (2 * math.pi)
    medium = (factors > 1 + 1e-6) & (factors < factor * (1 - 1e-6))
    s = (1 / factors[medium] - 1 / factor) / (1 - 1 / factor)
    high = 4.0
    if medium.sum() >= 2:
        slope, intercept = np.polyfit(x[medium], s, 1)  # s = original/(high-1) x - 1/(high-1)
        high, original = round(float(1 - 1 / intercept), 6), round(float(-slope / intercept))
    elif medium.sum() == 1:
        original = round((s[0] * (high - 1) + 1) / x[medium][0])
    fitted = llama3_factors(theta, head_dim, factor, 1.0, high, original)
    if not np.allclose(fitted, factors, rtol=1e-4):
        raise CheckpointError(
            f"{path}: rope_freqs does not follow llama3 (or linear) rope scaling; this rope scaling is not supported."
        )
    return {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": 1.0,
        "high_freq_factor": high,
        "original_max_position_embeddings": original,
    }
