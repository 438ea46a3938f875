"""Logits parity with transformers' PyTorch LlamaForCausalLM: tiny HF checkpoints, a tiny GGUF, SmolLM2-135M."""

import os

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from test_loading import save_tiny, tiny_model, write_gguf
from transformers import LlamaForCausalLM

from denselora_jax.model.llama import forward
from denselora_jax.model.loading import load_pretrained, load_tokenizer

LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,  # small, so the smoothed band covers some of the frequencies
}
CONFIGS = {
    "mha": dict(num_key_value_heads=4),
    "gqa": dict(),
    "gqa_tied": dict(tie_word_embeddings=True),
    "llama3_rope": dict(rope_scaling=LLAMA3, rope_theta=500000.0),
    "linear_rope": dict(rope_scaling={"rope_type": "linear", "factor": 4.0}),
    "bias_head_dim": dict(attention_bias=True, mlp_bias=True, head_dim=32),
}


def batch(vocab: int, pad: int, t: int = 12, seed: int = 0):
    """Two rows; the second is left-padded by `pad` tokens (token 0 under the mask)."""
    ids = np.random.default_rng(seed).integers(1, vocab, size=(2, t))
    mask = np.ones((2, t), np.int64)
    mask[1, :pad] = 0
    ids[1, :pad] = 0
    return ids, mask


def hf_logits(model: LlamaForCausalLM, ids, mask) -> np.ndarray:
    pos = np.clip(np.cumsum(mask, -1) - 1, 0, None)
    with torch.no_grad():
        out = model(
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            position_ids=torch.from_numpy(pos),
        )
    return out.logits.float().numpy()


def assert_parity(ours, theirs, mask, atol):
    real = mask.astype(bool)
    diff = np.abs(np.asarray(ours)[real] - theirs[real]).max()
    assert diff <= atol, f"max |logits diff| over real tokens = {diff:.3g} > {atol}"


@pytest.mark.parametrize("pad", [0, 5], ids=["no_pad", "left_pad"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_hf_checkpoint_parity(tmp_path, name, pad):
    save_tiny(tmp_path, **CONFIGS[name])
    hf = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    config, params = load_pretrained(tmp_path)
    ids, mask = batch(config.vocab_size, pad)
    ours = forward(config, params, jnp.asarray(ids), jnp.asarray(mask))
    theirs = hf_logits(hf, ids, mask)
    assert_parity(ours, theirs, mask, 1e-4)
    if config.rope_scaling is not None:  # the scaling is really exercised: without it the logits differ
        plain = forward(config.replace(rope_scaling=None), params, jnp.asarray(ids), jnp.asarray(mask))
        assert np.abs(np.asarray(plain) - theirs)[mask.astype(bool)].max() > 1e-3


def test_right_padding_parity(tmp_path):
    save_tiny(tmp_path)
    hf = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    config, params = load_pretrained(tmp_path)
    ids, mask = batch(config.vocab_size, 0)
    mask[1, -4:] = 0
    ours = forward(config, params, jnp.asarray(ids), jnp.asarray(mask))
    assert_parity(ours, hf_logits(hf, ids, mask), mask, 1e-4)


@pytest.mark.parametrize("pad", [0, 5], ids=["no_pad", "left_pad"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_gguf_parity(tmp_path, tied, pad):
    q = gguf.GGMLQuantizationType
    qtypes = {
        "self_attn.q_proj.weight": q.Q8_0,
        "self_attn.k_proj.weight": q.F16,
        "mlp.down_proj.weight": q.Q4_0,
    }
    write_gguf(tmp_path / "m.gguf", tiny_model(tie_word_embeddings=tied), qtypes=qtypes)
    hf = LlamaForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()
    config, params = load_pretrained(tmp_path / "m.gguf")
    ids, mask = batch(config.vocab_size, pad)
    assert_parity(
        forward(config, params, jnp.asarray(ids), jnp.asarray(mask)), hf_logits(hf, ids, mask), mask, 1e-4
    )


def test_gguf_llama3_rope_parity(tmp_path):
    """llama.cpp keeps llama3 scaling only as rope_freqs factors; the HF checkpoint of the same weights is the
    oracle (transformers' GGUF loader ignores rope_freqs)."""
    model = save_tiny(tmp_path, **CONFIGS["llama3_rope"])
    c = model.config
    theta, hd, old = c.rope_parameters["rope_theta"], c.head_dim, LLAMA3["original_max_position_embeddings"]
    wavelen = 2 * np.pi * theta ** (np.arange(0, hd, 2) / hd)
    smooth = (old / wavelen - 1.0) / (4.0 - 1.0)
    factors = np.where(
        wavelen < old / 4.0, 1.0, np.where(wavelen > old, 8.0, 1 / ((1 - smooth) / 8.0 + smooth))
    )
    write_gguf(tmp_path / "m.gguf", model, rope_freqs=factors)
    config, params = load_pretrained(tmp_path / "m.gguf")
    ids, mask = batch(config.vocab_size, 5)
    ours = forward(config, params, jnp.asarray(ids), jnp.asarray(mask))
    assert_parity(ours, hf_logits(model, ids, mask), mask, 1e-4)


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    hf = LlamaForCausalLM.from_pretrained(
        os.path.dirname(smollm2_gguf), gguf_file=os.path.basename(smollm2_gguf), dtype=torch.float32
    ).eval()
    config, params = load_pretrained(smollm2_gguf)
    return hf, config, params, load_tokenizer(smollm2_gguf)


@pytest.mark.slow
def test_smollm2_real_prompt(smollm2):
    hf, config, params, tok = smollm2
    prompts = ["The capital of France is", "def fibonacci(n):\n    "]
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="np", padding=True)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    assert mask.min() == 0  # the shorter prompt is really left-padded
    ours = np.asarray(forward(config, params, jnp.asarray(ids), jnp.asarray(mask)))
    theirs = hf_logits(hf, ids, mask)
    assert_parity(ours, theirs, mask, 1e-3)
    real = mask.astype(bool)
    np.testing.assert_array_equal(ours.argmax(-1)[real], theirs.argmax(-1)[real])
    # greedy continuation of the first prompt, token by token (one right-padded shape: one compilation)
    new = 6
    prompt = tok(prompts[0], return_tensors="np")["input_ids"]
    with torch.no_grad():
        want = hf.generate(torch.from_numpy(prompt), max_new_tokens=new, do_sample=False)[
            0, prompt.shape[1] :
        ]
    n = prompt.shape[1]
    seq = np.zeros((1, n + new), np.int32)
    seq[0, :n] = prompt[0]
    step = jax.jit(forward, static_argnums=0)
    for k in range(n, n + new):
        logits = step(config, params, jnp.asarray(seq), jnp.asarray(np.arange(n + new)[None] < k))
        seq[0, k] = int(np.asarray(logits)[0, k - 1].argmax())
    np.testing.assert_array_equal(seq[0, n:], want.numpy())
    assert "Paris" in tok.decode(seq[0, n:])
