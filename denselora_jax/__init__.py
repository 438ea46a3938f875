"""denselora-jax: DenseLoRA (and LoRA/DoRA) fine-tuning of LLaMA-family models in JAX/Flax."""

from denselora_jax.adapters.config import PAPER_TARGETS, PROJECTIONS, Activation, AdapterConfig, Method
from denselora_jax.adapters.core import abstract_adapter, adapter_axes, count_adapter_params, init_adapter
from denselora_jax.model.config import ModelConfig, Remat
from denselora_jax.model.llama import abstract_params, count_params, forward, init_params, param_axes

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
    "forward",
    "init_adapter",
    "init_params",
    "param_axes",
]
