#!/usr/bin/env bash
# The checks only a GPU can make (docs/scale.md, "The GPU check, prepared"), as one command.
#
#   bash experiments/gpu_check.sh OUTDIR [SECONDS]
#       On a CUDA machine, in the repository root. Steps (STEPS, default "shot7b pipeline table"), in order:
#         shot7b    one structured shot of the Llama-2-7B shape in bfloat16 (random weights, no download): does it
#                   fit the card, and where does the estimate put it (experiments.bench_scale);
#         pipeline  the real pipeline on the testbed models (needs $SURGEON_SHARED or ../shared): the default job in
#                   float32, in bfloat16 and with TF32 matmuls (curvature.precision=tf32), and llama-tiny
#                   unstructured 50% in 5 shots; each final perplexity
#                   against the CPU's in reports/gpu_check/cpu-reference.jsonl (same commands on a CPU);
#         compare   (also the pipeline's last part) the records in OUTDIR/records.jsonl against the CPU reference;
#         serve     saved llama-tiny 2:4 and int4 models' token throughput against dense (experiments.bench_serve;
#                   OUTDIR/serve.jsonl);
#         table     the full bfloat16 scale table (OPT-125m, OPT-1.3b, TinyLlama-1.1B, Llama-2-7B, one shot per
#                   structure), timed as a whole.
#       Out: OUTDIR/bench_scale.jsonl (rows as measured), OUTDIR/records.jsonl (the pipeline's records),
#       OUTDIR/gpu_check.log (everything printed). A step is stopped when SECONDS (default 540) have passed
#       since the start, keeping what it wrote. DEVICE, DTYPE, SHAPES_FIRST, SHAPES_TABLE override the device,
#       the dtype and the shapes (to try it on a CPU: DEVICE=cpu SHAPES_FIRST=llama-tiny
#       SHAPES_TABLE="opt-tiny llama-tiny"; DEVICE=cpu STEPS=pipeline OUTDIR=reports/gpu_check makes the reference).
#
#   bash experiments/gpu_check.sh --stage DIR
#       Here, before going to a GPU host without network or without ../shared: DIR/whl gets the wheels, at this
#       environment's versions, that such a host may lack (transformers, hydra-core, omegaconf, antlr4, regex), and
#       DIR/shared the testbed the pipeline step reads (two models, wikitext-2; 36 MB). There:
#         pip install --no-index --no-deps --target SITE DIR/whl/*.whl; export PYTHONPATH=SITE SURGEON_SHARED=DIR/shared
set -uo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)

if [[ "${1:-}" == "--stage" ]]; then
    dir=$(realpath -m "${2:?usage: experiments/gpu_check.sh --stage DIR}")
    shared=$(realpath -m "${SURGEON_SHARED:-$repo/../shared}")
    mkdir -p "$dir/whl" "$dir/shared/models" "$dir/shared/data"
    for name in transformers hydra-core omegaconf antlr4-python3-runtime regex; do
        version=$(python3 -c "import importlib.metadata as m; print(m.version('$name'))") || exit 1
        # antlr4 has only an sdist at the version omegaconf needs: its (pure Python) wheel is built here
        python3 -m pip download -q --no-deps -d "$dir/whl" "$name==$version" --only-binary=:all: \
            --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
            --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any 2>/dev/null \
        || python3 -m pip wheel -q --no-deps -w "$dir/whl" "$name==$version" || exit 1
    done
    cp -r "$shared/models/opt-tiny-wt2" "$shared/models/llama-tiny-wt2" "$dir/shared/models/" || exit 1
    cp -r "$shared/data/wikitext-2" "$dir/shared/data/" || exit 1
    chmod -R u+w "$dir/shared"  # the testbed is read-only; its copy need not be
    du -sh "$dir/whl" "$dir/shared"
    exit 0
fi

out=$(realpath -m "${1:?usage: experiments/gpu_check.sh OUTDIR [SECONDS]}")
cd "$repo" || exit 1
budget=${2:-540}
device=${DEVICE:-cuda}
dtype=${DTYPE:-bfloat16}
steps=${STEPS:-shot7b pipeline table}
first=${SHAPES_FIRST:-llama-2-7b}
table=${SHAPES_TABLE:-opt-125m opt-1.3b tinyllama-1.1b llama-2-7b}
runs=${TMPDIR:-/tmp}/gpu_check_runs
mkdir -p "$out"
log="$out/gpu_check.log"
rm -rf "$runs"  # the pipeline's run directories (a second try on the same machine starts afresh)
export PYTHONUNBUFFERED=1 OMP_WAIT_POLICY=PASSIVE WANDB_MODE=disabled TQDM_DISABLE=1  # no progress bars in the log

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
    python3 -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'transformers', transformers.__version__, 'gpu', torch.cuda.is_available())"
} 2>&1 | tee -a "$log"

step() {  # step NAME COMMAND...: within what is left of the budget
    local name=$1
    shift
    local left=$((budget - SECONDS))
    if ((left < 20)); then
        echo "## $name: skipped, ${left} s of the budget left" | tee -a "$log"
        return
    fi
    echo "## $name (at most ${left} s): $*" | tee -a "$log"
    local t0=$SECONDS
    timeout --signal=TERM --kill-after=10 "$left" "$@" 2>&1 | tee -a "$log"
    local rc=${PIPESTATUS[0]}
    echo "## $name: exit $rc after $((SECONDS - t0)) s$( ((rc == 124)) && echo ' (stopped at the budget)')" \
        | tee -a "$log"
}

bench=(python3 -m experiments.bench_scale --device "$device" --dtype "$dtype" --json "$out/bench_scale.jsonl")

pipeline() {  # NAME OVERRIDES...: one run.py job on the testbed, its record appended to OUTDIR/records.jsonl
    local name=$1
    shift
    step "pipeline: $name" python3 run.py device="$device" "$@" results="$out/records.jsonl" \
        hydra.run.dir="$runs/$name"
}

compare() {  # each pipeline record's final perplexity against the CPU reference's for the same settings
    python3 - "$out/records.jsonl" reports/gpu_check/cpu-reference.jsonl <<'EOF' 2>&1 | tee -a "$log"
import json, sys
from pathlib import Path

def key(r):
    c = r["config"]
    return (Path(c["model"]["name_or_path"]).name, c["model"]["dtype"], c["structure"]["name"], c["target"], c["shots"])

def load(path):
    p = Path(path)
    return {key(r): r for r in map(json.loads, p.read_text().splitlines())} if p.is_file() else {}

ref = load(sys.argv[2])
print("| model | dtype | structure | target | shots | precision | device | final ppl | CPU reference | difference |")
print("|---|---|---|---|---|---|---|---|---|---|")
for line in Path(sys.argv[1]).read_text().splitlines() if Path(sys.argv[1]).is_file() else []:
    r = json.loads(line)
    cpu = ref.get(key(r), {}).get("final_ppl")  # float32 on CPU whatever the precision (tf32 is CUDA's)
    diff = f"{r['final_ppl'] / cpu - 1:+.2e}" if cpu and r.get("final_ppl") else "-"
    c = r["config"]
    print(f"| {' | '.join(map(str, key(r)))} | {c['curvature']['precision']} | {c['device']} | {r.get('final_ppl')} "
          f"| {cpu} | {diff} |")
EOF
}

for s in $steps; do
    case $s in
    shot7b)
        # shellcheck disable=SC2086  # the shape list is words
        step "one structured shot, $first" "${bench[@]}" --shapes $first --structures structured ;;
    pipeline)
        if [[ ! -d "${SURGEON_SHARED:-../shared}/models/opt-tiny-wt2" ]]; then  # (from the repository root)
            echo "## pipeline: skipped, no testbed (set SURGEON_SHARED; --stage copies it)" | tee -a "$log"
            continue
        fi
        pipeline default-float32
        pipeline default-bfloat16 model.dtype=bfloat16
        pipeline default-tf32 curvature.precision=tf32
        pipeline llama-tiny-unstructured model=llama-tiny structure=unstructured target=0.5 shots=5
        compare ;;
    compare)
        compare ;;
    table)
        # shellcheck disable=SC2086
        step "full table" "${bench[@]}" --shapes $table ;;
    serve)
        # token throughput of llama-tiny dense / LLM Surgeon 2:4 (as semi-structured sparse tensors) / int4 g128
        # (compressed-tensors, reloaded by from_pretrained), float16 (experiments.bench_serve)
        dense="${SURGEON_SHARED:-../shared}/models/llama-tiny-wt2"
        pipeline serve-24 model=llama-tiny structure=semistructured shots=1 save_model=true eval.max_windows=8
        pipeline serve-int4 model=llama-tiny shots=0 quantize=w4g128 save_model=true eval.max_windows=8
        step "serve" python3 -m experiments.bench_serve "dense=$dense" "sparse24=$runs/serve-24/model" \
            "int4=$runs/serve-int4/model" --device "$device" $([[ $device == cuda* ]] && echo --semi) \
            --out "$out/serve.jsonl" ;;
    *) echo "unknown step $s (shot7b, pipeline, compare, table, serve)" >&2; exit 2 ;;
    esac
done
lines() { if [[ -f $1 ]]; then wc -l < "$1"; else echo 0; fi; }
echo "## done in ${SECONDS} s; scale rows: $(lines "$out/bench_scale.jsonl"), pipeline records:" \
    "$(lines "$out/records.jsonl")" | tee -a "$log"
