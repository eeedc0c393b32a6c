"""experiments/bench_scale.py as a user runs it: refusal against a stated memory, truncated shapes, rows kept."""
import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT

from experiments import bench_scale
from surgeon import memory

GiB = 2**30


def bench(tmp_path, *args, timeout=300):
    """`python -m experiments.bench_scale ARGS --json tmp/rows.jsonl` (it re-executes itself on CPU, hence a
    process of its own); its output and rows."""
    rows = tmp_path / "rows.jsonl"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    proc = subprocess.run([sys.executable, "-m", "experiments.bench_scale", "--device", "cpu", *args, "--json", str(rows)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, [json.loads(line) for line in rows.read_text().splitlines()]


def test_layers_keep_the_widths_and_cut_the_depth():
    full, cut = bench_scale.make_config("llama-2-7b"), bench_scale.make_config("llama-2-7b", 2)
    assert (cut.num_hidden_layers, cut.hidden_size, cut.intermediate_size) == (2, 4096, 11008)
    assert full.num_hidden_layers == 32
    # the estimate's per-layer parts scale with the depth; the embeddings and the head do not
    settings = dict(dtype="bfloat16", calib_batch=1, calib_seq_len=2048, calib_n=8, eval_batch=1, eval_seq_len=2048)
    e_full, e_cut = memory.estimate(full, structure="structured", **settings), \
        memory.estimate(cut, structure="structured", **settings)
    assert e_full.factors == pytest.approx(16 * e_cut.factors, rel=1e-9)
    assert e_full.solver == e_cut.solver  # one layer's solver, whatever the depth
    with pytest.raises(SystemExit, match="llama-2-7b has 1 to 32 layers"):
        bench_scale.make_config("llama-2-7b", 33)


def test_a_shape_over_the_stated_memory_is_refused_in_seconds_naming_the_need(tmp_path):
    out, rows = bench(tmp_path, "--shapes", "llama-2-7b", "--dtype", "bfloat16", "--have-gib", "80", timeout=120)
    (row,) = rows
    assert row["refused"] and row["layers"] == 32 and row["have"] == 80 * GiB
    assert row["estimate"]["peak"] > 80 * GiB and row["seconds_to_refuse"] < 30
    assert "--have-gib gives 80.0 GiB" in out and "refused" in out
    assert row["hints"] and all("=" in h or "device" in h for h in row["hints"])
    # the same shape cut to 2 layers fits the same memory: nothing is refused (the shot itself is not run here)
    cut = bench_scale.make_config("llama-2-7b", 2)
    need = max(memory.estimate(cut, structure=s, dtype="bfloat16", calib_batch=8, calib_seq_len=128, calib_n=8,
                               eval_batch=8, eval_seq_len=128).peak for s in ("structured", "unstructured"))
    assert need < 80 * GiB < row["estimate"]["peak"]


def test_mixtral_is_refused_here_and_on_one_141_gb_gpu_with_its_numbers(tmp_path):
    """Mixtral-8x7B (every routed expert's layers, docs/moe.md) in bfloat16: refused on this machine and against
    one 141 GB GPU within seconds; the estimate's factors are the 256 experts' Kronecker factors."""
    out, rows = bench(tmp_path, "--shapes", "mixtral-8x7b", "--dtype", "bfloat16", "--have-gib", "141", timeout=120)
    (row,) = rows
    assert row["refused"] and row["have"] == 141 * GiB and row["seconds_to_refuse"] < 30
    e = row["estimate"]
    # 32 blocks x 8 experts: A of gate|up (4096^2) + G (28672^2) and A of down (14336^2) + G (4096^2), float32
    experts = 32 * 8 * 4 * (4096**2 + 28672**2 + 14336**2 + 4096**2)
    assert experts < e["factors"] < experts * 1.01 and e["weights"] > 80 * GiB
    assert "mixtral-8x7b" in out and "--have-gib gives 141.0 GiB" in out


def test_one_shot_per_structure_writes_a_row_each_as_measured(tmp_path):
    out, rows = bench(tmp_path, "--shapes", "opt-tiny", "--n", "4", "--seq-len", "32", "--batch-size", "2",
                      "--layers", "2", "--max-iter", "200")
    assert [r["structure"] for r in rows] == ["structured", "unstructured"]
    for r in rows:
        assert r["shape"] == "opt-tiny" and r["layers"] == 2 and r["dtype"] == "float32"
        assert set(r["seconds"]) >= {"curvature", "costs", "update"} and r["plain_pass_s"] > 0
        assert r["shot_ratio"] == pytest.approx(sum(r["seconds"].values()) / r["plain_pass_s"])
        # the peak includes the model; the costs/update phase's excess is measured against one solver
        assert r["peak_bytes"] >= r["solve_peak_bytes"] > r["model_bytes"] > 0
        assert r["solver_peak_bytes"] > 0 and r["largest_solver"].endswith(("fc1", "fc2"))
        assert r["estimate_error"] == pytest.approx(r["peak_bytes"] / r["estimate"]["shot_peak"] - 1)
    assert "| opt-tiny (2 of 4 layers) | structured |" in out
    assert "| opt-tiny (2 of 4 layers) | unstructured |" in out
    # each row is on disk as soon as it is appended, before the run ends
    kept = bench_scale.Rows(tmp_path / "sub" / "kept.jsonl")
    kept.append({"shape": "opt-tiny"})
    assert (tmp_path / "sub" / "kept.jsonl").read_text() == '{"shape": "opt-tiny"}\n'


def test_the_solver_estimate_covers_the_measured_solvers():
    """The estimate's one-layer solver (element costs and the joint update: the largest) against the solver of the
    largest layer measured alone in every committed bench_scale row (opt-tiny and llama-tiny up to one Llama-2-7B
    block, 11008 x 4096): never below, at most 20% above."""
    rows = [json.loads(line) for path in sorted((ROOT / "reports" / "bench_scale").glob("*.jsonl"))
            for line in path.read_text().splitlines()]
    measured = [r for r in rows if not r.get("refused")]
    assert {r["shape"] for r in measured} >= {"opt-tiny", "llama-tiny", "opt-125m", "llama-2-7b"}
    for r in measured:
        config = bench_scale.make_config(r["shape"], r.get("layers"))
        n, seq_len, batch = r["calib"]
        solver = memory.estimate(config, structure="unstructured", dtype=r["dtype"], calib_batch=batch,
                                 calib_seq_len=seq_len, calib_n=n).solver
        assert 1.0 <= solver / r["solver_peak_bytes"] <= 1.2, (r["shape"], solver, r["solver_peak_bytes"])
