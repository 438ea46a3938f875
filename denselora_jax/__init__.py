"""denselora-jax: DenseLoRA (and LoRA/DoRA) fine-tuning of LLaMA-family models in JAX/Flax."""

from denselora_jax.adapters.config import Activation, AdapterConfig, Method
from denselora_jax.model.config import ModelConfig, Remat

__all__ = ["Activation", "AdapterConfig", "Method", "ModelConfig", "Remat"]
