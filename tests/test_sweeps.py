"""Sweep presets compose (Optuna, SLURM, W&B sweep, experiment presets) and a local multirun runs."""
import json
import subprocess
import sys

import pytest
import yaml

from conftest import CONF, ROOT, compose

EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def compose_hydra(overrides):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from surgeon.config import register_resolvers

    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose("config", overrides=list(overrides), return_hydra_config=True)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_presets_compose_and_validate_on_the_testbed(name, shared):
    from surgeon.config import validate

    cfg = compose_hydra([f"+experiment={name}", "model=opt-tiny", "data=testbed"])
    params = cfg.hydra.sweeper.params
    assert params, f"{name} sweeps nothing"
    # every swept value composes into a valid config
    for key, values in params.items():
        if key in ("model", "data"):
            continue
        for value in str(values).split(","):
            validate(compose([f"+experiment={name}", "model=opt-tiny", "data=testbed", f"{key}={value}"]))


def test_structured_table_reads_sizes_at_the_paper_shots():
    cfg = compose(["+experiment=structured_table"])
    assert (cfg.structure.name, cfg.target, cfg.shots, cfg.eval.every) == ("structured", 0.5, 40, 8)


def test_optuna_search_composes():
    cfg = compose_hydra(["+search=optuna"])
    sweeper = cfg.hydra.sweeper
    assert "OptunaSweeper" in sweeper._target_ and sweeper.direction == "minimize"
    assert sweeper.n_trials >= 8
    assert set(sweeper.params) == {"curvature.damping_g", "curvature.damping_a", "shots"}


def test_slurm_launcher_composes():
    cfg = compose_hydra(["+cluster=slurm", "+experiment=structured_table"])
    assert "SlurmLauncher" in cfg.hydra.launcher._target_
    assert cfg.hydra.launcher.gpus_per_node == 1


def test_wandb_sweep_definition_passes_hydra_overrides():
    sweep = yaml.safe_load((ROOT / "sweeps" / "wandb_sweep.yaml").read_text())
    assert sweep["program"] == "run.py" and "${args_no_hyphens}" in sweep["command"]
    overrides = []
    for key, spec in sweep["parameters"].items():
        value = spec.get("value", spec.get("values", [spec.get("min")])[0] if "values" in spec else spec.get("min"))
        overrides.append(f"{key}={value}")
    cfg = compose(overrides)  # every parameter is a key of our config
    assert cfg.logger.name == "wandb" and cfg.structure.name == "unstructured"


def test_two_job_local_multirun(tmp_path, shared):
    records = tmp_path / "records.jsonl"
    cmd = [sys.executable, "run.py", "-m", "shots=1,2", "target=0.2", "calib.n=4", "calib.seq_len=64",
           "eval.max_windows=2", f"results={records}", f"hydra.sweep.dir={tmp_path}/sweep"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [json.loads(line) for line in records.read_text().splitlines()]
    assert sorted(r["protocol"]["shots"] for r in lines) == [1, 2]
    assert all(r["status"] == "complete" for r in lines)
    assert len({r["run_id"] for r in lines}) == 2
    summary = proc.stdout[proc.stdout.index("multirun summary"):].splitlines()
    assert len(summary) == 4 and summary[2].split()[-1] == "shots=1" and summary[3].split()[-1] == "shots=2"
    assert all(line.split()[1] == "complete" for line in summary[2:])


def test_sweep_presets_compose_from_any_working_directory(tmp_path):
    # sweeps/ reaches Hydra's search path through hydra_plugins/surgeon_sweeps, not relative to the cwd
    cmd = [sys.executable, str(ROOT / "run.py"), "+search=optuna", "+cluster=slurm", "--cfg", "hydra"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "OptunaSweeper" in proc.stdout and "SlurmLauncher" in proc.stdout
