"""denselora-jax: DenseLoRA (and LoRA/DoRA) fine-tuning of LLaMA-family models in JAX/Flax.

The public API: load a model, build or load an adapter, run the model with it, count parameters.
"""

from denselora_jax.adapters.config import PAPER_TARGETS, PROJECTIONS, Activation, AdapterConfig, Method
from denselora_jax.adapters.core import abstract_adapter, adapter_axes, count_adapter_params, init_adapter
from denselora_jax.adapters.io import load_adapter, save_adapter
from denselora_jax.decoding import generate
from denselora_jax.merge import merge_lora
from denselora_jax.model.config import ModelConfig, Remat
from denselora_jax.model.llama import abstract_params, count_params, forward, init_params, param_axes
from denselora_jax.model.loading import fingerprint, load_pretrained, load_tokenizer
from denselora_jax.params import param_report

__all__ = [
    "PAPER_TARGETS",
    "PROJECTIONS",
    "Activation",
    "AdapterConfig",
    "Method",
    "ModelConfig",
    "Remat",
    "abstract_adapter",
    "abstract_params",
    "adapter_axes",
    "count_adapter_params",
    "count_params",
    "fingerprint",
    "forward",
    "generate",
    "init_adapter",
    "init_params",
    "load_adapter",
    "load_pretrained",
    "load_tokenizer",
    "merge_lora",
    "param_axes",
    "param_report",
    "save_adapter",
]
