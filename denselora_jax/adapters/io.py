"""Adapter files: save_adapter / load_adapter (adapter_config.json + adapter_model.safetensors).

Tensors are stored in PyTorch orientation (out x in), the transpose of our [in, out] kernels, one tensor per
layer for per-layer parameters and ONE tensor for each shared encoder/decoder. The file name of a tensor
follows from its tree path alone (`_file_name`); the JSON records the adapter config, the base model's
fingerprint and the projection widths, so shapes are checked before any tensor is read.

`load_adapter` also reads a PEFT LoRA/DoRA directory (peft's save_pretrained: an adapter_config.json with
"peft_type" and `base_model.model.model.layers.{i}.{self_attn|mlp}.{proj}.lora_A.weight`-named tensors) into
this project's LoRA/DoRA tree, refusing PEFT features that tree cannot hold (see `_peft_header`).
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import re
import shutil
import tempfile
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from denselora_jax.adapters.config import PROJECTIONS, AdapterConfig, Method
from denselora_jax.adapters.core import abstract_adapter
from denselora_jax.model.config import ModelConfig

FORMAT = "denselora-jax-adapter"
FORMAT_VERSION = 1
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"

# Torch-orientation dims of one layer's slice of each tensor: "r" rank, "in"/"out" the projection's widths.
_TORCH_DIMS = {
    "encoder": ("r", "in"),
    "decoder": ("out", "r"),
    "dense": ("r", "r"),
    "lora_A": ("r", "in"),
    "lora_B": ("out", "r"),
    "magnitude": ("out",),
}
# Any valid ModelConfig: the tree's STRUCTURE (which tensors exist where) does not depend on model sizes.
_SHAPELESS = ModelConfig(
    vocab_size=1, hidden_size=1, intermediate_size=1, num_hidden_layers=1, num_attention_heads=1
)


class AdapterFileError(ValueError):
    """An adapter directory that cannot be used; the message names the file and the problem."""


class AdapterNotFoundError(AdapterFileError, FileNotFoundError):
    """The adapter directory or one of its two files does not exist."""


class AdapterMismatchError(AdapterFileError):
    """A valid adapter that does not fit the requested model (shapes, fingerprint) or method."""


def _paths(ac: AdapterConfig) -> list[tuple[str, str, str]]:
    """(group, target, name) of every tensor of the adapter tree, in the tree's own order."""
    flat = jax.tree_util.tree_flatten_with_path(abstract_adapter(_SHAPELESS, ac))[0]
    paths = [tuple(k.key for k in path) for path, _ in flat]
    assert all(name in _TORCH_DIMS for _, _, name in paths), paths  # a new tensor kind needs a file name
    return paths


def _file_name(grp: str, target: str, name: str, layer: int | None) -> str:
    suffix = ".weight" if len(_TORCH_DIMS[name]) == 2 else ""
    return f"{name}.{target}{suffix}" if layer is None else f"layers.{layer}.{target}.{name}{suffix}"


def _torch_shape(name: str, r: int, d_in: int, d_out: int) -> tuple[int, ...]:
    return tuple({"r": r, "in": d_in, "out": d_out}[d] for d in _TORCH_DIMS[name])


def _widths_of_tree(adapter: dict, ac: AdapterConfig) -> tuple[dict[str, tuple[int, int]], int]:
    """Projection widths {target: (d_in, d_out)} and layer count, read off (and checked against) the tree."""
    expected = _paths(ac)
    got = {
        tuple(getattr(k, "key", k) for k in p) for p, _ in jax.tree_util.tree_flatten_with_path(adapter)[0]
    }
    if got != set(expected):
        raise ValueError(
            f"save_adapter: the adapter tree does not match its adapter_config ({ac.method}, targets "
            f"{list(ac.targets)}, share_across_layers={ac.share_across_layers}): missing "
            f"{sorted('/'.join(p) for p in set(expected) - got)}, unexpected "
            f"{sorted('/'.join(map(str, p)) for p in got - set(expected))}; pass the tree init_adapter built for it."
        )
    sizes: dict = {}  # "L", "r" or (target, "in"|"out") -> sizes seen
    for grp, t, name in expected:
        shape = tuple(adapter[grp][t][name].shape)
        labels = (("L",) if grp == "layers" else ()) + _TORCH_DIMS[name][::-1]
        if len(shape) != len(labels):
            raise ValueError(f"save_adapter: {grp}/{t}/{name} has shape {shape}; expected axes {labels}.")
        for label, n in zip(labels, shape):
            sizes.setdefault(label if label in ("L", "r") else (t, label), set()).add(n)
    bad = {k: sorted(v) for k, v in sizes.items() if len(v) > 1}
    if bad or sizes["r"] != {ac.rank}:
        raise ValueError(
            f"save_adapter: inconsistent tensor shapes (sizes per axis: {bad or sizes['r']}, rank {ac.rank} "
            "expected); pass the tree init_adapter built for this adapter_config."
        )
    widths = {t: (sizes[t, "in"].pop(), sizes[t, "out"].pop()) for t in ac.targets}
    return widths, sizes["L"].pop()


def _expected_shapes(ac: AdapterConfig, widths: dict, n_layers: int) -> dict[tuple[str, str, str], tuple]:
    """Our [in, out]-oriented shape of every tree tensor, from the config, widths and layer count."""
    out = {}
    for grp, t, name in _paths(ac):
        torch = _torch_shape(name, ac.rank, *widths[t])
        out[grp, t, name] = ((n_layers,) if grp == "layers" else ()) + torch[::-1]
    return out


def save_adapter(
    directory: str | os.PathLike,
    adapter: dict,
    adapter_config: AdapterConfig,
    base_fingerprint: str | None = None,
) -> None:
    """Write `directory`/{adapter_config.json, adapter_model.safetensors} atomically (temp dir + rename).

    An existing adapter directory is replaced; a directory holding anything else is refused.
    """
    ac, directory = adapter_config, os.path.abspath(os.fspath(directory))
    widths, n_layers = _widths_of_tree(adapter, ac)
    tensors: dict[str, np.ndarray] = {}
    for grp, t, name in _paths(ac):
        x = np.asarray(jax.device_get(adapter[grp][t][name]), np.float32)
        if grp == "shared":
            tensors[_file_name(grp, t, name, None)] = np.ascontiguousarray(x.T)
        else:
            for layer in range(n_layers):
                tensors[_file_name(grp, t, name, layer)] = np.ascontiguousarray(x[layer].T)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        **ac.to_dict(),
        "base_model_fingerprint": base_fingerprint,
        "model": {
            "num_hidden_layers": n_layers,
            "projections": {t: {"in": widths[t][0], "out": widths[t][1]} for t in ac.targets},
        },
    }
    if os.path.isdir(directory):
        extra = set(os.listdir(directory)) - {CONFIG_FILE, WEIGHTS_FILE}
        if extra:
            raise FileExistsError(
                f"save_adapter: {directory} exists and holds other files ({sorted(extra)[:5]}); "
                "save into a new or empty directory, or an existing adapter directory."
            )
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.tmp-", dir=parent)
    try:
        save_file(tensors, os.path.join(tmp, WEIGHTS_FILE), metadata={"format": "pt"})
        with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
            json.dump(meta, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        # A directory cannot be renamed onto a non-empty one: move the old one aside, swap, then delete it.
        old = None
        if os.path.exists(directory):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.old-", dir=parent)
            os.rename(directory, os.path.join(old, "adapter"))
        os.rename(tmp, directory)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class AdapterFormat(enum.StrEnum):
    DENSELORA_JAX = "denselora-jax"  # save_adapter's
    PEFT = "peft"  # peft's save_pretrained (LoRA, DoRA)


@dataclasses.dataclass(frozen=True)
class _Header:
    """What adapter_config.json says, validated."""

    config: AdapterConfig
    widths: dict[str, tuple[int, int]]  # {target: (d_in, d_out)}
    num_layers: int
    fingerprint: str | None
    format: AdapterFormat = AdapterFormat.DENSELORA_JAX

    def tensor_name(self, grp: str, target: str, name: str, layer: int | None) -> str:
        if self.format is AdapterFormat.PEFT:
            return _peft_name(target, name, layer)
        return _file_name(grp, target, name, layer)


def _read_header(directory: str) -> _Header:
    if not os.path.isdir(directory):
        raise AdapterNotFoundError(f"{directory}: no such adapter directory.")
    for file in (CONFIG_FILE, WEIGHTS_FILE):
        if not os.path.isfile(os.path.join(directory, file)):
            if file == WEIGHTS_FILE and os.path.isfile(os.path.join(directory, "adapter_model.bin")):
                raise AdapterNotFoundError(
                    f"{directory}: only adapter_model.bin (pickled PEFT weights, not read here); re-save the "
                    "adapter with peft's save_pretrained(dir, safe_serialization=True)."
                )
            raise AdapterNotFoundError(
                f"{directory}: {file} is missing; an adapter directory holds {CONFIG_FILE} and {WEIGHTS_FILE} "
                "(written by save_adapter)."
            )
    path = os.path.join(directory, CONFIG_FILE)
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterFileError(f"{path}: not readable JSON ({e}); the file is corrupt.") from None
    if isinstance(meta, dict) and "peft_type" in meta and meta.get("format") != FORMAT:
        return _peft_header(directory, meta)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise AdapterFileError(f'{path}: not a denselora-jax adapter (no "format": "{FORMAT}").')
    if meta.get("format_version") != FORMAT_VERSION:
        raise AdapterFileError(
            f"{path}: format_version {meta.get('format_version')!r} is not supported (this version reads "
            f"{FORMAT_VERSION}); use the denselora-jax release that wrote it."
        )
    try:
        ac = AdapterConfig.from_dict(meta)
        proj = meta["model"]["projections"]
        return _Header(
            config=ac,
            widths={t: (int(proj[t]["in"]), int(proj[t]["out"])) for t in ac.targets},
            num_layers=int(meta["model"]["num_hidden_layers"]),
            fingerprint=meta.get("base_model_fingerprint"),
        )
    except (ValueError, TypeError, KeyError) as e:
        raise AdapterFileError(f"{path}: invalid adapter config ({type(e).__name__}: {e}).") from None


def _check_model(directory: str, h: _Header, mc: ModelConfig) -> None:
    problems = []
    if h.num_layers != mc.num_hidden_layers:
        problems.append(f"{h.num_layers} layers vs {mc.num_hidden_layers}")
    dims = mc.projection_dims()
    for t in h.config.targets:
        if h.widths[t] != dims[t]:
            problems.append(f"{t} {h.widths[t][0]}->{h.widths[t][1]} vs {dims[t][0]}->{dims[t][1]}")
    if problems:
        raise AdapterMismatchError(
            f"{directory}: the adapter was made for another model shape ({'; '.join(problems)}; adapter vs "
            "given model); load it with the base model it was trained on."
        )


def _check_fingerprint(directory: str, h: _Header, given: str | None, force: bool, mc: ModelConfig | None):
    if given is None or h.fingerprint is None or given == h.fingerprint:
        return
    msg = (
        f"{os.path.join(directory, CONFIG_FILE)}: the adapter was trained on a base model with fingerprint "
        f"{h.fingerprint[:16]}..., the given base has {given[:16]}..."
    )
    if not force:
        raise AdapterMismatchError(
            msg + "; use the matching base model, or force=True (--force) to load anyway."
        )
    if mc is None:
        raise AdapterMismatchError(
            msg + "; force=True also needs model_config, so that shapes can be checked."
        )
    warnings.warn(msg + "; loading anyway (force=True): the shapes match.", stacklevel=3)


def load_adapter(
    directory: str | os.PathLike,
    *,
    model_config: ModelConfig | None = None,
    base_fingerprint: str | None = None,
    force: bool = False,
    method: Method | str | None = None,
) -> tuple[dict, AdapterConfig]:
    """Read an adapter written by save_adapter (or a PEFT LoRA/DoRA directory) as (adapter tree (float32,
    [in, out]), AdapterConfig).

    model_config: refuse an adapter whose shapes do not fit this model. base_fingerprint: refuse an adapter
    saved for a base with another fingerprint, unless force=True (which also needs model_config: a forced
    load is only allowed when the shapes match). method: refuse an adapter of another method.
    """
    directory = os.fspath(directory)
    h = _read_header(directory)
    ac = h.config
    if method is not None and Method(method) != ac.method:
        raise AdapterMismatchError(
            f"{directory}: this is a {ac.method} adapter, but a {Method(method)} adapter was asked for; "
            "point to an adapter of that method or change the method."
        )
    if model_config is not None:
        _check_model(directory, h, model_config)
    _check_fingerprint(directory, h, base_fingerprint, force, model_config)

    expected = _expected_shapes(ac, h.widths, h.num_layers)
    slots = {}  # file name -> (tree path, layer or None, torch shape)
    for grp, t, name in expected:
        torch_shape = _torch_shape(name, ac.rank, *h.widths[t])
        for layer in [None] if grp == "shared" else range(h.num_layers):
            slots[h.tensor_name(grp, t, name, layer)] = ((grp, t, name), layer, torch_shape)
    path = os.path.join(directory, WEIGHTS_FILE)
    host = {k: np.empty(s, np.float32) for k, s in expected.items()}
    try:
        with safe_open(path, framework="numpy") as f:
            keys = set(f.keys())
            missing, extra = sorted(set(slots) - keys), sorted(keys - set(slots))
            if missing or extra:
                raise AdapterMismatchError(
                    f"{path}: its tensors do not match the {ac.method} adapter that {CONFIG_FILE} describes "
                    f"(targets {list(ac.targets)}, share_across_layers={ac.share_across_layers}): missing "
                    f"{_some(missing)}, unexpected {_some(extra)}; the two files belong to different adapters."
                )
            for key, (_, _, torch_shape) in slots.items():
                got = tuple(f.get_slice(key).get_shape())
                if got != torch_shape:
                    raise AdapterMismatchError(
                        f"{path}: tensor {key} has shape {got}, but {CONFIG_FILE} (rank {ac.rank}) implies "
                        f"{torch_shape}; the two files belong to different adapters."
                    )
            for key, (tree_path, layer, _) in slots.items():
                x = f.get_tensor(key).T
                if layer is None:
                    host[tree_path][...] = x
                else:
                    host[tree_path][layer] = x
    except (SafetensorError, OSError, TypeError) as e:
        raise AdapterFileError(f"{path}: cannot read ({e}); the file is truncated or corrupt.") from None
    tree: dict = {}
    for (grp, t, name), x in host.items():
        tree.setdefault(grp, {}).setdefault(t, {})[name] = jnp.asarray(x)
    return tree, ac


def _some(names: list[str]) -> str:
    return str(names[:4])[:-1] + (", ...]" if len(names) > 4 else "]")


# --- PEFT LoRA / DoRA directories ---------------------------------------------------------------------------

_PEFT_KEY = re.compile(
    r"base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\."
    r"(lora_A\.weight|lora_B\.weight|lora_magnitude_vector)"
)
_PEFT_TENSOR = {"lora_A.weight": "lora_A", "lora_B.weight": "lora_B", "lora_magnitude_vector": "magnitude"}
_PEFT_OF_OURS = {ours: peft for peft, ours in _PEFT_TENSOR.items()}
_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
# Config entries read into AdapterConfig, and entries that never change what a saved adapter computes
# (bookkeeping; init-time options; which modules are adapted, which the tensors themselves show). Any other
# entry must hold its "off" value (None, False, "none", {}, []): a new PEFT feature is refused, not ignored.
_PEFT_READ = {"peft_type", "r", "lora_alpha", "lora_dropout", "use_rslora", "use_dora"}
_PEFT_INERT = {
    "target_modules", "exclude_modules", "layers_pattern", "base_model_name_or_path", "revision",
    "task_type", "inference_mode", "auto_mapping", "peft_version", "megatron_core", "qalora_group_size",
    "runtime_config", "ensure_weight_tying", "loftq_config", "eva_config", "corda_config", "lora_ga_config",
    "init_lora_weights",
}  # fmt: skip
# Initialisations that leave the base weights as they are (PiSSA, OLoRA, LoftQ, CorDA, LoRA-GA change them).
_PEFT_PLAIN_INIT = (True, False, "gaussian", "orthogonal", "eva")
_PEFT_WHY = {
    "bias": "trained bias terms",
    "lora_bias": "LoRA bias terms",
    "modules_to_save": "fully trained extra modules",
    "rank_pattern": "layer-specific ranks",
    "alpha_pattern": "layer-specific alphas",
    "layers_to_transform": "only some layers adapted",
    "trainable_token_indices": "trained token embeddings",
}


def _peft_name(target: str, name: str, layer: int | None) -> str:
    grp = "self_attn" if target in _ATTENTION else "mlp"
    return f"base_model.model.model.layers.{layer}.{grp}.{target}.{_PEFT_OF_OURS[name]}"


def _peft_header(directory: str, meta: dict) -> _Header:
    """The header of a PEFT LoRA/DoRA directory: options from its JSON, targets/widths/layers from its tensors.

    Only what our LoRA/DoRA tree holds exactly is accepted: every layer of each adapted LLaMA projection, one
    rank and alpha, no biases, no extra trained modules, base weights untouched by the initialisation.
    """
    path = os.path.join(directory, CONFIG_FILE)
    fix = "; only plain LoRA/DoRA of LLaMA projections in every layer can be imported."
    if meta["peft_type"] != "LORA":
        raise AdapterFileError(f"{path}: a PEFT {meta['peft_type']} adapter{fix}")
    missing = [k for k in ("r", "lora_alpha") if k not in meta]
    if missing:
        raise AdapterFileError(
            f"{path}: not a denselora-jax adapter, nor a complete PEFT LoRA config ({missing} missing); "
            "write it with peft's save_pretrained."
        )
    init = meta.get("init_lora_weights", True)
    used = [] if init in _PEFT_PLAIN_INIT else [f"init_lora_weights={init!r} (changes the base weights)"]
    for k, v in meta.items():
        if k not in _PEFT_READ | _PEFT_INERT and v and v != "none":
            used.append(f"{k}={v!r} ({_PEFT_WHY.get(k, 'not implemented here')})")
    if used:
        raise AdapterFileError(
            f"{path}: PEFT options this project's LoRA cannot hold: {'; '.join(used)}{fix}"
        )

    weights = os.path.join(directory, WEIGHTS_FILE)
    try:
        with safe_open(weights, framework="numpy") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as e:
        raise AdapterFileError(f"{weights}: cannot read ({e}); the file is truncated or corrupt.") from None
    found: dict[tuple[str, str], dict[int, tuple]] = {}  # (target, our name) -> {layer: torch shape}
    other = []
    for key, shape in shapes.items():
        m = _PEFT_KEY.fullmatch(key)
        if m is None or m[3] not in PROJECTIONS or (m[2] == "self_attn") != (m[3] in _ATTENTION):
            other.append(key)
        else:
            found.setdefault((m[3], _PEFT_TENSOR[m[4]]), {})[int(m[1])] = shape
    if other or not found:
        raise AdapterFileError(
            f"{weights}: tensors other than lora_A/lora_B/lora_magnitude_vector of the layers' LLaMA "
            f"projections (e.g. of lm_head, embeddings, biases): {_some(sorted(other)) if other else 'none'}{fix}"
        )
    r, n_layers = meta["r"], 1 + max(i for per_layer in found.values() for i in per_layer)
    targets = [t for t in PROJECTIONS if any(key[0] == t for key in found)]
    for (t, name), per_layer in found.items():
        if sorted(per_layer) != list(range(n_layers)):
            raise AdapterFileError(f"{weights}: {t} is adapted in layers {sorted(per_layer)} only{fix}")
        rank_axis = {"lora_A": 0, "lora_B": 1}.get(name)
        if rank_axis is not None and {shape[rank_axis] for shape in per_layer.values()} != {r}:
            raise AdapterFileError(f"{weights}: {t} has layer-specific ranks (r={r} in {CONFIG_FILE}){fix}")
    if any((t, name) not in found for t in targets for name in ("lora_A", "lora_B")):
        raise AdapterFileError(f"{weights}: some projections have lora_A without lora_B or the reverse{fix}")
    widths = {t: (found[t, "lora_A"][0][1], found[t, "lora_B"][0][0]) for t in targets}
    try:
        ac = AdapterConfig(
            method=Method.DORA if meta.get("use_dora") else Method.LORA,
            rank=r,
            alpha=float(meta["lora_alpha"]),
            dropout=float(meta.get("lora_dropout") or 0.0),
            targets=tuple(widths),
            use_rslora=bool(meta.get("use_rslora")),
        )
    except (ValueError, TypeError) as e:
        raise AdapterFileError(f"{path}: invalid PEFT LoRA config ({e}).") from None
    return _Header(ac, widths, n_layers, None, AdapterFormat.PEFT)
