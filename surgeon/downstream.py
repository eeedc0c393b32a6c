"""Downstream zero-shot accuracy of the in-memory (pruned) model through lm-eval.

docs/protocol.md "Downstream": the record carries the lm-eval version, each task's name and
version, which metric was read (acc_norm or acc) and num_fewshot.
"""
from __future__ import annotations

import difflib
import json
import math
import numbers
import os
from pathlib import Path

import lm_eval
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager

# Headline metric, in this order of preference: for multiple-choice tasks lm-eval reports
# acc_norm (log-likelihood per character) next to acc, and it is the less length-biased.
PREFERRED_METRICS = ("acc_norm", "acc")


def run_lm_eval(
    model,
    tokenizer,
    tasks: list[str],
    *,
    include_path: str | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 8,
    limit: int | None = None,
    device: str | None = None,
) -> dict:
    """Evaluate `model` on lm-eval `tasks` without saving it; one headline metric per task.

    include_path: a folder of lm-eval task YAMLs; when given, only its tasks are known
    (lm-eval's own index takes seconds to build and most of its datasets need the hub).
    num_fewshot: None keeps each task's default (0 where a task sets none).
    limit: evaluate only the first `limit` examples of each task (quick checks only).
    device: moves the model there (in place) first; None evaluates it where it is.
    lm-eval puts the model in eval mode and reseeds python, numpy and torch.
    """
    check_task_names(tasks, include_path)
    task_manager = _task_manager(include_path)

    if device is not None:
        model.to(device)
    # HFLM takes the model object as is (no copy, no reload) and reads its device
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=list(tasks),
        num_fewshot=num_fewshot,
        limit=limit,
        task_manager=task_manager,
        log_samples=False,
    )
    return {
        "version": lm_eval.__version__,
        "tasks": {
            name: _task_record(metrics, out["versions"].get(name), out["n-shot"].get(name))
            for name, metrics in out["results"].items()
        },
        "limit": limit,
    }


def _task_manager(include_path: str | None) -> TaskManager:
    if include_path is None:
        return TaskManager()
    return TaskManager(include_path=include_path, include_defaults=False)


def _cache_file() -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "surgeon" / f"lm-eval-{lm_eval.__version__}-tasks.json"


def known_tasks(include_path: str | None) -> set[str]:
    """The task names lm-eval knows: a local folder's, or lm-eval's own index. That index takes 10-14 s to build,
    so its names are cached per lm-eval version (`~/.cache/surgeon/lm-eval-<version>-tasks.json`, written
    atomically): a bad task name is refused in a second from the second check on."""
    if include_path is not None:
        return set(_task_manager(include_path).all_tasks)
    cache = _cache_file()
    try:
        return set(json.loads(cache.read_text()))
    except (OSError, ValueError):
        pass
    names = sorted(_task_manager(None).all_tasks)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(names))
        tmp.replace(cache)
    except OSError:  # a read-only home: no cache, the check still holds
        pass
    return set(names)


def check_task_names(tasks: list[str], include_path: str | None) -> None:
    """A ValueError for task names lm-eval does not know (only `include_path`'s tasks when given), with close
    matches to choose from."""
    known = known_tasks(include_path)
    unknown = [t for t in tasks if t not in known]
    if not unknown:
        return
    where = f"the task folder {include_path!r}" if include_path else "lm-eval's task index"
    close = sorted({m for t in unknown for m in difflib.get_close_matches(t, known, n=3)})
    raise ValueError(
        f"eval.lm_eval.tasks: unknown task(s) {unknown} in {where}"
        + (f"; close matches: {close}" if close else "")
        + ". `lm-eval ls tasks` lists lm-eval's own tasks; "
        "local task YAMLs need their folder as include_path."
    )


def _task_record(metrics: dict, version, num_fewshot) -> dict:
    """Headline metric, its stderr and all numeric metrics of one lm-eval result entry."""
    values, stderrs = {}, {}
    for key, value in metrics.items():
        if "," not in key:  # "alias", "samples": not metrics
            continue
        name, filter_name = key.split(",", 1)
        metric = name.removesuffix("_stderr")
        # keep lm-eval's filter name only where it tells results apart (generation tasks)
        label = metric if filter_name == "none" else f"{metric},{filter_name}"
        if name != metric:
            stderrs[label] = value
        elif isinstance(value, numbers.Real):
            values[label] = float(value)
    if not values:
        raise ValueError(f"lm-eval reported no numeric metric: {metrics}")
    headline = next((m for m in PREFERRED_METRICS if m in values), next(iter(values)))
    stderr = stderrs.get(headline)
    has_stderr = isinstance(stderr, numbers.Real) and math.isfinite(stderr)
    return {
        "metric": headline,
        "value": values[headline],
        # lm-eval writes "N/A" where it has no stderr (perplexities, bootstrap off)
        "stderr": float(stderr) if has_stderr else None,
        "num_fewshot": num_fewshot,
        "version": version,
        "all": values,
    }
