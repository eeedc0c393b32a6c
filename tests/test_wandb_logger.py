"""W&B logging: one offline run with a realistic record, failures that never raise, mode fallback."""
import json
import time

import pytest

wandb = pytest.importorskip("wandb")

from surgeon.wandb_logger import WandbLogger, resolve_mode  # noqa: E402

TYPES = {"q": (256, 256), "k": (256, 256), "v": (256, 256), "out": (256, 256), "fc1": (1024, 256), "fc2": (256, 1024)}


def opt_tiny_record(shots=3, target=0.5):
    """A finished unstructured OPT testbed run: per-shot points and per-layer allocation."""
    layers = [{"name": f"model.decoder.layers.{b}.{t}", "type": t, "block": b, "shape": list(shape)}
              for b in range(4) for t, shape in TYPES.items()]
    points = []
    for shot in range(1, shots + 1):
        s = target * shot / shots
        points.append({"shot": shot, "target": s, "sparsity": s + 1e-5, "ppl": None if shot == 1 else 120.0 + 5 * shot,
                       "seconds": {"curvature": 3.1, "costs": 0.2, "update": 1.0, "lora": 0.0, "eval": 2.0},
                       "peak_memory_mb": 800.0 + shot,
                       "layer_sparsity": [s * (0.8 + 0.1 * (i % 5)) for i in range(len(layers))],
                       # curvature.damping=auto's account
                       "damping": {"before": 4.0, "chosen": 3.0, "damping_a": 0.03, "damping_g": 0.3,
                                   "heldout_loss": 4.1, "measured": 0.1, "predicted": 0.05, "ratio": 2.0,
                                   "tried": [{"scale": 1.0}, {"scale": 3.0}, {"scale": 1 / 3}]},
                       # a MoE run's routed experts (moe.whole_experts: their costs)
                       "expert_tokens": {"model.layers.0.mlp.experts.1": 700},
                       "expert_costs": {"model.layers.0.mlp.experts": {"kfac": [2e-6, 3e-6], "reroute": [1e-7, 2e-7],
                                                                       "zero": [3e-7, 4e-7]}}})
    for layer, sparsity in zip(layers, points[-1]["layer_sparsity"]):
        layer["sparsity"] = sparsity
    task = {"metric": "acc", "value": 0.41, "stderr": 0.01, "num_fewshot": 0, "version": 1}
    return {"run_id": "20261129-061500-ab12cd", "status": "complete", "dense_ppl": 122.62,
            "final_ppl": points[-1]["ppl"], "sparsity": points[-1]["sparsity"], "points": points, "layers": layers,
            "protocol": {"model": "/work/shared/models/opt-tiny-wt2", "model_preset": "opt-tiny", "method": "surgeon",
                         "structure": "unstructured", "target": target, "shots": shots},
            "lm_eval": {"version": "0.4.9", "tasks": {"piqa": task}, "dense": {"version": "0.4.9",
                                                                              "tasks": {"piqa": {**task, "value": 0.6}}}}}


def test_offline_run_holds_shots_and_allocation_table(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    record = opt_tiny_record()
    logger = WandbLogger({"method": {"name": "surgeon"}, "shots": 3}, mode="offline", dir=tmp_path,
                         run_name="test-run", tags=["test"])
    assert logger.run is not None and logger.mode == "offline"
    logger.log_dense(record["dense_ppl"])
    for point in record["points"][:-1]:
        logger.log_shot(point, record["layers"])

    def broken(*args, **kwargs):
        raise RuntimeError("wandb is down")

    with monkeypatch.context() as patch:
        patch.setattr(logger.run, "log", broken)
        patch.setattr(wandb, "log", broken)
        with pytest.warns(UserWarning, match="W&B log_shot failed.*wandb is down"):
            assert logger.log_shot(record["points"][-1], record["layers"]) is None
    logger.log_shot(record["points"][-1], record["layers"])
    record["compact"] = {"params": 2_500_000, "params_before": 4_339_712, "ppl": 135.0001}
    record["quantize"] = {"ppl": 136.5, "before_ppl": 135.0001, "cost": 0.25, "bits": 4,
                          "export": {"format": "pack-quantized", "bytes": 1234}}
    logger.log_final(record)
    summary = dict(logger.run.summary)
    logger.finish()
    logger.finish()  # a second finish is a no-op

    assert summary["dense_ppl"] == 122.62 and summary["final_ppl"] == 135.0
    assert summary["lm_eval/piqa/acc"] == 0.41 and summary["lm_eval_dense/piqa/acc"] == 0.6
    assert summary["compact/params"] == 2_500_000 and summary["compact/ppl"] == 135.0001
    assert summary["quantize/ppl"] == 136.5 and summary["quantize/bytes"] == 1234 and summary["quantize/bits"] == 4

    [run_dir] = (tmp_path / "wandb").glob("offline-run-*")
    [table_file] = (run_dir / "files" / "media" / "table").glob("allocation_[0-9]*.table.json")
    table = json.loads(table_file.read_text())
    assert table["columns"] == ["name", "type", "block", "shape", "sparsity"]
    expected = [[l["name"], l["type"], l["block"], "x".join(map(str, l["shape"])), l["sparsity"]]
                for l in record["layers"]]
    assert len(table["data"]) == 24
    for row, want in zip(table["data"], expected):
        assert row[:4] == want[:4] and row[4] == pytest.approx(want[4])
    [wandb_file] = run_dir.glob("*.wandb")
    keys = (b"layer_sparsity/model.decoder.layers.3.fc2", b"seconds/curvature", b"peak_memory_mb", b"allocation_bar",
            b"allocation_by_depth", b"damping/damping_g", b"damping/ratio", b"damping/tries",
            b"expert_tokens/model.layers.0.mlp.experts.1", b"expert_cost/reroute/model.layers.0.mlp.experts.1")
    deadline = time.monotonic() + 30
    while not all(k in wandb_file.read_bytes() for k in keys) and time.monotonic() < deadline:
        time.sleep(0.2)  # W&B's service writes the run file asynchronously, after finish() returns
    assert [k for k in keys if k not in wandb_file.read_bytes()] == []


def test_failing_wandb_init_never_raises_and_online_without_key_falls_back(tmp_path, monkeypatch):
    no_key(tmp_path, monkeypatch)
    asked = {}

    def broken_init(**kwargs):
        asked.update(kwargs)
        raise RuntimeError("no wandb service")

    monkeypatch.setattr(wandb, "init", broken_init)
    with pytest.warns(UserWarning) as caught:
        logger = WandbLogger({}, mode="online", dir=tmp_path)
    messages = [str(w.message) for w in caught]
    assert any("logging offline instead" in m for m in messages)
    assert any("W&B init failed" in m and "no wandb service" in m for m in messages)
    assert asked["mode"] == "offline"
    assert logger.run is None
    record = opt_tiny_record()
    logger.log_dense(record["dense_ppl"])
    logger.log_shot(record["points"][0], record["layers"])
    logger.log_final(record)
    logger.finish(exit_code=1)


def no_key(tmp_path, monkeypatch):
    """No W&B key anywhere: no environment variable, an empty home, no netrc."""
    for name in ("WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NETRC", str(tmp_path / "no-such-netrc"))


def test_mode_resolution(tmp_path, monkeypatch):
    no_key(tmp_path, monkeypatch)
    with pytest.warns(UserWarning, match="no W&B API key"):
        assert resolve_mode("online") == "offline"
    assert resolve_mode("offline") == "offline"
    assert resolve_mode("disabled") == "disabled"
    with pytest.raises(ValueError, match="logger.mode"):
        resolve_mode("cloud")

    netrc = tmp_path / "netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password 0123456789abcdef\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    assert resolve_mode("online") == "online"
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.org")  # a key for another host does not count
    with pytest.warns(UserWarning, match="no W&B API key"):
        assert resolve_mode("online") == "offline"

    monkeypatch.setenv("WANDB_API_KEY", "0123456789abcdef")
    assert resolve_mode("online") == "online"
    assert resolve_mode("offline") == "offline"
