"""The HF <-> denselora_jax parameter table, and reading/writing HF safetensors checkpoints.

One table (`TABLE`) says, for every HF tensor of a LLaMA checkpoint, where it lives in our parameter tree
and how it is reshaped; it is used in both directions (loading and `save_hf`). HF checkpoints are read one
tensor at a time through `safetensors.safe_open` (memory-mapped), so nothing here holds a whole model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import json
import os
from collections.abc import Iterator
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from denselora_jax.model.config import ModelConfig

CONFIG_FILE = "config.json"
_SAFETENSORS_FLOATS = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": jnp.bfloat16}
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and the problem."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """A checkpoint file (or the path itself) does not exist."""


class Dim(enum.Enum):
    """Symbolic sizes of HF tensors, resolved against a ModelConfig."""

    VOCAB = "vocab_size"
    EMBED = "hidden_size"
    MLP = "intermediate_size"
    Q = "q_width"  # num_attention_heads * head_dim
    KV = "kv_width"  # num_key_value_heads * head_dim


class Transform(enum.Enum):
    """How one layer's HF tensor becomes ours (and back)."""

    AS_IS = "as_is"  # norms, embedding, output biases
    TRANSPOSE = "transpose"  # torch Linear [out, in] -> kernel [in, out]
    HEADS_OUT = "heads_out"  # q/k/v weight [N*hd, D] -> [D, N, hd]
    HEADS_IN = "heads_in"  # o weight [D, N*hd] -> [N, hd, D]
    HEADS_BIAS = "heads_bias"  # q/k/v bias [N*hd] -> [N, hd]


class Needs(enum.Enum):
    """When a tensor exists at all."""

    ALWAYS = "always"
    UNTIED = "untied"  # lm_head only without tie_word_embeddings
    ATTN_BIAS = "attention_bias"
    MLP_BIAS = "mlp_bias"


@dataclasses.dataclass(frozen=True)
class Rule:
    hf: str  # HF tensor name; "{i}" is the layer index (then stacked on our axis 0)
    path: tuple[str, ...]  # our parameter tree path
    hf_dims: tuple[Dim, ...]
    transform: Transform = Transform.AS_IS
    needs: Needs = Needs.ALWAYS

    @property
    def stacked(self) -> bool:
        return "{i}" in self.hf


def _layer_rules() -> list[Rule]:
    attn, mlp = "model.layers.{i}.self_attn", "model.layers.{i}.mlp"
    a_path, m_path = ("layers", "self_attn"), ("layers", "mlp")
    rules = [
        Rule(
            "model.layers.{i}.input_layernorm.weight", ("layers", "input_layernorm", "weight"), (Dim.EMBED,)
        ),
        Rule(
            "model.layers.{i}.post_attention_layernorm.weight",
            ("layers", "post_attention_layernorm", "weight"),
            (Dim.EMBED,),
        ),
    ]
    for proj, width in (("q_proj", Dim.Q), ("k_proj", Dim.KV), ("v_proj", Dim.KV)):
        rules += [
            Rule(f"{attn}.{proj}.weight", (*a_path, proj, "kernel"), (width, Dim.EMBED), Transform.HEADS_OUT),
            Rule(
                f"{attn}.{proj}.bias",
                (*a_path, proj, "bias"),
                (width,),
                Transform.HEADS_BIAS,
                Needs.ATTN_BIAS,
            ),
        ]
    rules += [
        Rule(f"{attn}.o_proj.weight", (*a_path, "o_proj", "kernel"), (Dim.EMBED, Dim.Q), Transform.HEADS_IN),
        Rule(f"{attn}.o_proj.bias", (*a_path, "o_proj", "bias"), (Dim.EMBED,), needs=Needs.ATTN_BIAS),
    ]
    for proj, out, inp in (
        ("gate_proj", Dim.MLP, Dim.EMBED),
        ("up_proj", Dim.MLP, Dim.EMBED),
        ("down_proj", Dim.EMBED, Dim.MLP),
    ):
        rules += [
            Rule(f"{mlp}.{proj}.weight", (*m_path, proj, "kernel"), (out, inp), Transform.TRANSPOSE),
            Rule(f"{mlp}.{proj}.bias", (*m_path, proj, "bias"), (out,), needs=Needs.MLP_BIAS),
        ]
    return rules


TABLE: tuple[Rule, ...] = (
    Rule("model.embed_tokens.weight", ("embed_tokens", "embedding"), (Dim.VOCAB, Dim.EMBED)),
    *_layer_rules(),
    Rule("model.norm.weight", ("norm", "weight"), (Dim.EMBED,)),
    Rule("lm_head.weight", ("lm_head", "kernel"), (Dim.VOCAB, Dim.EMBED), Transform.TRANSPOSE, Needs.UNTIED),
)


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """One rule resolved against a config: concrete shapes, and the head split for q/k/v/o."""

    rule: Rule
    hf_shape: tuple[int, ...]  # one layer, HF orientation
    shape: tuple[int, ...]  # ours, with the stacked layer axis first when rule.stacked
    heads: int  # the head count that splits Q/KV widths (0 when unused)
    num_layers: int

    def hf_names(self) -> list[str]:
        return (
            [self.rule.hf.format(i=i) for i in range(self.num_layers)]
            if self.rule.stacked
            else [self.rule.hf]
        )

    def to_ours(self, x: np.ndarray) -> np.ndarray:
        """One layer's HF tensor -> our orientation (a view where possible)."""
        t = self.rule.transform
        if t is Transform.AS_IS:
            return x
        if t is Transform.TRANSPOSE:
            return x.T
        if t is Transform.HEADS_OUT:
            return x.T.reshape(x.shape[1], self.heads, -1)
        if t is Transform.HEADS_IN:
            return x.T.reshape(self.heads, -1, x.shape[0])
        return x.reshape(self.heads, -1)  # HEADS_BIAS

    def to_hf(self, y: np.ndarray) -> np.ndarray:
        """One layer of ours -> the HF tensor (contiguous, ready to write)."""
        t = self.rule.transform
        if t is Transform.AS_IS:
            out = y
        elif t is Transform.TRANSPOSE:
            out = y.T
        elif t is Transform.HEADS_OUT:
            out = y.reshape(y.shape[0], -1).T
        elif t is Transform.HEADS_IN:
            out = y.reshape(-1, y.shape[-1]).T
        else:
            out = y.reshape(-1)
        return np.ascontiguousarray(out)


def _size(dim: Dim, config: ModelConfig) -> int:
    if dim is Dim.Q:
        return config.num_attention_heads * config.head_dim
    if dim is Dim.KV:
        return config.kv_dim
    return getattr(config, dim.value)


def _present(needs: Needs, config: ModelConfig) -> bool:
    return {
        Needs.ALWAYS: True,
        Needs.UNTIED: not config.tie_word_embeddings,
        Needs.ATTN_BIAS: config.attention_bias,
        Needs.MLP_BIAS: config.mlp_bias,
    }[needs]


def param_specs(config: ModelConfig) -> list[ParamSpec]:
    """The table resolved for `config`: exactly the tensors this architecture has."""
    specs = []
    for rule in TABLE:
        if not _present(rule.needs, config):
            continue
        hf_shape = tuple(_size(d, config) for d in rule.hf_dims)
        heads = 0
        if Dim.Q in rule.hf_dims:
            heads = config.num_attention_heads
        elif Dim.KV in rule.hf_dims:
            heads = config.num_key_value_heads
        spec = ParamSpec(rule, hf_shape, (), heads, config.num_hidden_layers)
        layer_shape = spec.to_ours(np.empty(hf_shape, np.uint8)).shape
        shape = (config.num_hidden_layers, *layer_shape) if rule.stacked else layer_shape
        specs.append(dataclasses.replace(spec, shape=shape))
    return specs


def get_path(tree: dict, path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def set_path(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


class TensorSource(Protocol):
    """A checkpoint opened for reading: its config and its tensors by HF name (HF orientation, numpy)."""

    path: str

    def config(self, **runtime) -> ModelConfig: ...
    def float_dtype(self) -> np.dtype: ...
    def location(self, hf_name: str) -> str: ...  # the file that holds it, for error messages
    def get(self, hf_name: str) -> np.ndarray: ...  # CheckpointError when absent or unreadable


class SafetensorsCheckpoint(contextlib.AbstractContextManager):
    """An HF model directory: config.json plus model.safetensors or a sharded model.safetensors.index.json."""

    def __init__(self, directory: str | os.PathLike):
        self.path = os.fspath(directory)
        cfg = os.path.join(self.path, CONFIG_FILE)
        if not os.path.isfile(cfg):
            raise CheckpointNotFoundError(f"{cfg}: not found; an HF model directory needs its config.json.")
        with open(cfg) as f:
            try:
                self._hf_config = json.load(f)
            except json.JSONDecodeError as e:
                raise CheckpointError(f"{cfg}: not valid JSON ({e}).") from None
        self._files = self._tensor_files()
        self._stack = contextlib.ExitStack()
        self._open: dict[str, Any] = {}

    def _tensor_files(self) -> dict[str, str]:
        index, single = os.path.join(self.path, INDEX_FILE), os.path.join(self.path, SINGLE_FILE)
        if os.path.isfile(index):
            with open(index) as f:
                try:
                    weight_map = json.load(f)["weight_map"]
                except (json.JSONDecodeError, KeyError) as e:
                    raise CheckpointError(
                        f"{index}: not a safetensors index (no valid weight_map: {e})."
                    ) from None
            files = {name: os.path.join(self.path, shard) for name, shard in weight_map.items()}
            for shard in sorted(set(files.values())):
                if not os.path.isfile(shard):
                    raise CheckpointNotFoundError(
                        f"{shard}: shard listed in {index} is missing; copy or re-download the complete checkpoint."
                    )
            return files
        if os.path.isfile(single):
            with self._safe_open(single) as f:
                return dict.fromkeys(f.keys(), single)
        raise CheckpointNotFoundError(
            f"{self.path}: no {SINGLE_FILE} or {INDEX_FILE}; only safetensors weights are supported "
            "(convert .bin weights with transformers' save_pretrained(safe_serialization=True))."
        )

    @staticmethod
    def _safe_open(file: str):
        try:
            return safe_open(file, framework="numpy")
        except (SafetensorError, OSError) as e:
            raise CheckpointError(
                f"{file}: cannot read safetensors ({e}); the file is truncated or corrupt, re-download it."
            ) from None

    def __exit__(self, *exc):
        self._stack.close()
        self._open.clear()

    def config(self, **runtime) -> ModelConfig:
        try:
            return ModelConfig.from_hf_dict(self._hf_config, **runtime)
        except (ValueError, TypeError) as e:
            raise CheckpointError(f"{os.path.join(self.path, CONFIG_FILE)}: {e}") from None

    def location(self, hf_name: str) -> str:
        return self._files.get(hf_name, self.path)

    def _handle(self, file: str):
        if file not in self._open:
            self._open[file] = self._stack.enter_context(self._safe_open(file))
        return self._open[file]

    def float_dtype(self) -> np.dtype:
        """The embedding's dtype, read from the header (the data is not touched)."""
        name = "model.embed_tokens.weight"
        if name not in self._files:
            return np.dtype(np.float32)
        code = self._handle(self._files[name]).get_slice(name).get_dtype()
        return np.dtype(_SAFETENSORS_FLOATS.get(code, np.float32))

    def get(self, hf_name: str) -> np.ndarray:
        if hf_name not in self._files:
            raise CheckpointError(
                f"{self.path}: tensor {hf_name} is missing, but config.json implies it; the checkpoint "
                "does not match its config.json."
            )
        file = self._files[hf_name]
        try:
            return self._handle(file).get_tensor(hf_name)
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(
                f"{file}: cannot read tensor {hf_name} ({e}); the file is corrupt."
            ) from None


def hf_tensors(config: ModelConfig) -> Iterator[tuple[str, ParamSpec, int | None]]:
    """Every HF tensor name of `config`, with its spec and layer index (None when not stacked)."""
    for spec in param_specs(config):
        for i, name in enumerate(spec.hf_names()):
            yield name, spec, (i if spec.rule.stacked else None)


def save_hf(
    out_dir: str | os.PathLike, config: ModelConfig, params: dict, *, max_shard_bytes: int = 5 * 2**30
):
    """Write an HF model directory: config.json and model.safetensors (sharded with an index when larger
    than `max_shard_bytes`). Only one shard's tensors are on the host at a time."""
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    entries = list(hf_tensors(config))
    dtype = np.dtype(get_path(params, ("embed_tokens", "embedding")).dtype)
    shards: list[list[tuple[str, ParamSpec, int | None]]] = [[]]
    used = total = 0
    for entry in entries:
        nbytes = (
            int(np.prod(entry[1].hf_shape)) * np.dtype(get_path(params, entry[1].rule.path).dtype).itemsize
        )
        total += nbytes
        if shards[-1] and used + nbytes > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(entry)
        used += nbytes
    names = (
        [SINGLE_FILE]
        if len(shards) == 1
        else [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    )
    weight_map = {}
    for file, shard in zip(names, shards):
        tensors = {}
        for name, spec, layer in shard:
            value = get_path(params, spec.rule.path)
            tensors[name] = spec.to_hf(np.asarray(jax.device_get(value if layer is None else value[layer])))
            weight_map[name] = file
        save_file(tensors, os.path.join(out_dir, file), metadata={"format": "pt"})
        del tensors
    if len(shards) > 1:
        with open(os.path.join(out_dir, INDEX_FILE), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
        json.dump({**config.to_hf_dict(), "dtype": dtype.name}, f, indent=2)
