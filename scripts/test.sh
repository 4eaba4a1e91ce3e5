#!/usr/bin/env bash
# Runs the whole test suite (no network, no GPU needed) in the checkout's .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest tests "$@"
