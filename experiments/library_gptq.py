"""A maintained library's GPTQ in surgeon's harness: llmcompressor's GPTQModifier on the same model, calibration
windows, grid and evaluation windows as `python run.py shots=0 quantize=...`, written as a result record (the
protocol's `quantize.method` is `llmcompressor-gptq`), so the quantized table puts it beside surgeon's update.

llmcompressor pins transformers <= 5.17 and compressed-tensors 0.19, the testbed models need transformers >= 5.24:
it runs in a venv of its own, installed with --no-deps beside transformers 5.25 and compressed-tensors 0.20
(it imports and runs there; docs/quantization.md has the commands):

    python -m experiments.library_gptq model=llama-tiny quantize=w4g128 results=results/quantize-testbed.jsonl

Settings are run.py's (model, data, calib.*, eval.*, quantize.bits / group_size / symmetric / damping / observer,
the last as the library's observer of the same idea, LIBRARY_OBSERVERS); the
library's own defaults stand otherwise (its activation order `static`, its sequential pipeline: each block
calibrated on the outputs of the blocks already quantized). Only the prunable layers surgeon quantizes are
targeted, with the same group width per layer (surgeon.quantize.Grid.width).
"""
from __future__ import annotations

import sys
import time


# quantize.observer -> the library's observer of the same idea (its own search defaults): minmax its default;
# mse its memoryless MSE observer (the same search as surgeon's); cost its importance-matrix MSE (|w - q|^3
# weighted by E[x^2] per input column, shrinks 1 - i / 20 up to 95%)
LIBRARY_OBSERVERS = {"minmax": None, "mse": "memoryless_mse", "cost": "imatrix_mse"}


def main(argv: list[str]) -> dict:
    import torch
    from torch.utils.data import DataLoader

    import llmcompressor
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier

    from surgeon import models
    from surgeon.adapters import adapter_for
    from surgeon.config import compose, to_container, validate
    from surgeon.quantize import Grid, config_groups
    from surgeon.records import append_jsonl, git_commit, new_run_id, now_iso, portable_config, protocol, versions
    from surgeon.runner import perplexity, prepare_data

    cfg = compose(["shots=0", *argv])
    if cfg.quantize.bits is None:
        raise SystemExit("give quantize=... (e.g. quantize=w4g128): the grid to quantize to")
    validate(cfg)
    data = prepare_data(cfg)
    device = torch.device("cpu")
    model = models.load_model(cfg, device)
    layers = adapter_for(model.config.model_type).layers(model)
    record = {"run_id": new_run_id(), "status": "running", "started": now_iso(), "finished": None,
              "config": portable_config(to_container(cfg)), "protocol": protocol(cfg, str(device)),
              "points": [], "layers": [], "compact": None, "lm_eval": None, "model_dir": None, "error": None,
              "resumed_from_shot": None, "processes": 1, "sparsity": 0.0,
              "versions": {**versions(), "llmcompressor": llmcompressor.__version__}, "git_commit": git_commit()}
    # its defaults: static activation order, the sequential pipeline
    observer = cfg.quantize.get("observer", "minmax")
    record["protocol"]["quantize"].update(method="llmcompressor-gptq", order="act", sequential=True, observer=observer)
    record["protocol"]["eval"]["windows"] = data.eval_windows.shape[0]
    record["dense_ppl"] = perplexity(model, data.eval_windows, cfg.eval.batch_size)

    q = cfg.quantize
    grid = Grid(q.bits, q.symmetric, q.group_size)
    groups = config_groups(layers, {layer.name: q.bits for layer in layers}, q, LIBRARY_OBSERVERS[observer])
    calib = [{"input_ids": w[None], "attention_mask": torch.ones_like(w)[None]} for w in data.calib]
    # oneshot re-reads the config from model.config.name_or_path, which for a GGUF model is a folder with no
    # config.json: give it the model's own config (a float model, as surgeon loads it)
    import tempfile

    models.drop_gguf_quantization(model)
    config_dir = tempfile.mkdtemp(prefix="surgeon-config-")
    model.config.save_pretrained(config_dir)
    model.config.name_or_path = config_dir
    t0 = time.perf_counter()
    oneshot(model=model, processor=data.tokenizer, dataset=DataLoader(calib, batch_size=None), recipe=GPTQModifier(
        config_groups=groups, dampening_frac=q.damping, block_size=q.blocksize), num_calibration_samples=len(calib))
    seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    ppl = perplexity(model, data.eval_windows, cfg.eval.batch_size)
    record["quantize"] = {"bits": q.bits, "group_size": q.group_size, "symmetric": bool(q.symmetric),
                          "method": "llmcompressor-gptq", "damping": q.damping, "order": "act", "sequential": True,
                          "observer": observer, "library_observer": LIBRARY_OBSERVERS[observer] or "minmax",
                          "cost": None,
                          "fallbacks": 0,
                          "before_ppl": record["dense_ppl"], "ppl": ppl,
                          "seconds": {"quantize": seconds, "eval": time.perf_counter() - t0},
                          "layers": [{"name": layer.name, "method": "llmcompressor-gptq",
                                      "group": grid.width(layer.in_features)} for layer in layers]}
    record.update(final_ppl=ppl, status="complete", finished=now_iso())
    append_jsonl(cfg.results, record)
    print(f"dense {record['dense_ppl']:.4f}  llmcompressor GPTQ int{q.bits}: {ppl:.4f}  ({seconds:.1f} s)")
    return record


if __name__ == "__main__":
    main(sys.argv[1:])
