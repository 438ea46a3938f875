"""Weight loading: HF safetensors directories and llama GGUF files -> our parameter tree, against transformers."""

import json
import os

import gguf
import jax
import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from denselora_jax.model.gguf import llama3_factors
from denselora_jax.model.llama import abstract_params
from denselora_jax.model.loading import fingerprint, load_pretrained
from denselora_jax.model.weights import CheckpointError, CheckpointNotFoundError

TINY = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
)


def tiny_model(seed=0, **overrides) -> LlamaForCausalLM:
    """A tiny random LLaMA whose every weight (norms and biases too) is random, so misplacements show."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**TINY, **overrides})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.05 * torch.randn_like(p))
    return model


def save_tiny(path, seed=0, max_shard_size=None, **overrides):
    model = tiny_model(seed, **overrides)
    model.save_pretrained(path, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    return model


def expected_tree(model: LlamaForCausalLM) -> dict[tuple[str, ...], np.ndarray]:
    """The brief's layout, written out independently of the library's table."""
    c = model.config
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    d, hd, h, kv = c.hidden_size, c.head_dim, c.num_attention_heads, c.num_key_value_heads
    out = {
        ("embed_tokens", "embedding"): sd["model.embed_tokens.weight"],
        ("norm", "weight"): sd["model.norm.weight"],
    }
    if not c.tie_word_embeddings:
        out[("lm_head", "kernel")] = sd["lm_head.weight"].T

    def stack(fn, name):
        return np.stack([fn(sd[f"model.layers.{i}.{name}"]) for i in range(c.num_hidden_layers)])

    for norm in ("input_layernorm", "post_attention_layernorm"):
        out[("layers", norm, "weight")] = stack(lambda w: w, f"{norm}.weight")
    for proj, n in (("q_proj", h), ("k_proj", kv), ("v_proj", kv)):
        out[("layers", "self_attn", proj, "kernel")] = stack(
            lambda w, n=n: w.T.reshape(d, n, hd), f"self_attn.{proj}.weight"
        )
        if c.attention_bias:
            out[("layers", "self_attn", proj, "bias")] = stack(
                lambda b, n=n: b.reshape(n, hd), f"self_attn.{proj}.bias"
            )
    out[("layers", "self_attn", "o_proj", "kernel")] = stack(
        lambda w: w.T.reshape(h, hd, d), "self_attn.o_proj.weight"
    )
    if c.attention_bias:
        out[("layers", "self_attn", "o_proj", "bias")] = stack(lambda b: b, "self_attn.o_proj.bias")
    for proj in ("gate_proj", "up_proj", "down_proj"):
        out[("layers", "mlp", proj, "kernel")] = stack(lambda w: w.T, f"mlp.{proj}.weight")
        if c.mlp_bias:
            out[("layers", "mlp", proj, "bias")] = stack(lambda b: b, f"mlp.{proj}.bias")
    return out


def flat(params) -> dict[tuple[str, ...], np.ndarray]:
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    return {tuple(k.key for k in path): np.asarray(v) for path, v in leaves}


def assert_tree_equal(params, expected, *, atol=0.0):
    got = flat(params)
    assert set(got) == set(expected)
    for path, want in expected.items():
        assert got[path].shape == want.shape, path
        if atol == 0 and np.array_equal(got[path], want):
            continue  # fast path for the big real model; the call below reports any difference
        np.testing.assert_allclose(got[path].astype(np.float32), want, rtol=0, atol=atol, err_msg=str(path))


# --- HF directories --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        dict(num_key_value_heads=4),  # MHA
        dict(),  # GQA, untied
        dict(tie_word_embeddings=True),
        dict(attention_bias=True, mlp_bias=True),
        dict(head_dim=32),  # head_dim != hidden/heads
    ],
    ids=["mha", "gqa", "tied", "bias", "head_dim"],
)
def test_hf_dir_matches_state_dict(tmp_path, overrides):
    model = save_tiny(tmp_path, **overrides)
    config, params = load_pretrained(tmp_path)
    assert config.num_key_value_heads == model.config.num_key_value_heads
    assert config.tie_word_embeddings == model.config.tie_word_embeddings
    assert config.param_dtype == "float32"
    assert_tree_equal(params, expected_tree(model))


@pytest.mark.parametrize(
    "overrides", [dict(), dict(tie_word_embeddings=True, attention_bias=True, mlp_bias=True)]
)
def test_tree_matches_the_models_abstract_params(tmp_path, overrides):
    save_tiny(tmp_path, **overrides)
    config, params = load_pretrained(tmp_path)
    want = jax.tree.map(lambda a: (a.shape, a.dtype), abstract_params(config))
    assert jax.tree.map(lambda a: (a.shape, a.dtype), params) == want


def test_sharded_checkpoint_loads(tmp_path):
    model = save_tiny(tmp_path, max_shard_size="40KB")
    assert os.path.isfile(tmp_path / "model.safetensors.index.json")
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 2
    _, params = load_pretrained(tmp_path)
    assert_tree_equal(params, expected_tree(model))


def test_dtype_default_and_override(tmp_path):
    model = tiny_model().to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    config, params = load_pretrained(tmp_path)
    assert (
        config.param_dtype == "bfloat16" and params["embed_tokens"]["embedding"].dtype == jax.numpy.bfloat16
    )
    assert_tree_equal(params, expected_tree(model))  # bf16 values are exact in float32
    config32, params32 = load_pretrained(tmp_path, dtype="float32", compute_dtype="bfloat16")
    assert (config32.param_dtype, config32.dtype) == ("float32", "bfloat16")
    assert params32["layers"]["mlp"]["up_proj"]["kernel"].dtype == np.float32
    assert fingerprint(config, params) == fingerprint(config32, params32)


def test_shardings_tree_is_applied(tmp_path):
    save_tiny(tmp_path)
    mesh = jax.make_mesh((len(jax.devices()),), ("x",))
    spec = jax.sharding.PartitionSpec
    replicated = jax.sharding.NamedSharding(mesh, spec())
    _, ref = load_pretrained(tmp_path)
    shardings = jax.tree.map(lambda _: replicated, ref)
    shardings["layers"]["self_attn"]["q_proj"]["kernel"] = jax.sharding.NamedSharding(mesh, spec(None, "x"))
    _, params = load_pretrained(tmp_path, shardings=shardings)
    q = params["layers"]["self_attn"]["q_proj"]["kernel"]
    assert q.sharding == shardings["layers"]["self_attn"]["q_proj"]["kernel"]
    assert len({s.device for s in q.addressable_shards}) == len(jax.devices())
    assert_tree_equal(params, flat(ref))


def test_fingerprint_tells_weights_apart(tmp_path):
    save_tiny(tmp_path / "a", seed=0)
    save_tiny(tmp_path / "b", seed=1)
    ca, pa = load_pretrained(tmp_path / "a")
    cb, pb = load_pretrained(tmp_path / "b")
    assert ca == cb
    assert fingerprint(ca, pa) != fingerprint(cb, pb)
    assert fingerprint(ca, pa) == fingerprint(*load_pretrained(tmp_path / "a"))


# --- GGUF ----------------------------------------------------------------------------------------------

GGUF_NAMES = {  # llama.cpp's names, written out here as the oracle
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def llama_cpp_permute(w: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """convert_hf_to_gguf.py LlamaModel.permute, verbatim."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(
    path, model: LlamaForCausalLM, *, qtypes=None, arch="llama", rope_freqs=None
) -> dict[str, np.ndarray]:
    """Write `model` as llama.cpp does; return the HF tensors as the file stores them (after rounding)."""
    qtypes = qtypes or {}
    c = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_rope_dimension_count(c.head_dim)
    w.add_vocab_size(c.vocab_size)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    stored = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        x = t.detach().float().numpy()
        short = name.split(".", 3)[-1] if name.startswith("model.layers.") else name
        gname = f"blk.{name.split('.')[2]}.{GGUF_NAMES[short]}" if short != name else GGUF_NAMES[name]
        data, permuted = x, name.endswith(("q_proj.weight", "k_proj.weight"))
        if name.endswith("q_proj.weight"):
            data = llama_cpp_permute(x, c.num_attention_heads, c.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            data = llama_cpp_permute(x, c.num_attention_heads, c.num_key_value_heads)
        qtype = qtypes.get(short, gguf.GGMLQuantizationType.F32)  # norms stay F32, as llama.cpp writes them
        q = gguf.quants.quantize(data, qtype)
        float_type = qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)
        w.add_tensor(gname, q, raw_dtype=None if float_type else qtype)
        stored[name] = gguf.quants.dequantize(q, qtype).reshape(x.shape)
        if permuted:  # HF names mean the unpermuted rows
            stored[name] = _unpermute_ref(stored[name], c, name)
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return stored


def _unpermute_ref(w, c, name):
    """Row i of the permuted matrix came from row perm[i]: undo by indexing, independent of reshapes."""
    n = c.num_attention_heads if "q_proj" in name else c.num_key_value_heads
    perm = llama_cpp_permute(np.arange(w.shape[0]), n, None)
    out = np.empty_like(w)
    out[perm] = w
    return out


def model_with(model, stored) -> LlamaForCausalLM:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in stored:
                p.copy_(torch.from_numpy(stored[name]))
    return model


@pytest.mark.parametrize("tied", [False, True])
def test_gguf_f32_f16_q8_matches(tmp_path, tied):
    model = tiny_model(tie_word_embeddings=tied)
    q = gguf.GGMLQuantizationType
    qtypes = {
        "self_attn.q_proj.weight": q.F16,
        "self_attn.k_proj.weight": q.Q8_0,
        "mlp.up_proj.weight": q.F16,
    }
    stored = write_gguf(tmp_path / "m.gguf", model, qtypes=qtypes)
    config, params = load_pretrained(tmp_path / "m.gguf")
    assert config.param_dtype == "float32" and config.tie_word_embeddings == tied
    for field in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
    ):
        assert getattr(config, field) == getattr(model.config, field)
    assert (config.num_key_value_heads, config.head_dim) == (
        model.config.num_key_value_heads,
        model.config.head_dim,
    )
    assert config.rms_norm_eps == pytest.approx(model.config.rms_norm_eps)
    # F16 / Q8_0 round the weights: the oracle is the original tree with the stored (rounded) values.
    assert not np.array_equal(
        stored["model.layers.0.self_attn.k_proj.weight"],
        model.state_dict()["model.layers.0.self_attn.k_proj.weight"].numpy(),
    )
    assert_tree_equal(params, expected_tree(model_with(model, stored)))


def test_gguf_matches_transformers_gguf_loader(tmp_path):
    model = tiny_model()
    write_gguf(tmp_path / "m.gguf", model, qtypes={"self_attn.q_proj.weight": gguf.GGMLQuantizationType.Q8_0})
    hf = LlamaForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf")
    _, params = load_pretrained(tmp_path / "m.gguf")
    assert_tree_equal(params, expected_tree(hf))


def test_gguf_llama3_rope_freqs_give_the_config(tmp_path):
    rs = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    model = tiny_model(rope_scaling=rs, head_dim=32, rope_theta=10000.0)
    # the factors as llama.cpp's converter computes them (its loop, vectorised)
    theta, hd = 10000.0, 32
    freqs = 1.0 / theta ** (np.arange(0, hd, 2) / hd)
    wavelen = 2 * np.pi / freqs
    smooth = (64 / wavelen - 1.0) / (4.0 - 1.0)
    factors = np.where(
        wavelen < 64 / 4.0, 1.0, np.where(wavelen > 64 / 1.0, 8.0, 1 / ((1 - smooth) / 8.0 + smooth))
    )
    assert ((factors > 1) & (factors < 8)).sum() >= 2  # the test needs a smoothed band
    write_gguf(tmp_path / "m.gguf", model, rope_freqs=factors)
    config, _ = load_pretrained(tmp_path / "m.gguf")
    r = config.rope_scaling
    assert str(r.rope_type) == "llama3" and r.factor == 8.0
    np.testing.assert_allclose(
        llama3_factors(
            theta, hd, r.factor, r.low_freq_factor, r.high_freq_factor, r.original_max_position_embeddings
        ),
        factors,
        rtol=1e-6,
    )


@pytest.fixture(scope="module")
def smollm2_hf(smollm2_gguf):
    return LlamaForCausalLM.from_pretrained(
        os.path.dirname(smollm2_gguf), gguf_file=os.path.basename(smollm2_gguf)
    )


@pytest.mark.slow
def test_smollm2_gguf_loads_like_transformers(smollm2_gguf, smollm2_hf):
    meta = gguf.GGUFReader(smollm2_gguf).fields
    config, params = load_pretrained(smollm2_gguf)
    d, f = meta["llama.embedding_length"].contents(), meta["llama.feed_forward_length"].contents()
    layers, h = meta["llama.block_count"].contents(), meta["llama.attention.head_count"].contents()
    kv, v = meta["llama.attention.head_count_kv"].contents(), len(meta["tokenizer.ggml.tokens"].contents())
    hd = d // h
    shapes = {k: v.shape for k, v in flat(params).items()}
    assert shapes[("embed_tokens", "embedding")] == (v, d)
    assert shapes[("layers", "self_attn", "q_proj", "kernel")] == (layers, d, h, hd)
    assert shapes[("layers", "self_attn", "k_proj", "kernel")] == (layers, d, kv, hd)
    assert shapes[("layers", "self_attn", "o_proj", "kernel")] == (layers, h, hd, d)
    assert shapes[("layers", "mlp", "down_proj", "kernel")] == (layers, f, d)
    assert ("lm_head", "kernel") not in shapes and config.tie_word_embeddings  # no `output` tensor
    # every tensor (q/k included: the permutation undo) equals transformers' own GGUF dequantization
    assert_tree_equal(params, expected_tree(smollm2_hf))


# --- bad input -----------------------------------------------------------------------------------------


def test_neither_kind_of_path(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError, match=r"notes\.txt: neither an HF model directory"):
        load_pretrained(tmp_path / "notes.txt")
    with pytest.raises(CheckpointNotFoundError, match=r"config\.json: not found"):
        load_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"nothing-here: no such file"):
        load_pretrained(tmp_path / "nothing-here")


def test_unsupported_architecture(tmp_path):
    save_tiny(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(
        json.dumps({**cfg, "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
    )
    with pytest.raises(
        CheckpointError, match=r"config\.json: unsupported architecture \['GPT2LMHeadModel'\]"
    ):
        load_pretrained(tmp_path)
    write_gguf(tmp_path / "g.gguf", tiny_model(), arch="gpt2")
    with pytest.raises(CheckpointError, match=r"g\.gguf: unsupported GGUF architecture 'gpt2'"):
        load_pretrained(tmp_path / "g.gguf")


def test_missing_shard(tmp_path):
    save_tiny(tmp_path, max_shard_size="40KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(
        CheckpointNotFoundError, match=rf"{shard.name}: shard listed in .*index\.json is missing"
    ):
        load_pretrained(tmp_path)


def test_wrong_shape(tmp_path):
    save_tiny(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 80}))
    with pytest.raises(
        CheckpointError,
        match=r"model\.safetensors: tensor model\.layers\.0\.mlp\.gate_proj\.weight has shape \(96, 64\), but the model config implies \(80, 64\)",
    ):
        load_pretrained(tmp_path)


def test_missing_tensor(tmp_path):
    save_tiny(tmp_path, tie_word_embeddings=True)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": False}))
    with pytest.raises(CheckpointError, match=r"tensor lm_head\.weight is missing"):
        load_pretrained(tmp_path)


def _truncate(path, keep):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize("keep", [0.5, 0.0001])
def test_truncated_safetensors(tmp_path, keep):
    save_tiny(tmp_path)
    _truncate(tmp_path / "model.safetensors", keep)
    with pytest.raises(
        CheckpointError, match=r"model\.safetensors: cannot read safetensors .*truncated or corrupt"
    ):
        load_pretrained(tmp_path)


@pytest.mark.parametrize("keep", [0.9, 0.3, 0.001])
def test_truncated_gguf(tmp_path, keep):
    write_gguf(tmp_path / "m.gguf", tiny_model())
    _truncate(tmp_path / "m.gguf", keep)
    with pytest.raises(CheckpointError, match=r"m\.gguf: .*truncated"):
        load_pretrained(tmp_path / "m.gguf")
