"""Adapter files: exact round trip, the PyTorch-orientation layout (each shared tensor once), atomic writes,
and one clear error per bad adapter directory."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from denselora_jax import PROJECTIONS, AdapterConfig, ModelConfig, abstract_adapter
from denselora_jax.adapters import io
from denselora_jax.adapters.core import adapted_projection
from denselora_jax.adapters.io import (
    AdapterFileError,
    AdapterMismatchError,
    AdapterNotFoundError,
    load_adapter,
    save_adapter,
)

MC = ModelConfig(
    vocab_size=50,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
)
R = 4
CASES = [
    AdapterConfig(rank=R),
    AdapterConfig(
        rank=R, targets=("q_proj", "o_proj", "gate_proj"), share_across_layers=False, activation="relu"
    ),
    AdapterConfig(method="lora", rank=R, targets=PROJECTIONS, use_rslora=True),
    AdapterConfig(method="dora", rank=R, alpha=8.0, dropout=0.0),
]


def random_adapter(ac, mc=MC, seed=0):
    """An adapter with every tensor random (non-zero), so that a misplaced or transposed tensor shows."""
    rs = np.random.RandomState(seed)
    return jax.tree.map(lambda x: jnp.asarray(rs.randn(*x.shape), x.dtype), abstract_adapter(mc, ac))


def read_file(path):
    return safetensors.numpy.load_file(os.path.join(path, io.WEIGHTS_FILE))


@pytest.mark.parametrize("ac", CASES, ids=lambda ac: f"{ac.method}-{ac.share_across_layers}")
def test_round_trip_is_exact(tmp_path, ac):
    adapter = random_adapter(ac)
    save_adapter(tmp_path / "a", adapter, ac, base_fingerprint="abc123")
    loaded, ac2 = load_adapter(tmp_path / "a", model_config=MC, base_fingerprint="abc123")
    assert ac2 == ac
    assert jax.tree.structure(loaded) == jax.tree.structure(adapter)
    for x, y in zip(jax.tree.leaves(adapter), jax.tree.leaves(loaded)):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    meta = json.loads((tmp_path / "a" / io.CONFIG_FILE).read_text())
    assert meta["format_version"] == io.FORMAT_VERSION and meta["base_model_fingerprint"] == "abc123"
    assert {k: meta[k] for k in ac.to_dict()} == ac.to_dict()
    assert meta["model"]["num_hidden_layers"] == MC.num_hidden_layers
    dims = MC.projection_dims()
    assert meta["model"]["projections"] == {t: {"in": dims[t][0], "out": dims[t][1]} for t in ac.targets}
    assert sorted(os.listdir(tmp_path)) == ["a"]  # no temp dir left behind


def test_denselora_file_layout_stores_each_shared_tensor_once(tmp_path):
    ac = AdapterConfig(rank=R)
    adapter = random_adapter(ac)
    save_adapter(tmp_path, adapter, ac)
    tensors = read_file(tmp_path)
    L, dims = MC.num_hidden_layers, MC.projection_dims()
    expected = {}
    for t in ac.targets:
        expected[f"encoder.{t}.weight"] = (R, dims[t][0])
        expected[f"decoder.{t}.weight"] = (dims[t][1], R)
        for layer in range(L):
            expected[f"layers.{layer}.{t}.dense.weight"] = (R, R)
    assert {k: v.shape for k, v in tensors.items()} == expected
    assert len(tensors) == 2 * len(ac.targets) + L * len(ac.targets)
    # PyTorch orientation: the file's tensors are the transposes of our [in, out] kernels.
    np.testing.assert_array_equal(
        tensors["encoder.q_proj.weight"], np.asarray(adapter["shared"]["q_proj"]["encoder"]).T
    )
    np.testing.assert_array_equal(
        tensors["decoder.down_proj.weight"], np.asarray(adapter["shared"]["down_proj"]["decoder"]).T
    )
    np.testing.assert_array_equal(
        tensors["layers.2.v_proj.dense.weight"], np.asarray(adapter["layers"]["v_proj"]["dense"][2]).T
    )

    # The file's tensors, used as the paper writes the formula (column vectors, out x in), reproduce our
    # projection: y = W0 x + s * gelu(D @ M @ gelu(E @ x)).
    rs = np.random.RandomState(0)
    x = rs.randn(5, dims["k_proj"][0]).astype(np.float32)
    E, D, M = (
        tensors[k] for k in ("encoder.k_proj.weight", "decoder.k_proj.weight", "layers.1.k_proj.dense.weight")
    )
    gelu = jax.nn.gelu
    ref = (
        ac.scaling
        * np.asarray(gelu(D @ (M @ np.asarray(gelu(E @ x.T, approximate=False))), approximate=False)).T
    )
    p = {
        **{n: adapter["shared"]["k_proj"][n] for n in ("encoder", "decoder")},
        "dense": adapter["layers"]["k_proj"]["dense"][1],
    }
    ours = adapted_projection(ac, x, None, None, np.zeros((5, dims["k_proj"][1]), np.float32), p, None)
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ac", CASES[1:], ids=lambda ac: f"{ac.method}-{ac.share_across_layers}")
def test_per_layer_file_layout(tmp_path, ac):
    adapter = random_adapter(ac)
    save_adapter(tmp_path, adapter, ac)
    tensors = read_file(tmp_path)
    L, dims = MC.num_hidden_layers, MC.projection_dims()
    if ac.method == "denselora":
        per_layer = {
            "encoder.weight": ("r", "in"),
            "decoder.weight": ("out", "r"),
            "dense.weight": ("r", "r"),
        }
    else:
        per_layer = {"lora_A.weight": ("r", "in"), "lora_B.weight": ("out", "r")}
        if ac.method == "dora":
            per_layer["magnitude"] = ("out",)
    expected = {}
    for t in ac.targets:
        size = {"r": R, "in": dims[t][0], "out": dims[t][1]}
        for layer in range(L):
            for name, axes in per_layer.items():
                expected[f"layers.{layer}.{t}.{name}"] = tuple(size[a] for a in axes)
    assert {k: v.shape for k, v in tensors.items()} == expected
    t = ac.targets[-1]
    for name, value in adapter["layers"][t].items():
        stored = tensors[f"layers.1.{t}.{name}" + (".weight" if value.ndim == 3 else "")]
        np.testing.assert_array_equal(stored, np.asarray(value[1]).T)


# --- atomic writes -------------------------------------------------------------------------------------------


def test_save_replaces_an_adapter_atomically(tmp_path, monkeypatch):
    ac = CASES[0]
    first, second = random_adapter(ac, seed=0), random_adapter(ac, seed=5)
    save_adapter(tmp_path / "a", first, ac)
    save_adapter(tmp_path / "a", second, ac)  # an existing adapter directory is replaced
    np.testing.assert_array_equal(
        load_adapter(tmp_path / "a")[0]["layers"]["q_proj"]["dense"], second["layers"]["q_proj"]["dense"]
    )

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(io, "save_file", crash)  # a failure half-way leaves the previous adapter intact
    with pytest.raises(OSError, match="disk full"):
        save_adapter(tmp_path / "a", first, ac)
    monkeypatch.undo()
    np.testing.assert_array_equal(
        load_adapter(tmp_path / "a")[0]["layers"]["q_proj"]["dense"], second["layers"]["q_proj"]["dense"]
    )
    assert sorted(os.listdir(tmp_path)) == ["a"]


def test_save_refuses_a_directory_with_other_files(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="holds other files"):
        save_adapter(tmp_path, random_adapter(CASES[0]), CASES[0])
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_save_refuses_a_tree_of_another_config(tmp_path):
    adapter = random_adapter(AdapterConfig(method="lora", rank=R))
    with pytest.raises(ValueError, match="does not match its adapter_config"):
        save_adapter(tmp_path / "a", adapter, AdapterConfig(rank=R))
    with pytest.raises(ValueError, match="rank 8 expected"):
        save_adapter(tmp_path / "a", adapter, AdapterConfig(method="lora", rank=8))
    assert not (tmp_path / "a").exists()


# --- bad adapter directories ------------------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path):
    ac = CASES[0]
    save_adapter(tmp_path / "a", random_adapter(ac), ac, base_fingerprint="f" * 64)
    return tmp_path / "a"


def test_missing_files(tmp_path, saved):
    with pytest.raises(AdapterNotFoundError, match="no such adapter directory"):
        load_adapter(tmp_path / "nowhere")
    for name in (io.WEIGHTS_FILE, io.CONFIG_FILE):
        os.rename(saved / name, tmp_path / name)
        with pytest.raises(AdapterNotFoundError, match=f"{name} is missing"):
            load_adapter(saved)
        os.rename(tmp_path / name, saved / name)


def test_adapter_for_another_model_shape(saved):
    bigger = MC.replace(hidden_size=64)
    with pytest.raises(AdapterMismatchError, match=r"another model shape \(q_proj 32->32 vs 64->32;") as e:
        load_adapter(saved, model_config=bigger)
    assert "load it with the base model it was trained on" in str(e.value)
    with pytest.raises(AdapterMismatchError, match="3 layers vs 4"):
        load_adapter(saved, model_config=MC.replace(num_hidden_layers=4))


def test_adapter_of_another_method(saved):
    with pytest.raises(
        AdapterMismatchError, match="this is a denselora adapter, but a lora adapter was asked for"
    ):
        load_adapter(saved, method="lora")
    # adapter_config.json and the tensors disagree (say, a LoRA config next to DenseLoRA tensors)
    meta = json.loads((saved / io.CONFIG_FILE).read_text())
    (saved / io.CONFIG_FILE).write_text(json.dumps({**meta, "method": "lora"}))
    with pytest.raises(AdapterMismatchError, match="do not match the lora adapter") as e:
        load_adapter(saved)
    assert "layers.0.down_proj.lora_A.weight" in str(e.value) and "decoder.down_proj.weight" in str(e.value)


def test_tensor_of_the_wrong_shape(saved):
    tensors = read_file(saved)
    tensors["layers.1.v_proj.dense.weight"] = np.zeros((R, R + 1), np.float32)
    safetensors.numpy.save_file(tensors, saved / io.WEIGHTS_FILE)
    with pytest.raises(AdapterMismatchError, match=r"layers.1.v_proj.dense.weight has shape \(4, 5\)"):
        load_adapter(saved)


def test_corrupt_files(saved):
    data = (saved / io.WEIGHTS_FILE).read_bytes()
    (saved / io.WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterFileError, match="truncated or corrupt"):
        load_adapter(saved)
    (saved / io.CONFIG_FILE).write_text("{not json")
    with pytest.raises(AdapterFileError, match="not readable JSON"):
        load_adapter(saved)
    (saved / io.CONFIG_FILE).write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(AdapterFileError, match="not a denselora-jax adapter"):
        load_adapter(saved)


def test_bad_values_in_the_config(saved):
    meta = json.loads((saved / io.CONFIG_FILE).read_text())
    for bad, message in [
        ({"rank": 0}, "rank must be a positive integer"),
        ({"targets": ["q_proj", "qkv"]}, "unknown projection"),
        ({"format_version": 99}, "format_version 99 is not supported"),
    ]:
        (saved / io.CONFIG_FILE).write_text(json.dumps({**meta, **bad}))
        with pytest.raises(AdapterFileError, match=message):
            load_adapter(saved)


def test_fingerprint_mismatch_refused_unless_forced_with_matching_shapes(saved):
    other = "0" * 64
    with pytest.raises(AdapterMismatchError, match=r"fingerprint ffffffffffffffff.*or force=True"):
        load_adapter(saved, model_config=MC, base_fingerprint=other)
    with pytest.raises(AdapterMismatchError, match="needs model_config"):
        load_adapter(saved, base_fingerprint=other, force=True)
    with pytest.raises(AdapterMismatchError, match="another model shape"):  # force never overrides shapes
        load_adapter(saved, model_config=MC.replace(intermediate_size=64), base_fingerprint=other, force=True)
    with pytest.warns(UserWarning, match="loading anyway"):
        adapter, _ = load_adapter(saved, model_config=MC, base_fingerprint=other, force=True)
    assert jax.tree.structure(adapter) == jax.tree.structure(load_adapter(saved)[0])
    load_adapter(saved, model_config=MC, base_fingerprint="f" * 64)  # the right base: no complaint
