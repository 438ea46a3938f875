"""generate(): token-identical to transformers' `generate` (greedy and beam search, MHA and GQA, left padding,
EOS), the KV-cache path against the full forward, the adapter in every decode step, the sampling warpers
against transformers' own, the CLI, and bad input."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from test_loading import tiny_model
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from denselora_jax.adapters.config import AdapterConfig
from denselora_jax.adapters.core import init_adapter
from denselora_jax.decoding import Sampling, _warp, generate, pad_left
from denselora_jax.generate import main
from denselora_jax.model.config import ModelConfig
from denselora_jax.model.llama import forward, forward_cached, init_cache, init_params, positions_from_mask
from denselora_jax.model.loading import load_pretrained, load_tokenizer
from denselora_jax.prompts import generate_prompt

PAD = 5  # a real token id, not 0: transformers' beam search fills with `pad or eos`
ARCHS = {"mha": dict(num_key_value_heads=4), "gqa": dict(num_key_value_heads=2)}


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """transformers on a shared CPU: torch's thread pool oversubscribes the cores (10x slower generate)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def char_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer (printable ASCII + newline; <pad>=0 <s>=1 </s>=2): offline and tiny."""
    chars = ["<pad>", "<s>", "</s>", "<unk>", "\n", *map(chr, range(32, 127))]
    tok = Tokenizer(models.WordLevel({c: i for i, c in enumerate(chars)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def save_tiny_with_tokenizer(path, seed=0, **overrides) -> LlamaForCausalLM:
    """A tiny random HF model without default EOS/BOS/pad ids (each test states them), plus the tokenizer."""
    model = tiny_model(seed, bos_token_id=None, eos_token_id=None, pad_token_id=None, **overrides)
    model.generation_config.bos_token_id = model.generation_config.eos_token_id = None
    model.save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return model


@pytest.fixture(scope="module", params=list(ARCHS))
def tiny(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(f"tiny_{request.param}")
    model = save_tiny_with_tokenizer(path, **ARCHS[request.param])
    config, params = load_pretrained(path)
    return model, config, params


def left_padded(vocab: int, lengths, seed=0):
    rng = np.random.default_rng(seed)
    return pad_left([rng.integers(6, vocab, n).tolist() for n in lengths], PAD)


def hf_generate(model, ids, mask, **kw) -> np.ndarray:
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.from_numpy(ids).long(),
            attention_mask=torch.from_numpy(mask).long(),
            do_sample=False,
            **kw,
        )
    return out.numpy()


SEARCHES = {
    "greedy": dict(num_beams=1),
    "beam4": dict(num_beams=4),
    "beam3_lp_early": dict(num_beams=3, length_penalty=0.6, early_stopping=True),
    "beam2_never": dict(num_beams=2, length_penalty=1.5, early_stopping="never"),
}


# greedy and 4 beams on both; the length-penalty / early-stopping variants on GQA only
CASES = [("mha", "greedy"), ("mha", "beam4")] + [("gqa", s) for s in SEARCHES]


@pytest.mark.parametrize(("tiny", "search"), CASES, indirect=["tiny"], ids=["-".join(c) for c in CASES])
def test_token_identical_to_transformers(tiny, search):
    model, config, params = tiny
    kw = SEARCHES[search]
    ids, mask = left_padded(config.vocab_size, [7, 3, 11])
    n, p = 10, ids.shape[1]
    free = hf_generate(model, ids, mask, max_new_tokens=n, pad_token_id=PAD, **kw)
    np.testing.assert_array_equal(
        generate(config, params, ids, mask, max_new_tokens=n, eos_token_id=(), **kw), free
    )
    # EOS := a token the free run emits at step 3: finishing, padding and finished hypotheses all happen
    eos = int(free[0, p + 2])
    ref = hf_generate(model, ids, mask, max_new_tokens=n, eos_token_id=eos, pad_token_id=PAD, **kw)
    ours = generate(config, params, ids, mask, max_new_tokens=n, eos_token_id=eos, pad_token_id=PAD, **kw)
    assert ref.shape != free.shape or (ref != free).any()  # the EOS changed the outcome
    np.testing.assert_array_equal(ours, ref)


SMALL = ModelConfig(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)
jforward = jax.jit(forward, static_argnums=(0,), static_argnames=("adapter_config",))


@pytest.fixture(scope="module")
def small():
    """SMALL's random weights, and a DenseLoRA adapter whose decoders are non-zero (so it acts)."""
    params = init_params(SMALL, jax.random.key(0))
    ac = AdapterConfig(rank=4, targets=("q_proj", "v_proj", "o_proj", "down_proj"))
    adapter = jax.tree.map(lambda x: x + 0.4, init_adapter(SMALL, ac, jax.random.key(1)))
    return params, ac, adapter


def test_kv_cache_decoding_matches_full_forward(small):
    """Prefill of a left-padded prompt then one token per step: the logits at every real position equal the
    full forward's, with the adapter in the loop."""
    params, ac, adapter = small
    ids, mask = pad_left([[3, 4, 9, 11, 20, 7, 8, 30, 31], [5, 6, 40, 41, 2]], 0)
    full = jforward(SMALL, params, ids, mask, adapter=adapter, adapter_config=ac)
    p0, T = 4, ids.shape[1]
    step = jax.jit(forward_cached, static_argnums=(0,), static_argnames=("adapter_config",))
    pos = positions_from_mask(jnp.asarray(mask))
    ad = dict(adapter=adapter, adapter_config=ac)
    logits, cache = step(SMALL, params, ids[:, :p0], pos[:, :p0], mask, init_cache(SMALL, 2, T), 0, **ad)
    chunks = [logits]
    for t in range(p0, T):
        logits, cache = step(SMALL, params, ids[:, t : t + 1], pos[:, t : t + 1], mask, cache, t, **ad)
        chunks.append(logits)
    cached = np.concatenate(chunks, axis=1)
    real = mask.astype(bool)
    np.testing.assert_allclose(cached[real], np.asarray(full)[real], atol=2e-5, rtol=1e-5)


def test_adapter_runs_in_every_decode_step(small):
    """Greedy decoding with an adapter = argmax of the full adapted forward over the whole sequence at each
    step (causal, so the not-yet-written tail of the buffer is harmless); and the adapter changes the
    continuation, so the check has teeth."""
    params, ac, adapter = small
    ids, mask = pad_left([[3, 4, 9, 11, 20], [5, 6, 40]], 0)
    (B, P), n = ids.shape, 6
    seq = np.concatenate([ids, np.zeros((B, n), np.int32)], 1)
    m = np.concatenate([mask, np.ones((B, n), np.int32)], 1)
    for t in range(n):
        logits = jforward(SMALL, params, seq, m, adapter=adapter, adapter_config=ac)
        seq[:, P + t] = np.argmax(logits[:, P + t - 1], axis=-1)
    kw = dict(max_new_tokens=n, eos_token_id=())
    ours = generate(SMALL, params, ids, mask, adapter=adapter, adapter_config=ac, **kw)
    np.testing.assert_array_equal(ours, seq)
    assert (generate(SMALL, params, ids, mask, **kw) != ours).any()


@pytest.mark.parametrize(
    "kw",
    [dict(temperature=0.7), dict(top_k=5), dict(top_p=0.8), dict(temperature=1.3, top_k=7, top_p=0.6)],
    ids=["temperature", "top_k", "top_p", "all"],
)
@pytest.mark.parametrize("min_keep", [1, 3])
def test_sampling_warpers_match_transformers(kw, min_keep):
    scores = np.random.default_rng(0).normal(size=(4, 50)).astype(np.float32) * 3
    procs = LogitsProcessorList()
    if "temperature" in kw:
        procs.append(TemperatureLogitsWarper(kw["temperature"]))
    if "top_k" in kw:
        procs.append(TopKLogitsWarper(kw["top_k"], min_tokens_to_keep=min_keep))
    if "top_p" in kw:
        procs.append(TopPLogitsWarper(kw["top_p"], min_tokens_to_keep=min_keep))
    ref = procs(None, torch.from_numpy(scores)).numpy()
    ours = np.asarray(_warp(Sampling(**kw).arrays(), jnp.asarray(scores), min_keep))
    np.testing.assert_array_equal(np.isinf(ours), np.isinf(ref))
    np.testing.assert_allclose(ours[~np.isinf(ref)], ref[~np.isinf(ref)], rtol=1e-6)


def test_sampling(small):
    params = small[0]
    ids, mask = pad_left([[3, 4, 9, 11, 20, 7], [5, 6, 40, 41]], 0)
    (_, p), kw = ids.shape, dict(max_new_tokens=5, eos_token_id=())
    greedy = generate(SMALL, params, ids, mask, **kw)
    np.testing.assert_array_equal(
        generate(SMALL, params, ids, mask, do_sample=True, top_k=1, rng=jax.random.key(3), **kw), greedy
    )
    # With top_k=3 every first token is one of the three most likely; seeds are reproducible and matter.
    draws = [
        generate(
            SMALL, params, ids, mask, do_sample=True, top_k=3, temperature=5.0, rng=jax.random.key(s), **kw
        )
        for s in (0, 0, 1, 2)
    ]
    top3 = np.argsort(-np.asarray(jforward(SMALL, params, ids, mask)[:, -1]), axis=-1)[:, :3]
    assert all(d[r, p] in top3[r] for d in draws for r in range(2))
    np.testing.assert_array_equal(draws[0], draws[1])
    assert any((d != draws[0]).any() for d in draws[2:])
    beams = generate(SMALL, params, ids, mask, num_beams=2, do_sample=True, rng=jax.random.key(0), **kw)
    assert beams.shape == (2, p + 5) and (beams[:, :p] == ids).all() and (beams[:, p:] >= 0).all()


# --- SmolLM2-135M-Instruct (real GGUF) --------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_both(smollm2_gguf):
    hf = LlamaForCausalLM.from_pretrained(
        os.path.dirname(smollm2_gguf), gguf_file=os.path.basename(smollm2_gguf), dtype=torch.float32
    ).eval()
    config, params = load_pretrained(smollm2_gguf)
    return hf, config, params, load_tokenizer(smollm2_gguf)


@pytest.mark.slow
@pytest.mark.parametrize("num_beams", [1, 4])
def test_smollm2_matches_transformers(smollm2_both, num_beams):
    hf, config, params, tok = smollm2_both
    prompts = [
        generate_prompt("Is the sky blue on a clear day?\n\nAnswer format: true/false"),
        "The capital of France is",
        "def fibonacci(n):",
    ]
    ids, mask = pad_left([tok(t)["input_ids"] for t in prompts], tok.pad_token_id)
    kw = dict(
        max_new_tokens=12, num_beams=num_beams, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    ref = hf_generate(hf, ids, mask, **kw)
    np.testing.assert_array_equal(generate(config, params, ids, mask, **kw), ref)


# --- CLI and bad input ------------------------------------------------------------------------------------


def test_cli_prints_the_completions(tmp_path, capsys):
    model = save_tiny_with_tokenizer(tmp_path)
    tok = char_tokenizer()
    prompt = "Say hi."
    ids = tok(generate_prompt(prompt))["input_ids"]
    ref = hf_generate(
        model,
        np.asarray([ids]),
        np.ones((1, len(ids)), np.int64),
        max_new_tokens=6,
        num_beams=2,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text(f"{prompt}\n\n")
    assert (
        main(
            [
                "--model",
                str(tmp_path),
                "--prompts-file",
                str(prompts_file),
                "--template",
                "--max-new-tokens",
                "6",
                "--num-beams",
                "2",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert generate_prompt(prompt) in out
    assert f"### completion\n{tok.decode(ref[0, len(ids) :], skip_special_tokens=True)}\n" in out


def test_bad_input(small):
    config, params = SMALL, small[0]
    ids, mask = np.ones((2, 4), np.int32), np.ones((2, 4), np.int32)
    right = mask.copy()
    right[0, -1] = 0
    hole = mask.copy()
    hole[0, 1] = 0
    cases = [
        (dict(attention_mask=right), "pad prompts on the LEFT"),
        (dict(attention_mask=hole), "hole"),
        (dict(attention_mask=mask[:, :3]), "must both be"),
        (dict(do_sample=True), "rng=jax.random.key"),
        (dict(adapter={}), "without its adapter_config"),
        (dict(num_beams=0), "num_beams must be >= 1"),
        (dict(max_new_tokens=0), "max_new_tokens must be >= 1"),
        (dict(top_p=0.0), "top_p must be in"),
        (dict(top_k=-1), "top_k must be"),
        (dict(temperature=0.0), "temperature must be > 0"),
        (dict(early_stopping="sometimes"), "early_stopping"),
    ]
    for kw, msg in cases:
        kw = {"attention_mask": mask, "max_new_tokens": 2, **kw}
        with pytest.raises(ValueError, match=msg):
            generate(config, params, ids, **kw)
    with pytest.raises(SystemExit, match="--prompt"):
        main(["--model", "unused"])
