#!/usr/bin/env bash
# Set up .venv and run the main job on its embedded default (configs/demo.yaml: DenseLoRA on SmolLM2-135M).
source "$(dirname "$0")/_venv.sh"
.venv/bin/python -m denselora_jax.train "$@"
