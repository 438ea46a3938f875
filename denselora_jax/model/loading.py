"""load_pretrained / load_tokenizer / fingerprint: from an HF directory or a .gguf file to (config, params).

Parameters are assembled one at a time: each stacked per-layer array is preallocated once on the host in the
target dtype, filled layer by layer from the checkpoint (which is memory-mapped), put on its device or
sharding, and released before the next one, so the host never holds a second full copy of the model.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from denselora_jax.model.config import ModelConfig
from denselora_jax.model.gguf import GGUFCheckpoint
from denselora_jax.model.weights import (
    CONFIG_FILE,
    CheckpointError,
    CheckpointNotFoundError,
    SafetensorsCheckpoint,
    TensorSource,
    get_path,
    param_specs,
    set_path,
)

_GGUF_MAGIC = b"GGUF"


def is_gguf(path: str | os.PathLike) -> bool:
    path = os.fspath(path)
    if not os.path.isfile(path):
        return False
    with open(path, "rb") as f:
        return f.read(4) == _GGUF_MAGIC


def open_checkpoint(path: str | os.PathLike) -> SafetensorsCheckpoint | GGUFCheckpoint:
    """The reader for `path`: an HF model directory or a .gguf file."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return SafetensorsCheckpoint(path)
    if is_gguf(path) or (path.endswith(".gguf") and os.path.isfile(path)):
        return GGUFCheckpoint(path)  # a damaged .gguf gets the reader's precise error
    if not os.path.exists(path):
        raise CheckpointNotFoundError(f"{path}: no such file or directory.")
    raise CheckpointError(
        f"{path}: neither an HF model directory (with {CONFIG_FILE} and safetensors weights) nor a .gguf "
        "file; pass one of those."
    )


def _sharding_for(shardings: Any, path: tuple[str, ...]):
    if shardings is None or isinstance(shardings, jax.sharding.Sharding):
        return shardings
    try:
        return get_path(shardings, path)
    except (KeyError, TypeError):
        raise ValueError(
            f"shardings has no entry for parameter {'/'.join(path)}; pass a tree like params."
        ) from None


def _read(src: TensorSource, name: str, expected: tuple[int, ...]) -> np.ndarray:
    x = src.get(name)
    if tuple(x.shape) != expected:
        raise CheckpointError(
            f"{src.location(name)}: tensor {name} has shape {tuple(x.shape)}, but the model config implies "
            f"{expected}; the weights do not belong to this config."
        )
    return x


def load_pretrained(
    path: str | os.PathLike, *, dtype: Any = None, shardings: Any = None, **runtime
) -> tuple[ModelConfig, dict]:
    """Load an HF model directory or a llama .gguf file as (ModelConfig, params).

    dtype: parameter dtype (default: the checkpoint's float dtype; float32 for GGUF); the returned config's
      param_dtype is set to it. shardings: None (default device), one jax Sharding for every parameter, or a
      tree like params of Shardings. runtime: ModelConfig run-time options (scan_layers, remat, and
      compute_dtype for ModelConfig.dtype).
    """
    unknown = set(runtime) - {"compute_dtype", "scan_layers", "remat"}
    if unknown:
        raise TypeError(
            f"load_pretrained: unknown option(s) {sorted(unknown)}; known: compute_dtype, scan_layers, remat."
        )
    if "compute_dtype" in runtime:
        runtime["dtype"] = jnp.dtype(runtime.pop("compute_dtype")).name
    with open_checkpoint(path) as src:
        param_dtype = jnp.dtype(dtype if dtype is not None else src.float_dtype())
        config = src.config(param_dtype=param_dtype.name, **runtime)
        params: dict = {}
        for spec in param_specs(config):
            host = np.empty(spec.shape, param_dtype)
            if spec.rule.stacked:
                for i, name in enumerate(spec.hf_names()):
                    host[i] = spec.to_ours(_read(src, name, spec.hf_shape))
            else:
                host[...] = spec.to_ours(_read(src, spec.rule.hf, spec.hf_shape))
            sharding = _sharding_for(shardings, spec.rule.path)
            set_path(params, spec.rule.path, jax.device_put(host, sharding))
            del host
    return config, params


def load_tokenizer(path: str | os.PathLike):
    """The transformers tokenizer of an HF model directory or a .gguf file (built from its metadata)."""
    from transformers import AutoTokenizer

    path = os.fspath(path)
    if os.path.isdir(path):
        try:
            return AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{path}: no usable tokenizer files ({e}).") from None
    if is_gguf(path):
        return AutoTokenizer.from_pretrained(
            os.path.dirname(os.path.abspath(path)), gguf_file=os.path.basename(path)
        )
    open_checkpoint(path)  # raises the precise error for a path of neither kind
    raise CheckpointError(f"{path}: cannot build a tokenizer from this path.")


def _sample(x: jax.Array, n: int = 4096) -> bytes:
    """A strided sample of about n values, rounded to bfloat16 so the same weights loaded in float32 or
    bfloat16 fingerprint alike."""
    x = x.reshape(x.shape[0], -1) if x.ndim > 1 else x[:, None]
    rows = max(1, x.shape[0] // int(np.sqrt(n)))
    cols = max(1, x.shape[1] // int(np.sqrt(n)))
    return np.asarray(jax.device_get(x[::rows, ::cols].astype(jnp.bfloat16))).tobytes()


def fingerprint(config: ModelConfig, params: dict) -> str:
    """sha256 of the architecture and a small sample of the embedding and final norm: cheap, and different
    for different weights of one architecture."""
    h = hashlib.sha256(json.dumps(config.to_hf_dict(), sort_keys=True).encode())
    h.update(_sample(params["embed_tokens"]["embedding"]))
    h.update(_sample(params["norm"]["weight"]))
    return h.hexdigest()
