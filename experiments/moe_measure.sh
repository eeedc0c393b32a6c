#!/usr/bin/env bash
# The mixture-of-experts measurement (docs/moe.md): the upcycled, briefly trained Mixtral testbed model
# (experiments/train_moe.py), LLM Surgeon against K-OBD, magnitude, SparseGPT (and Wanda) at 50% unstructured
# and 2:4, and structured pruning of expert units (and attention) to 80% size, also with whole experts removed; quick protocol (calib.n=32,
# 128 test windows, 2 shots for the curvature methods). Records go to results/moe-tiny.jsonl; tables and figures:
#   python -m experiments.report --records results/moe-tiny.jsonl --out reports/moe-tiny
# Jobs already complete in the records are skipped (skip_done=true): rerunning continues.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:-outputs/moe-tiny-wt2}
[ -f "$MODEL/config.json" ] || python -m experiments.train_moe --out "$MODEL"
COMMON=(model=llama-tiny "model.name=moe-tiny" "model.name_or_path=$PWD/$MODEL" data=testbed calib.n=32
        eval.max_windows=128 max_correlate=512 results=results/moe-tiny.jsonl skip_done=true quick=true)
for method in surgeon kobd magnitude sparsegpt wanda; do
  shots=2; [[ $method == sparsegpt || $method == wanda ]] && shots=1
  python run.py "${COMMON[@]}" method=$method structure=unstructured target=0.5 shots=$shots
  python run.py "${COMMON[@]}" method=$method structure=semistructured target=0.5 shots=$shots
done
for method in surgeon kobd magnitude; do
  python run.py "${COMMON[@]}" method=$method structure=structured target=0.2 shots=2
done
# whole experts (their router rows masked) against expert units, on the same model, compacted: results/moe-tiny-whole.jsonl
WHOLE=("${COMMON[@]/results=results\/moe-tiny.jsonl/results=results/moe-tiny-whole.jsonl}")
# (whole experts cost their measured re-routing, moe.whole_cost=reroute, or the KFAC cost of a zeroed output)
for method in surgeon kobd magnitude; do
  python run.py "${WHOLE[@]}" method=$method structure=structured target=0.2 shots=2 compact=true
  python run.py "${WHOLE[@]}" method=$method structure=structured target=0.2 shots=2 compact=true moe.whole_experts=true
  [[ $method == magnitude ]] || python run.py "${WHOLE[@]}" method=$method structure=structured target=0.2 shots=2 \
      compact=true moe.whole_experts=true moe.whole_cost=zero
done
