"""The real pipeline on the testbed models at small settings: records carry the right values."""
import json
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, compose
from surgeon import runner
from surgeon.prune import NonFiniteWeights

# max_correlate=512: the cheapest group size for the grouped element solves on 2 CPU cores
SMALL = ["max_correlate=512", "calib.n=8", "calib.seq_len=64", "calib.batch_size=4", "eval.max_windows=4", "eval.seq_len=128"]


def run(tmp_path, *overrides, name="run"):
    cfg = compose([*SMALL, f"results={tmp_path}/records.jsonl", *overrides])
    return runner.run(cfg, tmp_path / name)


def zeros_of_saved_model(model_dir):
    from transformers import AutoModelForCausalLM

    from surgeon.adapters import adapter_for

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return adapter_for(model.config.model_type).layers(model)


def check_record(record, target, shots, n_layers, tol):
    assert record["status"] == "complete"
    assert len(record["layers"]) == n_layers
    assert [p["shot"] for p in record["points"]] == list(range(1, shots + 1))
    assert abs(record["sparsity"] - target) <= tol
    for p in record["points"]:
        assert abs(p["sparsity"] - p["target"]) <= tol
        assert set(p["seconds"]) >= {"curvature", "costs", "update", "eval"}
    # removed weights stay removed: per-layer sparsity never decreases across shots
    for a, b in zip(record["points"], record["points"][1:]):
        assert all(y >= x for x, y in zip(a["layer_sparsity"], b["layer_sparsity"]))
    assert record["dense_ppl"] > 1 and record["final_ppl"] > 1
    assert record["final_ppl"] == record["points"][-1]["ppl"]


@pytest.mark.parametrize("method", ["surgeon", "kobd", "lobd", "magnitude", "sparsegpt", "wanda"])
def test_each_method_unstructured_opt(method, tmp_path, shared):
    shots = 1 if method in ("sparsegpt", "wanda") else 2
    record = run(tmp_path, "model=opt-tiny", f"method={method}", "structure=unstructured", "target=0.5",
                 f"shots={shots}")
    # one weight of the 3.1M prunable ones is the unstructured granularity
    check_record(record, 0.5, shots, n_layers=24, tol=1e-5)
    assert record["protocol"]["method"] == method
    lines = (tmp_path / "records.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["run_id"] == record["run_id"]


@pytest.mark.parametrize("method", ["surgeon", "kobd", "magnitude"])
def test_structured_llama_saved_model_matches_record(method, tmp_path, shared):
    record = run(tmp_path, "model=llama-tiny", f"method={method}", "structure=structured", "target=0.3", "shots=2",
                 "save_model=true")
    # within one structure: the largest row or column of any layer is 688 weights of 2.2M
    check_record(record, 0.3, 2, n_layers=28, tol=688 / record["protocol"]["prunable_params"] + 1e-9)
    layers = zeros_of_saved_model(record["model_dir"])
    zeros = sum((l.module.weight == 0).sum().item() for l in layers)
    total = sum(l.module.weight.numel() for l in layers)
    assert zeros / total == pytest.approx(record["sparsity"], abs=1e-12)
    for layer, entry in zip(layers, record["layers"]):
        W = layer.module.weight
        assert entry["sparsity"] == pytest.approx((W == 0).double().mean().item(), abs=1e-12)
        # structured: zeros form whole rows and columns
        rows, cols = (W == 0).all(1), (W == 0).all(0)
        assert torch.equal(W == 0, rows[:, None] | cols[None, :])


@pytest.mark.parametrize("model", ["llama-tiny", "opt-tiny"])
def test_semistructured_2_4_is_exact_after_reload(model, tmp_path, shared):
    record = run(tmp_path, f"model={model}", "structure=semistructured", "shots=2", "save_model=true")
    check_record(record, 0.5, 2, n_layers=28 if model == "llama-tiny" else 24, tol=1e-6)
    for layer in zeros_of_saved_model(record["model_dir"]):
        W = layer.module.weight
        nonzeros = (W != 0).view(W.shape[0], -1, 4).sum(-1)
        assert nonzeros.max().item() <= 2


@pytest.mark.parametrize("overrides", [
    ["structure=structured", "target=0.3", "curvature.rank=2", "curvature.rank2_iters=2"],
    ["correlation=independent"],
    ["selection=uniform"],
    ["schedule=exponential"],
    ["schedule=cubic"],
    ["structure=structured", "target=0.3", "union=additive"],
    ["curvature.fisher=sampled"],
])
def test_variants_run_end_to_end(overrides, tmp_path, shared):
    base = ["model=opt-tiny", "structure=unstructured", "target=0.5", "shots=2"]
    record = run(tmp_path, *base, *overrides)
    target = record["protocol"]["target"]
    tol = 256 * 1024 / record["protocol"]["prunable_params"] if "structure=structured" in overrides else 1e-5
    check_record(record, target, 2, n_layers=24, tol=tol)
    if "selection=uniform" in overrides:
        assert all(abs(l["sparsity"] - 0.5) < 1e-4 for l in record["layers"])
    names = [l["name"] for l in record["layers"]]
    for p in record["points"]:
        if "curvature.rank=2" in overrides:  # the record keeps the shrink factor of term 2
            assert list(p["beta"]) == names and all(0 < b <= 1 for b in p["beta"].values())
        else:
            assert "beta" not in p
        if "structure=structured" in overrides or "correlation=independent" in overrides:
            assert "solves" not in p
        else:  # joint element updates: how each layer was solved
            assert list(p["solves"]) == names and all(s["converged"] for s in p["solves"].values())


def test_lora_drops_calibration_loss_and_keeps_zeros(tmp_path, shared):
    record = run(tmp_path, "model=llama-tiny", "structure=unstructured", "target=0.5", "shots=2", "lora.enabled=true",
                 "lora.steps=4", "lora.lr=1e-3", "save_model=true")
    check_record(record, 0.5, 2, n_layers=28, tol=1e-5)
    for p in record["points"]:
        assert p["lora"]["loss_after"] < p["lora"]["loss_before"]
    layers = zeros_of_saved_model(record["model_dir"])
    zeros = sum((l.module.weight == 0).sum().item() for l in layers)
    assert zeros / sum(l.module.weight.numel() for l in layers) == pytest.approx(0.5, abs=1e-5)


def paused_run(args, run_dir, shots: int, **popen):
    """A real `python run.py` that stops after its `shots`-th shot's checkpoint and waits there (runner._test_pause):
    a signal sent once `wait_paused` returns finds it in that state, however loaded the machine is."""
    env = {**os.environ, "TQDM_DISABLE": "1", "SURGEON_TEST_PAUSE_AFTER_SHOT": str(shots),
           "SURGEON_TEST_PAUSE_FILE": str(run_dir.parent / f"{run_dir.name}.paused")}
    # SIGINT back to its default in the child: a suite started in the background (`cmd &` without job control)
    # hands its children SIGINT ignored, and Python then installs no KeyboardInterrupt handler
    return subprocess.Popen([sys.executable, "run.py", *args, f"hydra.run.dir={run_dir}"], cwd=ROOT, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL), **popen)


def wait_paused(proc, run_dir) -> None:
    marker = run_dir.parent / f"{run_dir.name}.paused"
    deadline = time.time() + 600
    while not marker.exists():
        assert proc.poll() is None, "the run ended before its pause"
        assert time.time() < deadline, "the run did not reach its pause in 10 minutes"
        time.sleep(0.05)


def test_resume_after_kill_continues_from_last_finished_shot(tmp_path, shared):
    """Kill a real `python run.py` after its third of six shots; resume=true finishes it."""
    args = [*SMALL, "model=opt-tiny", "structure=structured", "target=0.5", "shots=6", "eval.every=3",
            f"results={tmp_path}/records.jsonl"]
    full = run(tmp_path, *args[len(SMALL):], name="full")

    run_dir = tmp_path / "killed"
    proc = paused_run(args, run_dir, 3, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_paused(proc, run_dir)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    killed = json.loads((run_dir / "record.json").read_text())
    assert killed["status"] == "running" and len(killed["points"]) == 3, "the run was not killed after shot 3"
    finished = len(torch.load(run_dir / "checkpoint.pt", weights_only=False)["record"]["points"])

    resumed = runner.run(compose([*args, "resume=true"]), run_dir)
    assert resumed["status"] == "complete" and resumed["resumed_from_shot"] == finished
    assert resumed["run_id"] == killed["run_id"]
    assert [p["shot"] for p in resumed["points"]] == [1, 2, 3, 4, 5, 6]
    # shots up to the checkpoint were not recomputed: their timings are those of the killed run
    assert resumed["points"][:finished] == killed["points"][:finished]
    assert abs(resumed["final_ppl"] - full["final_ppl"]) / full["final_ppl"] < 1e-4


def test_resume_refuses_different_settings(tmp_path, shared):
    run(tmp_path, "model=opt-tiny", "structure=unstructured", "target=0.5", "shots=1")
    from surgeon.config import ConfigError

    with pytest.raises(ConfigError, match="target"):
        run(tmp_path, "model=opt-tiny", "structure=unstructured", "target=0.6", "shots=1", "resume=true")
    with pytest.raises(ConfigError, match="accumulate"):  # float32 sums give other factors (last bits) than auto's
        run(tmp_path, "model=opt-tiny", "structure=unstructured", "target=0.5", "shots=1", "resume=true",
            "curvature.accumulate=float32")


def test_skip_done_returns_the_complete_record_without_loading(tmp_path, shared, monkeypatch):
    args = ("model=opt-tiny", "method=magnitude", "structure=unstructured", "target=0.5", "shots=1", "skip_done=true")
    first = run(tmp_path, *args, name="a")
    from surgeon import models

    def no_load(*a, **k):
        raise AssertionError("skip_done loaded the model for a run that is already complete")

    monkeypatch.setattr(models, "load_model", no_load)
    again = run(tmp_path, *args, name="b")
    assert again["run_id"] == first["run_id"]
    assert len((tmp_path / "records.jsonl").read_text().splitlines()) == 1
    # another protocol (target), or other settings outside the protocol (eval.every), are run
    for other in ("target=0.4", "eval.every=1"):
        with pytest.raises(AssertionError, match="skip_done loaded"):
            run(tmp_path, *args, other, name="c")


def test_wandb_offline_run_holds_the_per_layer_table(tmp_path, shared, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    record = run(tmp_path, "model=opt-tiny", "structure=structured", "target=0.3", "shots=2", "logger=wandb",
                 "eval.every=1")
    assert record["status"] == "complete"
    tables = list((tmp_path / "run" / "wandb").glob("offline-run-*/files/media/table/**/allocation_[0-9]*.table.json"))
    assert tables, "no W&B table written"
    table = json.loads(tables[0].read_text())
    assert len(table["data"]) == 24
    assert {row[table["columns"].index("name")] for row in table["data"]} == {l["name"] for l in record["layers"]}


def test_lm_eval_on_pruned_model(tmp_path, shared):
    tasks = ROOT / "tests" / "lm_eval_tasks"
    record = run(tmp_path, "model=opt-tiny", "structure=unstructured", "target=0.5", "shots=1",
                 "eval.lm_eval.tasks=[wikitext_mc]", f"eval.lm_eval.include_path={tasks}", "eval.lm_eval.limit=8",
                 "eval.lm_eval.dense=true")
    task = record["lm_eval"]["tasks"]["wikitext_mc"]
    assert 0 <= task["value"] <= 1 and task["metric"] in ("acc", "acc_norm")
    assert record["lm_eval"]["dense"]["tasks"]["wikitext_mc"]["value"] >= 0
    assert record["lm_eval"]["version"]


@pytest.mark.parametrize("method", ["magnitude", "surgeon"])
def test_nan_weight_stops_the_run_with_the_layer_name(method, tmp_path, shared, monkeypatch):
    """A NaN planted after shot 1's checkpoint stops shot 2 naming the layer; nothing non-finite is kept."""
    save = runner._save_checkpoint
    layer_name = "model.decoder.layers.1.fc1"

    def save_then_plant(path, layers, state, shot, record):
        save(path, layers, state, shot, record)
        if shot == 1:
            with torch.no_grad():
                next(l for l in layers if l.name == layer_name).module.weight[3, 5] = float("nan")

    monkeypatch.setattr(runner, "_save_checkpoint", save_then_plant)
    with pytest.raises(NonFiniteWeights, match=layer_name):
        run(tmp_path, "model=opt-tiny", f"method={method}", "structure=unstructured", "target=0.5", "shots=3",
            "save_model=true")
    record = json.loads((tmp_path / "run" / "record.json").read_text())
    assert record["status"] == "failed" and layer_name in record["error"]
    assert [p["shot"] for p in record["points"]] == [1]
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert ckpt["shot"] == 1
    assert all(torch.isfinite(t).all() for w in ckpt["weights"].values() for t in w.values())
    assert not (tmp_path / "run" / "model").exists()


def test_ctrl_c_prints_the_resume_command_which_finishes_the_run(tmp_path, shared):
    """SIGINT mid-run: one line with the resume command, record `interrupted`; the command finishes the run
    with the perplexity of an uninterrupted run."""
    args = [*SMALL, "model=opt-tiny", "structure=structured", "target=0.3", "shots=3", f"results={tmp_path}/r.jsonl"]
    full = run(tmp_path, *args[len(SMALL):], name="full")
    run_dir = tmp_path / "interrupted"
    proc = paused_run(args, run_dir, 1, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_paused(proc, run_dir)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("interrupted; resume with: python run.py") and f"hydra.run.dir={run_dir}" in last
    assert json.loads((run_dir / "record.json").read_text())["status"] == "interrupted"
    assert oct((run_dir / "record.json").stat().st_mode & 0o777) == "0o644"

    command = shlex.split(last.split("resume with: ", 1)[1])
    proc = subprocess.run([sys.executable, *command[1:]], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    resumed = json.loads((run_dir / "record.json").read_text())
    assert resumed["status"] == "complete" and resumed["resumed_from_shot"] >= 1
    assert resumed["final_ppl"] == pytest.approx(full["final_ppl"], rel=1e-6)
