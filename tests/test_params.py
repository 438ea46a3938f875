"""Parameter report: the paper's exact counts (computed abstractly), peft's counts on a tiny model, the CLI."""

import subprocess
import sys

import gguf
import peft
import pytest
from transformers import LlamaConfig, LlamaForCausalLM

from denselora_jax import PAPER_TARGETS, PROJECTIONS, AdapterConfig, ModelConfig
from denselora_jax.params import format_percent, param_report, read_model_config

BASE = {"llama3-8b": 8_030_261_248, "llama2-7b": 6_738_415_616}


@pytest.mark.parametrize(
    "preset, method, rank, trainable, percent",
    [
        ("llama3-8b", "denselora", 16, 925_696, "0.0115%"),
        ("llama3-8b", "denselora", 32, 1_933_312, "0.0241%"),
        ("llama3-8b", "denselora", 64, 4_194_304, "0.0522%"),
        ("llama2-7b", "denselora", 16, 917_504, "0.0136%"),
        ("llama3-8b", "lora", 32, 56_623_104, "0.705%"),
    ],
)
def test_paper_counts(preset, method, rank, trainable, percent):
    report = param_report(ModelConfig.from_preset(preset), AdapterConfig(method=method, rank=rank))
    assert report["trainable"] == trainable
    assert report["base"] == BASE[preset]
    assert format_percent(report["percent"]) == percent
    assert report["trainable"] == report["shared"] + report["per_layer"]


def test_denselora_formula_and_sharing():
    mc, r = ModelConfig.from_preset("llama3-8b"), 16
    d = mc.projection_dims()
    T, L = len(PAPER_TARGETS), mc.num_hidden_layers
    io_sum = sum(d[t][0] + d[t][1] for t in PAPER_TARGETS)
    shared = param_report(mc, AdapterConfig(rank=r))
    assert (shared["shared"], shared["per_layer"]) == (io_sum * r, L * T * r * r)
    unshared = param_report(mc, AdapterConfig(rank=r, share_across_layers=False))
    assert unshared["trainable"] == L * io_sum * r + L * T * r * r
    assert unshared["shared"] == 0


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    cfg = LlamaConfig(
        vocab_size=100,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    path = tmp_path_factory.mktemp("tiny_config")
    cfg.save_pretrained(path)  # config.json only: the report needs no weights
    return path, cfg


@pytest.mark.parametrize(
    "method, targets", [("lora", PAPER_TARGETS), ("dora", PROJECTIONS), ("lora", ("o_proj",))]
)
def test_lora_and_dora_counts_equal_peft(tiny_dir, method, targets):
    path, cfg = tiny_dir
    report = param_report(read_model_config(str(path)), AdapterConfig(method=method, rank=4, targets=targets))
    torch_model = LlamaForCausalLM(cfg)
    base = sum(p.numel() for p in torch_model.parameters())
    model = peft.get_peft_model(
        torch_model, peft.LoraConfig(r=4, target_modules=list(targets), use_dora=method == "dora")
    )
    trainable, total = model.get_nb_trainable_parameters()
    assert (report["trainable"], report["base"]) == (trainable, base)
    assert total == base + trainable


def test_gguf_model_config(smollm2_gguf):
    """A .gguf path: the base count equals the number of weights the file holds."""
    in_file = sum(int(t.n_elements) for t in gguf.GGUFReader(smollm2_gguf).tensors)
    report = param_report(read_model_config(smollm2_gguf), AdapterConfig(rank=16))
    assert report["base"] == in_file
    assert report == param_report(ModelConfig.from_preset("smollm2-135m"), AdapterConfig(rank=16))


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "denselora_jax.params", *args], capture_output=True, text=True, timeout=120
    )


def table(stdout: str) -> dict[str, str]:
    return {line.split()[0]: line.split()[-1] for line in stdout.splitlines() if line.strip()}


def test_cli(tiny_dir):
    out = run_cli("--preset", "llama3-8b", "--method", "denselora", "--rank", "16")
    assert out.returncode == 0, out.stderr
    rows = table(out.stdout)
    assert (rows["trainable"], rows["base"], rows["percent"]) == ("925,696", "8,030,261,248", "0.0115%")
    assert rows["q_proj"] == f"{(4096 + 4096) * 16 + 32 * 16 * 16:,}"  # per-target rows
    assert "o_proj" not in rows

    out = run_cli(
        "--model",
        str(tiny_dir[0]),
        "--method",
        "denselora",
        "--rank",
        "4",
        "--targets",
        "o_proj,gate_proj",
        "--no-share",
        "--alpha",
        "8",
    )
    assert out.returncode == 0, out.stderr
    rows = table(out.stdout)
    assert set(rows) >= {"o_proj", "gate_proj"} and "q_proj" not in rows
    assert rows["trainable"] == f"{3 * ((64 + 64) * 4 + (64 + 96) * 4) + 3 * 2 * 16:,}"
    assert "per-layer encoder/decoder" in out.stdout and "alpha=8" in out.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--preset", "llama3-8b", "--rank", "0"], "rank must be a positive integer, got 0"),
        (["--preset", "llama3-8b", "--targets", "q_proj,qkv_proj"], "unknown projection(s) ['qkv_proj']"),
        (["--preset", "llama5"], "invalid choice: 'llama5'"),
        (["--model", "/nonexistent/model"], "/nonexistent/model: no such file or directory"),
        (["--preset", "llama3-8b", "--model", "x"], "not allowed with argument"),
    ],
)
def test_cli_bad_input(args, message):
    out = run_cli(*args)
    assert out.returncode == 2
    assert message in out.stderr and "Traceback" not in out.stderr
