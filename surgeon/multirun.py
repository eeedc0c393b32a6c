"""A summary table across the jobs of a `python run.py -m ...` sweep, printed when the sweep ends."""
from __future__ import annotations

import json
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf


def sweep_summary(sweep_dir: Path) -> str:
    """One line per job: the overrides that differ between jobs, status, sparsity, final perplexity."""
    jobs = []
    for overrides_file in sweep_dir.glob("*/.hydra/overrides.yaml"):
        job_dir = overrides_file.parent.parent
        record_file = job_dir / "record.json"
        record = json.loads(record_file.read_text()) if record_file.exists() else None
        jobs.append((job_dir.name, list(OmegaConf.load(overrides_file)), record))
    jobs.sort(key=lambda job: (len(job[0]), job[0]))
    shared = set.intersection(*(set(o) for _, o, _ in jobs)) if jobs else set()
    lines = [f"multirun summary ({sweep_dir}):", f"{'job':>4}  {'status':<11} {'sparsity':>8} {'final ppl':>10}  settings"]
    for name, overrides, record in jobs:
        settings = " ".join(o for o in overrides if o not in shared)
        if record is None:  # skip_done returned an earlier record without writing one here
            lines.append(f"{name:>4}  {'done before':<11} {'':>8} {'':>10}  {settings}")
            continue
        ppl = f"{record['final_ppl']:.3f}" if record.get("final_ppl") is not None else "-"
        sparsity = f"{record['sparsity']:.4f}" if record.get("sparsity") is not None else "-"
        lines.append(f"{name:>4}  {record['status']:<11} {sparsity:>8} {ppl:>10}  {settings}")
    return "\n".join(lines)


class MultirunSummary(Callback):
    """Hydra callback (conf/config.yaml hydra.callbacks): print `sweep_summary` after the last job."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        print(sweep_summary(Path(config.hydra.sweep.dir)), flush=True)
