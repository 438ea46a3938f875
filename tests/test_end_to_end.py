"""Train then evaluate: a short DenseLoRA run on the bundled demo data beats the base model on its test split
(the paper's protocol: the shared prompt template, beam search, first-match answer extraction)."""

from conftest import write_tiny_llama

from denselora_jax import config as cfglib
from denselora_jax import load_adapter, load_pretrained, load_tokenizer
from denselora_jax.data import demo_data_dir
from denselora_jax.evaluate import evaluate
from denselora_jax.train import Run

DATASETS = ["boolq", "piqa", "winogrande"]


def test_short_training_beats_the_base_model(tmp_path):
    # A random model whose logits can become confident (HF's default init keeps them near zero).
    tiny_llama_dir = write_tiny_llama(tmp_path / "model", initializer_range=0.1)
    out = tmp_path / "run"
    overrides = {
        "model.path": tiny_llama_dir, "model.dtype": "float32", "model.param_dtype": "float32",
        "data.train_files": "[pkg:demo]", "data.val_size": 16, "data.cutoff_len": 256, "data.train_on_inputs": False,
        "train.batch_size": 8, "train.micro_batch_size": 1, "train.max_steps": 200, "train.eval_every": 100,
        "optimizer.learning_rate": 1e-2, "optimizer.warmup_steps": 5, "checkpoint.every": 200,
        "logging.progress_bar": False, "logging.tensorboard": False, "output_dir": str(out),
        "mesh.shape": "[8,1,1]",
    }  # fmt: skip
    cfg = cfglib.load_config(cfglib.DEFAULT_CONFIG, [f"{k}={v}" for k, v in overrides.items()])
    result = Run(cfg, resume=True).train()
    assert result["val_loss_after"] < result["val_loss_before"]

    config, params = load_pretrained(tiny_llama_dir)
    tok = load_tokenizer(tiny_llama_dir)
    adapter, ac = load_adapter(out / "adapter", model_config=config)
    kw = dict(datasets=DATASETS, limit=16, batch_size=16, num_beams=2, max_new_tokens=12, progress=False)
    base = evaluate(config, params, tok, demo_data_dir() / "test", **kw)
    tuned = evaluate(config, params, tok, demo_data_dir() / "test", adapter=adapter, adapter_config=ac,
                     output_dir=tmp_path / "eval", **kw)  # fmt: skip
    assert tuned["mean_accuracy"] > base["mean_accuracy"], (base, tuned)
    assert (tmp_path / "eval" / "results.md").is_file()
