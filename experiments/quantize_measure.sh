#!/usr/bin/env bash
# The quantization measurements of docs/quantization.md: 4-bit group-128 weights alone and after LLM Surgeon's
# 5-shot 50% unstructured and 2:4 runs, surgeon's OBS update against round to nearest, on the testbed models (the
# tables' protocol) into results/quantize-testbed.jsonl and on SmolLM2-135M (the README protocol) into
# results/quantize-smollm2.jsonl. Jobs already complete in the records are skipped (skip_done=true): rerunning
# continues. llmcompressor's GPTQ rows come from experiments/library_gptq.py in a venv of its own (docs/quantization.md).
# Tables: python -m experiments.report --records results/quantize-testbed.jsonl --out reports/quantize-testbed
set -euo pipefail
cd "$(dirname "$0")/.."
Q=(quantize=w4g128 skip_done=true)
for model in opt-tiny llama-tiny; do
  T=(model=$model "${Q[@]}" results=results/quantize-testbed.jsonl)
  python run.py "${T[@]}" shots=0 quantize.order=natural
  python run.py "${T[@]}" shots=0
  python run.py "${T[@]}" shots=0 quantize.method=rtn
  for structure in unstructured semistructured; do
    python run.py "${T[@]}" structure=$structure target=0.5 shots=5 quantize.baseline=true
  done
done
S=(model=smollm2-135m calib.n=16 eval.max_windows=40 update.tol=1e-8 "${Q[@]}" results=results/quantize-smollm2.jsonl)
for seed in 100 101 102; do
  python run.py "${S[@]}" shots=0 calib.seed=$seed
done
python run.py "${S[@]}" shots=0 quantize.method=rtn
for order in natural act; do
  python run.py "${S[@]}" shots=0 quantize.order=$order quantize.sequential=true
  for budget in 3.5 4.5; do
    python run.py "${S[@]}" shots=0 quantize.order=$order quantize.budget=$budget
  done
done
python run.py "${S[@]}" shots=0 quantize.order=natural
python run.py "${S[@]}" shots=0 quantize.budget=4.0
for structure in unstructured semistructured; do
  python run.py "${S[@]}" structure=$structure target=0.5 shots=5 quantize.baseline=true
done
