"""Every preset composes and validates; every bad input fails before the model is loaded."""
import subprocess
import sys

import pytest

from conftest import CONF, ROOT, compose
from surgeon.config import ConfigError, validate


def _options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def test_default_config_is_the_documented_default(shared):
    cfg = compose()
    validate(cfg)
    assert (cfg.model.name, cfg.data.name, cfg.method.name, cfg.structure.name) == (
        "opt-tiny", "testbed", "surgeon", "structured")
    assert cfg.calib.seed == 100 and cfg.calib.seq_len == 256


@pytest.mark.parametrize("group", ["model", "data", "method", "structure", "logger"])
def test_every_preset_composes_and_validates(group, shared, monkeypatch):
    monkeypatch.setattr("surgeon.config._hub_reachable", lambda timeout=3.0: True)
    for option in _options(group):
        overrides = [f"{group}={option}"]
        if group == "method" and option in ("sparsegpt", "wanda"):
            overrides.append("structure=unstructured")
        if group == "data" and option == "text":
            overrides += [f"data.calib_path={shared}/data/wikitext-2/valid.txt",
                          f"data.eval_path={shared}/data/wikitext-2/test.txt"]
        cfg = compose(overrides)
        validate(cfg, check_sources=group not in ("model", "data") or option in ("opt-tiny", "llama-tiny", "testbed", "text"))
        assert cfg[group].name == option


def test_presets_own_their_defaults():
    assert compose(["structure=structured"]).curvature.damping_g == 0.01
    assert compose(["structure=unstructured"]).curvature.damping_g == 0.1
    assert compose(["structure=semistructured"]).curvature.damping_a == 0.01
    kobd = compose(["method=kobd"])
    assert kobd.correlation == "none" and kobd.curvature.kind == "kfac"
    assert compose(["data=wikitext2"]).calib.seq_len == 2048
    # an explicit override beats the preset
    assert compose(["structure=unstructured", "curvature.damping_g=0.5"]).curvature.damping_g == 0.5


BAD = [
    (["target=1.5"], "target"),
    (["target=0"], "target"),
    (["structure=semistructured", "structure.n=4", "structure.m=4"], "structure.n"),
    (["structure=semistructured", "target=0.3"], "target"),
    (["method=sparsegpt", "structure=structured"], "method=sparsegpt cannot do structure=structured"),
    (["method=wanda", "structure=structured"], "method=wanda cannot do structure=structured"),
    (["schedule=quadratic"], "schedule"),
    (["correlation=global"], "correlation"),
    (["curvature.rank=3"], "curvature.rank"),
    (["shots=0"], "shots"),
    (["model.name_or_path=/nonexistent/model"], "model.name_or_path"),
    (["model.name_or_path=./relative/model"], "model.name_or_path"),
    (["method=sparsegpt", "structure=semistructured", "shots=5"], "shots=1"),
    (["structure=unstructured", "target=0.5", "compact=true"], "compact=true needs structure=structured"),
    (["compact=yes please"], "compact='yes please'; valid values: false, true, uniform"),
    (["method=sparsegpt", "structure=unstructured", "target=0.5", "curvature.kind=kfac"],
     "method=sparsegpt gathers its own layer-wise statistics: curvature.kind must be none"),
    (["curvature.kind=none"], "curvature.kind=none is only for method=sparsegpt|wanda"),
]


@pytest.mark.parametrize("overrides,message", BAD)
def test_bad_input_fails_before_loading(overrides, message, shared, tmp_path, monkeypatch):
    from surgeon import runner

    def loader_must_not_run(*a, **k):
        raise AssertionError("the model loader was called")

    monkeypatch.setattr(runner.models, "load_model", loader_must_not_run)
    cfg = compose(overrides + [f"results={tmp_path}/records.jsonl"])
    with pytest.raises(ConfigError) as err:
        runner.run(cfg, tmp_path / "run")
    assert message in str(err.value)
    assert not (tmp_path / "records.jsonl").exists()
    assert not (tmp_path / "run" / "record.json").exists()


def test_hub_model_offline_says_so(monkeypatch, shared):
    monkeypatch.setattr("surgeon.config._hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setattr("surgeon.config._hub_cached", lambda repo, rev: False)
    with pytest.raises(ConfigError, match="offline.*model.name_or_path=/path/to/model"):
        validate(compose(["model=opt-125m"]))


@pytest.mark.parametrize("args,expect,code", [
    (["target=1.5"], "target=1.5", 2),
    (["model=nonexistent"], "Could not find 'model/nonexistent'", 2),
    (["no_such_key=1"], "Could not override 'no_such_key'", 2),
    (["calib"], "Error parsing override 'calib'", 2),
    (["device=tpu"], "device='tpu'", 2),
    (["+shot=3"], "unknown config key(s) shot", 2),
    (["+curvature.damping=0.1"], "curvature.damping", 2),
    (["lora.enabled=true", "lora.rank=0"], "lora.rank=0", 2),
    (["model.dtype=int8"], "model.dtype", 2),
    (["curvature.rank2_iters=0"], "curvature.rank2_iters", 2),
    (["method=sparsegpt", "structure=unstructured", "target=0.5", "shots=1", "method.percdamp=-1"], "method.percdamp", 2),
    (["update.tol=2"], "update.tol", 2),
    (["calib.seq_len=100000000"], "calib.seq_len", 2),
    (["eval.lm_eval.tasks=[no_such_task]", f"eval.lm_eval.include_path={ROOT}/tests/lm_eval_tasks"], "no_such_task", 2),
    (["model=opt-125m"], "offline", 2),
])
def test_cli_bad_input_exits_nonzero(args, expect, code, tmp_path, shared):
    """Exit code 2 with one line on stderr naming the key for every bad value (Hydra's own composition errors
    too), nothing on stdout, no output folder."""
    env_run_dir = f"hydra.run.dir={tmp_path}/out/run"
    proc = subprocess.run([sys.executable, "run.py", env_run_dir, f"results={tmp_path}/r.jsonl", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120,
                          env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == code, proc.stderr
    assert expect in proc.stderr + proc.stdout
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and proc.stderr.startswith("error: ")
    assert not proc.stdout.strip(), proc.stdout
    assert not (tmp_path / "r.jsonl").exists()
    assert not (tmp_path / "out").exists()


def test_empty_calibration_file_is_refused(tmp_path, shared):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ConfigError, match="data.calib_path=.*is empty"):
        validate(compose(["data=text", f"data.calib_path={empty}", f"data.eval_path={empty}"]))


def test_without_shared_the_error_says_how_to_run_the_paper_setting(tmp_path):
    env = {**__import__("os").environ, "SURGEON_SHARED": str(tmp_path / "nowhere")}
    proc = subprocess.run([sys.executable, "run.py", f"hydra.run.dir={tmp_path}/run"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env=env)
    assert proc.returncode != 0
    assert "model=opt-125m data=wikitext2" in proc.stderr


def test_resume_without_a_folder_finds_the_newest_unfinished_run(tmp_path, shared):
    """resume=true alone: the newest unfinished run with the same settings, or an error naming what to give."""
    from surgeon.records import protocol
    from surgeon.runner import find_resumable

    cfg = compose(["resume=true"])
    other = compose(["resume=true", "target=0.4"])

    def fake_run(name, cfg, status, started, checkpoint=True):
        run_dir = tmp_path / "outputs" / name
        run_dir.mkdir(parents=True)
        record = {"status": status, "started": started, "protocol": protocol(cfg, "cpu")}
        (run_dir / "record.json").write_text(__import__("json").dumps(record))
        if checkpoint:
            (run_dir / "checkpoint.pt").write_bytes(b"")
        return run_dir

    with pytest.raises(ConfigError, match="hydra.run.dir=<run directory>"):
        find_resumable(cfg, roots=(str(tmp_path / "outputs"),))
    fake_run("a", cfg, "interrupted", "2026-01-01T00:00:00Z")
    newest = fake_run("b", cfg, "failed", "2026-01-02T00:00:00Z")
    fake_run("c", cfg, "complete", "2026-01-03T00:00:00Z")
    fake_run("d", cfg, "interrupted", "2026-01-04T00:00:00Z", checkpoint=False)
    fake_run("e", other, "interrupted", "2026-01-05T00:00:00Z")
    assert find_resumable(cfg, roots=(str(tmp_path / "outputs"),)) == newest


def test_shot_options_read_every_setting_from_the_config_and_share_its_defaults():
    """ShotOptions is the one mapping from config keys to shot settings: every field's key exists in the composed
    config (a renamed YAML key fails here) and its default is the config's (structure=unstructured), but for
    curvature.accumulate: `auto` is decided by from_config from the run's memory estimate, a shot built directly
    sums in float32."""
    from dataclasses import fields, replace

    from omegaconf import OmegaConf

    from surgeon.prune import ShotOptions

    cfg = compose(["structure=unstructured"])
    sparsegpt = compose(["method=sparsegpt", "structure=unstructured"])  # the only preset with method settings
    for f in fields(ShotOptions):
        source = sparsegpt if f.metadata["config"] in ("method.blocksize", "method.percdamp") else cfg
        expected = "auto" if f.name == "accumulate" else f.default
        assert OmegaConf.select(source, f.metadata["config"], default="missing") == expected, f.name
    assert ShotOptions().accumulate == "float32"
    opts = ShotOptions.from_config(cfg)
    assert opts.accumulate == "float64"  # opt-tiny's float64 sums fit anywhere
    assert replace(opts, accumulate="float32") == ShotOptions()
    assert ShotOptions.from_config(compose(["curvature.accumulate=float32"])).accumulate == "float32"
    assert ShotOptions.from_config(compose(["curvature.damping_g=0.5"])).damping_g == 0.5
    from surgeon.records import protocol

    assert set(ShotOptions().protocol()) <= set(protocol(cfg, "cpu"))
