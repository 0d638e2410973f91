#!/usr/bin/env bash
# GPU check of the sampled softmax head (issue 14), on one CUDA GPU, in under 5 minutes once the
# environment is there: float64 parity with the reference on CUDA, a bf16 step and fp16 steps
# with GradScaler (one skipped on an inf gradient), the head's peak memory and step time at
# 3,625,000 rows per shard (29M classes on 8 GPUs), D = 512, per unsampled_rows policy, against
# the three-product floor. What and how: bench/gpu_check.py's docstring. Never part of CI.
#
#   bash bench/gpu_check.sh                      # on the GPU machine, from a copy of this repo
#   bash bench/gpu_check.sh --device cpu --quick # the same code, small, on CPU (no GPU needed)
#
# Prints the tables, writes bench/results/gpu_check.json (gpu_check-cpu.json on CPU); exits 1
# when a parity or mixed-precision check fails, 2 when there is no usable environment.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

# --- environment -------------------------------------------------------------------------------
# The check imports torch, this repo's workers.head / workers.losses (torch, numpy, pydantic)
# and bench/ (through PYTHONPATH above: no install needed). The first interpreter
# that imports it all, and sees a GPU unless --device cpu is given, is used: $MARGINLAB_PYTHON,
# this repo's .venv, a venv made by an earlier run of this script, then the machine's python3.
# Failing all of them, a venv is made outside the repo ($GPU_VENV) and `pip install -e .`
# fills it: on top of python3's own torch when that one sees a GPU (--system-site-packages),
# else with torch==2.13.0 from PyPI, whose Linux x86-64 wheel is the CUDA build. The project
# pins Python 3.11 and GPU images often have another version: --ignore-requires-python.
GPU_VENV="${GPU_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/marginlab/gpu-venv}"
check="import torch, bench.gpu_check; assert torch.cuda.is_available()"
for arg in "$@"; do
    if [[ $arg == cpu || $arg == --device=cpu ]]; then check="import torch, bench.gpu_check"; fi
done

if [[ $check == *cuda* ]] && ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "gpu_check: no NVIDIA GPU here (no nvidia-smi); --device cpu --quick checks the script" >&2
    exit 2
fi

usable() {  # usable PYTHON: it imports the check (and sees a GPU unless --device cpu)
    command -v "$1" >/dev/null 2>&1 && "$1" -c "$check" >/dev/null 2>&1
}

python=""
for candidate in "${MARGINLAB_PYTHON:-}" "$ROOT/.venv/bin/python" "$GPU_VENV/bin/python" python3
do
    if [[ -n $candidate ]] && usable "$candidate"; then python="$candidate"; break; fi
done
if [[ -z $python ]]; then
    echo "gpu_check: no interpreter can run the check; making $GPU_VENV" >&2
    if python3 -c "import torch; assert torch.cuda.is_available()" >/dev/null 2>&1; then
        python3 -m venv --system-site-packages "$GPU_VENV"
    else
        python3 -m venv "$GPU_VENV"
        "$GPU_VENV/bin/pip" install --quiet torch==2.13.0
    fi
    "$GPU_VENV/bin/pip" install --quiet --ignore-requires-python -e "$ROOT"
    python="$GPU_VENV/bin/python"
    if ! usable "$python"; then
        echo "gpu_check: $python still cannot run the check (no GPU visible to torch?)" >&2
        exit 2
    fi
fi
echo "gpu_check: $python, torch $("$python" -c 'import torch; print(torch.__version__)')" >&2

# --- the check ---------------------------------------------------------------------------------
exec "$python" "$ROOT/bench/gpu_check.py" "$@"
