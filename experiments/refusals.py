"""Every refusal of bad input, as a user meets it: `python run.py <bad overrides>` on the command line.

Each case runs in a fresh process and is measured: exit code, lines on stderr, seconds, and whether an output
folder was left behind. The records (JSON lines) are the source of the README's refusal table.

    python -m experiments.refusals --json reports/refusals/refusals.jsonl   # run every case, write the records
    python -m experiments.refusals --table reports/refusals/refusals.jsonl  # the markdown table from records
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Case:
    what: str
    overrides: tuple[str, ...]
    expect: str  # a piece of the one-line message


def _bert(tmp: Path) -> str:
    folder = tmp / "bert"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    return str(folder)


def _llama_7b(tmp: Path) -> str:
    """A local folder holding only Llama-2-7B's config.json (no weights): the memory check reads the config."""
    folder = tmp / "llama-2-7b-config"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 4096,
        "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
        "vocab_size": 32000, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "torch_dtype": "float16"}))
    return str(folder)


def cases(tmp: Path) -> list[Case]:
    lm_tasks = "tests/lm_eval_tasks"  # relative to the checkout, where run.py runs
    return [
        Case("unknown preset", ("model=no-such-model",), "Could not find 'model/no-such-model'"),
        Case("unknown key", ("no_such_key=1",), "Could not override 'no_such_key'"),
        Case("unknown nested key", ("calib.nn=3",), "Could not override 'calib.nn'"),
        Case("malformed override", ("target",), "Error parsing override 'target'"),
        Case("target outside (0, 1)", ("target=1.5",), "target=1.5"),
        Case("target not a number", ("target=abc",), "target='abc'"),
        Case("shots below 1 (no quantization)", ("shots=0",), "shots=0"),
        Case("structure the method cannot do", ("method=sparsegpt", "structure=structured"),
             "method=sparsegpt cannot do structure=structured"),
        Case("N:M target not (m-n)/m", ("structure=semistructured", "target=0.3"), "target=0.3 must equal"),
        Case("Kronecker rank 3", ("curvature.rank=3",), "curvature.rank=3"),
        Case("negative damping", ("curvature.damping_g=-1",), "curvature.damping_g=-1"),
        Case("quantization bits outside 2..8", ("quantize=w4", "quantize.bits=16"), "quantize.bits=16"),
        Case("unknown device", ("device=tpu",), "device='tpu'"),
        Case("compaction of element zeros", ("structure=unstructured", "target=0.5", "compact=true"),
             "compact=true needs structure=structured"),
        Case("calibration longer than the model's positions", ("calib.seq_len=100000",), "calib.seq_len=100000"),
        Case("missing data file", ("data=text", "data.calib_path=/no/such/file.txt", "data.eval_path=/no/such/t.txt"),
             "data.calib_path=/no/such/file.txt does not exist"),
        Case("missing local model", ("model.name_or_path=/no/such/model",), "does not exist"),
        Case("hub model while offline", ("model.name_or_path=no-such-org/no-such-model",), "cannot be reached"),
        Case("unsupported model family", (f"model.name_or_path={_bert(tmp)}",), "'bert' is not supported"),
        Case("model too large for memory", (f"model.name_or_path={_llama_7b(tmp)}", "model.name=llama-2-7b-config"),
             "needs about"),
        Case("unknown lm-eval task (local task folder)",
             (f"eval.lm_eval.include_path={lm_tasks}", "eval.lm_eval.tasks=[no_such_task]"), "no_such_task"),
        Case("unknown lm-eval task (lm-eval's index, first check: builds the cache)",
             ("eval.lm_eval.tasks=[no_such_task]",), "no_such_task"),
        Case("unknown lm-eval task (lm-eval's index, cached)", ("eval.lm_eval.tasks=[no_such_task]",), "no_such_task"),
    ]


def measure(case: Case, tmp: Path) -> dict:
    """Run one case as a user would; what came back."""
    out = tmp / "out" / "".join(c if c.isalnum() else "-" for c in case.what)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE", "WANDB_MODE": "disabled",
           "XDG_CACHE_HOME": str(tmp / "cache")}  # a fresh lm-eval task cache: the first check builds it
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "run.py", *case.overrides, f"hydra.run.dir={out}"], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    message = lines[-1] if lines else ""
    return {"what": case.what, "overrides": list(case.overrides), "exit": proc.returncode, "lines": len(lines),
            "seconds": round(seconds, 2), "folder_left": out.exists(), "message": message,
            "expected": case.expect in proc.stderr}


def table(records: list[dict], tmp_prefix: str | None = None) -> str:
    """The README's refusal table."""
    rows = ["| bad input | command line (`python run.py ...`) | exit | stderr lines | seconds | folder left | "
            "message |", "|---|---|---|---|---|---|---|"]
    for r in records:
        command = " ".join(o if not o.startswith("model.name_or_path=/") or "/no/such" in o
                           else "model.name_or_path=DIR" for o in r["overrides"])
        message = r["message"].replace("|", "\\|")
        if len(message) > 110:
            message = message[:107] + "..."
        rows.append(f"| {r['what']} | `{command}` | {r['exit']} | {r['lines']} | {r['seconds']:.1f} | "
                    f"{'yes' if r['folder_left'] else 'no'} | {message} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.refusals", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="run every case and write the records here (JSON lines)")
    parser.add_argument("--table", help="print the markdown table of these records")
    args = parser.parse_args(argv)
    if args.json:
        with tempfile.TemporaryDirectory() as tmp:
            records = [measure(case, Path(tmp)) for case in cases(Path(tmp))]
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text("".join(json.dumps(r) + "\n" for r in records))
        for r in records:
            print(f"{r['exit']} {r['lines']} {r['seconds']:5.1f}s {'ok ' if r['expected'] else 'BAD'} {r['what']}")
    if args.table:
        print(table([json.loads(line) for line in Path(args.table).read_text().splitlines()]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
