"""load_pretrained / load_tokenizer / fingerprint: from an HF directory or a .gguf file to (config, params).

With shardings, an HF (safetensors) checkpoint is read slice by slice: every global array is assembled
from its local devices' blocks, each read from the memory-mapped files (for a stacked parameter, that
block of each layer's tensor) and put on its device at once, so each process reads only its own shards and
the host holds one block at a time. Otherwise
(GGUF, whose quantised tensors are dequantised whole, or no shardings) parameters are assembled one at a
time on the host in the target dtype and released after placement: never a second full copy of the model.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError

from denselora_jax.model.config import ModelConfig
from denselora_jax.model.gguf import GGUFCheckpoint
from denselora_jax.model.weights import (
    CONFIG_FILE,
    CheckpointError,
    CheckpointNotFoundError,
    ParamSpec,
    SafetensorsCheckpoint,
    TensorSource,
    Transform,
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


def _split_layout(spec: ParamSpec) -> tuple[tuple[int, ...], tuple[int, ...], tuple[tuple[int, ...], ...]]:
    """One layer of ours == hf.reshape(split).transpose(perm); groups[k] = the split dims of HF dim k.

    The same transforms as ParamSpec.to_ours, written as a reshape and a permutation so that a block of
    ours maps to a rectangular block of the HF tensor (head splits only ever cut whole heads or head_dim).
    """
    hf, n, t = spec.hf_shape, spec.heads, spec.rule.transform
    if t is Transform.TRANSPOSE:
        return hf, (1, 0), ((0,), (1,))
    if t is Transform.HEADS_OUT:  # [N*hd, D] -> (N, hd, D) -> [D, N, hd]
        return (n, hf[0] // n, hf[1]), (2, 0, 1), ((0, 1), (2,))
    if t is Transform.HEADS_IN:  # [D, N*hd] -> (D, N, hd) -> [N, hd, D]
        return (hf[0], n, hf[1] // n), (1, 2, 0), ((0,), (1, 2))
    if t is Transform.HEADS_BIAS:  # [N*hd] -> [N, hd]
        return (n, hf[0] // n), (0, 1), ((0, 1),)
    return hf, tuple(range(len(hf))), tuple((k,) for k in range(len(hf)))  # AS_IS


class _SliceReader:
    """Blocks of one checkpoint's HF tensors in our orientation, read with safe_open(...).get_slice.

    Files are memory-mapped while one block is read and unmapped by release(): the mapped pages a read
    touches count in the process's RSS until then, so keeping the files open would cost a copy of the model.
    """

    def __init__(self, src: SafetensorsCheckpoint):
        self.src = src
        self._files: dict[str, Any] = {}

    def release(self) -> None:
        self._files.clear()  # the last references: safetensors unmaps the files

    def _slice(self, name: str, expected: tuple[int, ...]):
        file = self.src.location(name)  # the checkpoint directory itself when no file holds `name`
        if not os.path.isfile(file):
            self.src.get(name)  # raises the reader's precise "missing tensor" error
        if file not in self._files:
            self._files[file] = SafetensorsCheckpoint._safe_open(file)
        try:
            sl = self._files[file].get_slice(name)
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{file}: cannot read tensor {name} ({e}); the file is corrupt.") from None
        if tuple(sl.get_shape()) != expected:
            raise CheckpointError(
                f"{file}: tensor {name} has shape {tuple(sl.get_shape())}, but the model config implies "
                f"{expected}; the weights do not belong to this config."
            )
        return sl

    def check(self, spec: ParamSpec) -> None:
        """Every tensor of `spec` exists with the right shape (before any device is touched)."""
        for name in spec.hf_names():
            self._slice(name, spec.hf_shape)

    def layer_block(self, spec: ParamSpec, name: str, index: tuple[slice, ...]) -> np.ndarray:
        """ours(one layer)[index], reading only the HF rows/columns that hold it."""
        split, perm, groups = _split_layout(spec)
        ours_shape = tuple(split[p] for p in perm)
        split_idx: list[range] = [range(0)] * len(split)
        for k, sl in enumerate(index):
            split_idx[perm[k]] = range(*sl.indices(ours_shape[k]))
        hf_index, block_split, inner = [], [], []
        for group in groups:
            outer = split_idx[group[0]]
            width = math.prod(split[g] for g in group[1:])  # elements of HF dim per outer index
            hf_index.append(slice(outer.start * width, outer.stop * width))
            block_split += [len(outer), *(split[g] for g in group[1:])]
            inner += [slice(None), *(slice(split_idx[g].start, split_idx[g].stop) for g in group[1:])]
        x = self._slice(name, spec.hf_shape)[tuple(hf_index)]
        return x.reshape(block_split)[tuple(inner)].transpose(perm)


def _sharded_param(reader: _SliceReader, spec: ParamSpec, sharding, dtype: np.dtype) -> jax.Array:
    """The global array of one parameter, each local device's block read from the checkpoint.

    Like jax.make_array_from_callback, but each block goes to its device(s) as soon as it is read, so
    the host holds one block at a time rather than every local block of the parameter (measured with
    scripts/measure_loading.py: peak RSS 1.2x instead of 1.4x the weights). Replicas are read once.
    """
    index_of = sharding.addressable_devices_indices_map(spec.shape)
    replicas: dict[tuple, list] = {}
    for device, index in index_of.items():
        key = tuple(sl.indices(n) for sl, n in zip(index, spec.shape))
        replicas.setdefault(key, []).append(device)
    placed = {}
    for key, devices in replicas.items():
        index = tuple(slice(*k) for k in key)
        if spec.rule.stacked:
            layers = range(*key[0])
            block = np.empty((len(layers), *(len(range(*k)) for k in key[1:])), dtype)
            for j, i in enumerate(layers):
                block[j] = reader.layer_block(spec, spec.rule.hf.format(i=i), index[1:])
        else:
            block = reader.layer_block(spec, spec.rule.hf, index).astype(dtype)
        reader.release()  # unmap the pages this block touched before reading the next one
        placed.update({d: jax.device_put(block, d) for d in devices})
        del block
    return jax.make_array_from_single_device_arrays(spec.shape, sharding, [placed[d] for d in index_of])


def load_pretrained(
    path: str | os.PathLike, *, dtype: Any = None, shardings: Any = None, **runtime
) -> tuple[ModelConfig, dict]:
    """Load an HF model directory or a llama .gguf file as (ModelConfig, params).

    dtype: parameter dtype (default: the checkpoint's float dtype; float32 for GGUF); the returned config's
      param_dtype is set to it. shardings: None (default device), one jax Sharding for every parameter, or a
      tree like params of Shardings; with shardings, safetensors checkpoints are read slice by slice (each
      process reads only its devices' blocks). runtime: ModelConfig run-time options (scan_layers, remat,
      and compute_dtype for ModelConfig.dtype).
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
        specs = param_specs(config)
        if shardings is not None and isinstance(src, SafetensorsCheckpoint):
            reader = _SliceReader(src)
            try:
                for spec in specs:
                    reader.check(spec)  # refuse a wrong checkpoint before placing anything
                for spec in specs:
                    sharding = _sharding_for(shardings, spec.rule.path)
                    set_path(params, spec.rule.path, _sharded_param(reader, spec, sharding, param_dtype))
            finally:
                reader.release()
            return config, params
        for spec in specs:
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


_FINGERPRINT_SAMPLES = 4096  # values sampled from each tensor for the fingerprint (not a model size)


def _sample(x: jax.Array, n: int = _FINGERPRINT_SAMPLES) -> bytes:
    """A strided sample of about n values, rounded to bfloat16 so the same weights loaded in float32 or
    bfloat16 fingerprint alike. Computed under jit with a replicated result, so that it also works for
    arrays sharded over several processes (each process gets the whole sample)."""
    x2 = x.reshape(x.shape[0], -1) if x.ndim > 1 else x[:, None]
    rows = max(1, x2.shape[0] // int(np.sqrt(n)))
    cols = max(1, x2.shape[1] // int(np.sqrt(n)))
    sharding = getattr(x, "sharding", None)
    out = None
    if isinstance(sharding, jax.sharding.NamedSharding):
        out = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
    take = jax.jit(lambda a: _strided(a, rows, cols), out_shardings=out)
    return np.asarray(jax.device_get(take(x))).tobytes()


def _strided(x, rows: int, cols: int):
    x = x.reshape(x.shape[0], -1) if x.ndim > 1 else x[:, None]
    return x[::rows, ::cols].astype(jnp.bfloat16)


def fingerprint(config: ModelConfig, params: dict) -> str:
    """sha256 of the architecture and a small sample of the embedding and final norm: cheap, and different
    for different weights of one architecture."""
    h = hashlib.sha256(json.dumps(config.to_hf_dict(), sort_keys=True).encode())
    h.update(_sample(params["embed_tokens"]["embedding"]))
    h.update(_sample(params["norm"]["weight"]))
    return h.hexdigest()
