#!/usr/bin/env bash
# The GPU check (issue 14): the CUDA tests, then the GPU benchmarks; one short table last, full output under $OUT.
#
#   scripts/gpu-check.sh --download-wheels   here, once: the wheels the GPU machine lacks, into .whl/ (git-ignored)
#   scripts/gpu-check.sh                     on the GPU machine (its python3 and torch; the device run's carry must
#                                            name .whl, which git ignores), within ~6 min: timeout_s 420 leaves
#                                            the session's 15 minutes room to fix and rerun once
#   scripts/gpu-check.sh --cpu               anywhere: the same tests on the CPU and the benchmark at toy sizes
#
# On the GPU machine (../shared/GPU.md: python3 with torch and transformers, no network, no fastapi/uvicorn/pydantic)
# the wheels in .whl/ are installed into /tmp/site first. Output: $OUT/pytest.log, $OUT/bench.log, $OUT/gpu.json
# ($OUT defaults to ./gpu-check-out). Each step has its own time limit, so a hang cannot eat the machine's time.
set -uo pipefail
cd "$(dirname "$0")/.."

# what the GPU machine's image lacks, at the versions the project's .venv runs
WHEELS="fastapi==0.165.0 starlette==1.10.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0
typing-inspection==0.4.5 annotated-doc==0.0.7 typing-extensions==4.16.0 uvicorn==0.55.0 h11==0.16.0 click==8.5.1
anyio==4.16.0 opentelemetry-api==1.45.2"

mode=gpu
case "${1:-}" in
    --download-wheels) mode=download ;;
    --cpu) mode=cpu ;;
    "") ;;
    *) echo "usage: $0 [--download-wheels | --cpu]" >&2; exit 2 ;;
esac

if [ "$mode" = download ]; then
    mkdir -p .whl
    # shellcheck disable=SC2086
    python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform any -d .whl $WHEELS || { echo "[gpu-check] pip download failed (see above)" >&2; exit 1; }
    echo "[gpu-check] $(ls .whl | wc -l) wheels in .whl/ ($(du -sh .whl | cut -f1)); carry .whl to the GPU machine"
    exit 0
fi

OUT=${OUT:-$PWD/gpu-check-out}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
if [ "$mode" = cpu ]; then
    PY=.venv/bin/python
    [ -x "$PY" ] || PY=python3
    export RERANKD_TEST_DEVICE=cpu
    bench_args=(--smoke --device cpu)
else
    PY=python3
    if compgen -G ".whl/*.whl" >/dev/null; then
        echo "[gpu-check] installing $(ls .whl/*.whl | wc -l) carried wheels into /tmp/site"
        $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
            || { echo "[gpu-check] installing the wheels failed" >&2; exit 1; }
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    else
        echo "[gpu-check] WARNING: no wheels in .whl/ (run --download-wheels here, and carry .whl): without fastapi" \
             "the server test on the GPU is skipped" >&2
    fi
    # one pass at two budgets: the numbers a first GPU session needs, in about 3 minutes
    bench_args=(--device cuda --repeats 1 --budgets 32768 65536 --text-pairs 64 --image-pairs 16)
fi
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}"

timeout 90 $PY - <<'EOF' 2>&1 | tee "$OUT/env.txt"
import importlib, os, sysconfig, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")
for name in ("transformers", "sentence_transformers", "tokenizers", "fastapi", "uvicorn", "pydantic", "flash_attn"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as e:
        print(name, "MISSING:", type(e).__name__, e)
try:
    from torch.nn.attention.varlen import varlen_attn
    import inspect
    print("varlen_attn", inspect.signature(varlen_attn))
except ImportError as e:
    print("varlen_attn MISSING:", e)
from rerankd.models.layers import attention_backend
dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
print("attention auto:", {str(d).removeprefix("torch."): attention_backend(dev, d) for d in (torch.bfloat16, torch.float32)})
import shutil, subprocess
cc = shutil.which("cc") or shutil.which("gcc")
print("C compiler (Triton, FlexAttention):", subprocess.run([cc, "--version"], capture_output=True, text=True).stdout.splitlines()[0] if cc else "MISSING")
print("Python.h (Triton builds against it):", "found" if os.path.isfile(os.path.join(sysconfig.get_paths()["include"], "Python.h")) else "MISSING")
EOF

echo "[gpu-check] CUDA tests (pytest -m cuda tests/gpu)"
# SIGINT first: pytest then still prints its summary of what ran
timeout -s INT -k 15 150 $PY -m pytest -m cuda tests/gpu -q -rs -p no:cacheprovider 2>&1 | tee "$OUT/pytest.log" | tail -25
tests_rc=${PIPESTATUS[0]}

echo "[gpu-check] benchmarks (benchmarks/bench_gpu.py ${bench_args[*]})"
timeout -s INT -k 15 200 $PY benchmarks/bench_gpu.py "${bench_args[@]}" --json-out "$OUT/gpu.json" 2>&1 | tee "$OUT/bench.log" \
    | grep -v "Loading weights" | tail -40
bench_rc=${PIPESTATUS[0]}

echo
echo "[gpu-check] tests: $(tail -1 "$OUT/pytest.log") (rc $tests_rc); benchmark rc $bench_rc; files in $OUT"
[ "$tests_rc" = 0 ] && [ "$bench_rc" = 0 ]
