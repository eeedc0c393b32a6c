#!/usr/bin/env bash
# The scale checks only a GPU can make (README "Scale benchmark"), as one prepared command.
#
#   bash experiments/gpu_check.sh OUTDIR [SECONDS]
#       On a CUDA machine, in the repository root. Two steps, each a `python -m experiments.bench_scale` run in
#       bfloat16 on random-init models of the published shapes (no download):
#         1. one structured shot of the Llama-2-7B shape: does it fit the card, and where does the estimate put it;
#         2. the full table, OPT-125m, OPT-1.3b, TinyLlama-1.1B and Llama-2-7B, one shot per structure, timed
#            as a whole (the issue asks for it in under 8 minutes).
#       Rows go to OUTDIR/bench_scale.jsonl as each is measured, the output to OUTDIR/gpu_check.log. The script
#       stops a step when SECONDS (default 540) have passed since it started, keeping the rows already written.
#       DEVICE, DTYPE, SHAPES_FIRST, SHAPES_TABLE override the device, the dtype and the shapes of each step
#       (to try the script on a CPU: DEVICE=cpu SHAPES_FIRST=llama-tiny SHAPES_TABLE="opt-tiny llama-tiny").
#
#   bash experiments/gpu_check.sh --wheels DIR
#       On a machine with this checkout's environment and a package index: the wheels, at this environment's
#       versions, that a GPU host without network may lack (transformers, hydra-core, omegaconf, antlr4, regex),
#       for `pip install --no-index --no-deps --target SITE DIR/*.whl` and `PYTHONPATH=SITE` there.
set -uo pipefail

if [[ "${1:-}" == "--wheels" ]]; then
    dir=${2:?usage: experiments/gpu_check.sh --wheels DIR}
    mkdir -p "$dir"
    for name in transformers hydra-core omegaconf antlr4-python3-runtime regex; do
        version=$(python -c "import importlib.metadata as m; print(m.version('$name'))") || exit 1
        # antlr4 ships only an sdist for the version omegaconf needs: build its (pure Python) wheel here
        python -m pip download -q --no-deps -d "$dir" "$name==$version" --only-binary=:all: \
            --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
            --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any 2>/dev/null \
        || python -m pip wheel -q --no-deps -w "$dir" "$name==$version" || exit 1
    done
    ls -l "$dir"
    exit 0
fi

out=${1:?usage: experiments/gpu_check.sh OUTDIR [SECONDS]}
budget=${2:-540}
device=${DEVICE:-cuda}
dtype=${DTYPE:-bfloat16}
first=${SHAPES_FIRST:-llama-2-7b}
table=${SHAPES_TABLE:-opt-125m opt-1.3b tinyllama-1.1b llama-2-7b}
mkdir -p "$out"
log="$out/gpu_check.log"
export PYTHONUNBUFFERED=1 OMP_WAIT_POLICY=PASSIVE

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
    python -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'transformers', transformers.__version__, 'gpu', torch.cuda.is_available())"
} 2>&1 | tee "$log"

step() {  # step NAME ARGS...: one bench_scale run, within what is left of the budget
    local name=$1
    shift
    local left=$((budget - SECONDS))
    if ((left < 20)); then
        echo "## $name: skipped, ${left} s of the budget left" | tee -a "$log"
        return
    fi
    echo "## $name (at most ${left} s): python -m experiments.bench_scale $*" | tee -a "$log"
    local t0=$SECONDS
    timeout --signal=TERM --kill-after=10 "$left" python -m experiments.bench_scale --device "$device" \
        --dtype "$dtype" --json "$out/bench_scale.jsonl" "$@" 2>&1 | tee -a "$log"
    local rc=${PIPESTATUS[0]}
    echo "## $name: exit $rc after $((SECONDS - t0)) s$( ((rc == 124)) && echo ' (stopped at the budget)')" \
        | tee -a "$log"
}

# shellcheck disable=SC2086  # the shape lists are words
step "one structured shot, $first" --shapes $first --structures structured
step "full table" --shapes $table
echo "## done in ${SECONDS} s; rows: $(wc -l < "$out/bench_scale.jsonl" 2>/dev/null || echo 0)" | tee -a "$log"
