#!/usr/bin/env bash
# Makes .venv in the checkout with rerankd (editable) and everything its tests need.
# On a CPU-only machine torch==2.13.0 is the CPU build; set RERANKD_TORCH to install another
# (for example RERANKD_TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128").
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "[setup] creating .venv with $($PYTHON --version)"
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
echo "[setup] installing torch (${RERANKD_TORCH:-torch==2.13.0})"
# shellcheck disable=SC2086
.venv/bin/python -m pip install --progress-bar off ${RERANKD_TORCH:-torch==2.13.0}
echo "[setup] installing rerankd and its test dependencies (llama-cpp-python compiles llama.cpp: ~6 min on 2 cores)"
.venv/bin/python -m pip install --progress-bar off -e ".[dev,gguf,eval,ray]"
if ! command -v chromedriver >/dev/null 2>&1; then
    # the playground's browser test (tests/server/test_playground.py) drives Debian's headless Chromium
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "[setup] installing chromium and chromium-driver for the playground's browser test"
        if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; }; then
            echo "[setup] WARNING: could not install chromium; the playground's browser test will be skipped"
        fi
    else
        echo "[setup] no chromedriver: the playground's browser test will be skipped (as root: apt-get install chromium chromium-driver)"
    fi
fi
echo "[setup] done: activate with 'source .venv/bin/activate'"
