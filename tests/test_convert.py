"""`python -m denselora_jax.convert` and save_hf: HF directories any HF tool reads, round trips exact."""

import json
import os

import gguf
import jax
import numpy as np
import pytest
import torch
from test_loading import assert_tree_equal, expected_tree, flat, save_tiny, tiny_model, write_gguf
from transformers import AutoTokenizer, LlamaForCausalLM

from denselora_jax.convert import main
from denselora_jax.model.loading import load_pretrained, load_tokenizer
from denselora_jax.model.weights import save_hf


def test_gguf_to_hf_round_trip(tmp_path):
    q = gguf.GGMLQuantizationType
    write_gguf(
        tmp_path / "m.gguf",
        tiny_model(),
        qtypes={"self_attn.q_proj.weight": q.Q8_0, "mlp.up_proj.weight": q.F16},
    )
    assert main([str(tmp_path / "m.gguf"), str(tmp_path / "hf"), "--no-tokenizer"]) == 0
    config, params = load_pretrained(tmp_path / "m.gguf")
    config2, params2 = load_pretrained(tmp_path / "hf")
    assert config2 == config
    assert_tree_equal(params2, flat(params))
    # transformers reads the converted directory as the same model
    assert_tree_equal(params, expected_tree(LlamaForCausalLM.from_pretrained(tmp_path / "hf")))


@pytest.mark.parametrize("tied", [False, True])
def test_hf_bf16_round_trip_keeps_dtype(tmp_path, tied):
    model = tiny_model(tie_word_embeddings=tied).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "src")
    assert main([str(tmp_path / "src"), str(tmp_path / "out"), "--no-tokenizer"]) == 0
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
    back = LlamaForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.bfloat16)
    for name, t in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], t), name


def test_converted_config_means_the_same_model_to_transformers(tmp_path):
    rs = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
    }
    save_tiny(tmp_path / "src", rope_scaling=rs, rope_theta=500000.0, rms_norm_eps=1e-6, attention_bias=True)
    assert main([str(tmp_path / "src"), str(tmp_path / "out"), "--no-tokenizer"]) == 0
    ids = torch.arange(1, 25)[None]
    with torch.no_grad():
        want = LlamaForCausalLM.from_pretrained(tmp_path / "src")(ids).logits
        got = LlamaForCausalLM.from_pretrained(tmp_path / "out")(ids).logits
    assert torch.equal(got, want)


def test_save_hf_shards_large_models(tmp_path):
    save_tiny(tmp_path / "src")
    config, params = load_pretrained(tmp_path / "src")
    save_hf(tmp_path / "out", config, params, max_shard_bytes=20_000)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all(os.path.isfile(tmp_path / "out" / s) for s in shards)
    assert index["metadata"]["total_size"] == sum(x.nbytes for x in jax.tree.leaves(params))
    assert_tree_equal(load_pretrained(tmp_path / "out")[1], flat(params))
    assert_tree_equal(params, expected_tree(LlamaForCausalLM.from_pretrained(tmp_path / "out")))


def test_cli_reports_bad_input(tmp_path, capsys):
    (tmp_path / "x.txt").write_text("not a model")
    assert main([str(tmp_path / "x.txt"), str(tmp_path / "out")]) == 2
    assert "x.txt: neither an HF model directory" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.slow
def test_smollm2_gguf_converts_with_tokenizer(tmp_path, smollm2_gguf):
    out = tmp_path / "smollm2"
    assert main([smollm2_gguf, str(out)]) == 0
    config, params = load_pretrained(smollm2_gguf)
    config2, params2 = load_pretrained(out)
    assert config2 == config
    assert_tree_equal(params2, flat(params))
    text = "The capital of France is Paris.\n<|im_start|>user\nhi<|im_end|>"
    ids = load_tokenizer(smollm2_gguf)(text)["input_ids"]
    assert AutoTokenizer.from_pretrained(out)(text)["input_ids"] == ids
    assert np.asarray(ids).size > 5
