"""Several processes (surgeon.distributed): the helpers over two gloo processes, split-invariant statistics, the
settings refused up front, and `torchrun --nproc_per_node=2 run.py` against one process on the testbed."""
import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.multiprocessing as mp

from conftest import ROOT, compose
from surgeon import distributed
from surgeon.config import ConfigError, validate
from surgeon.curvature import estimate_curvature

# one thread per process, as torchrun sets it: the same matmul kernels in one process and in two
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "WANDB_MODE": "disabled",
       "PYTHONPATH": str(ROOT)}
SMALL = ["model=opt-tiny", "shots=2", "calib.n=16", "calib.seq_len=64", "calib.batch_size=4", "eval.max_windows=8",
         "eval.seq_len=128"]  # default settings: curvature.accumulate=auto is float64 for a model this small
STRUCTURES = {"structured": ["structure=structured", "target=0.3"],
              "unstructured": ["structure=unstructured", "target=0.5"],
              "semistructured": ["structure=semistructured"]}
# other curvature passes through the same split: L-OBD's diag(A) pass, and the Kronecker rank-2 passes
# (with one W&B run and one saved model, made by rank 0)
VARIANTS = {"lobd-unstructured": ["method=lobd", *STRUCTURES["unstructured"], "logger=wandb"],
            "rank2-structured": [*STRUCTURES["structured"], "curvature.rank=2", "curvature.rank2_iters=1",
                                 "save_model=true"],
            # compaction after the last shot on every rank, its evaluation split like the others
            "compact-structured": [*STRUCTURES["structured"], "compact=true", "save_model=true"],
            # the damping search: held-out losses split over the ranks, the same tries and choices
            "auto-damping-structured": [*STRUCTURES["structured"], "curvature.damping=auto",
                                        "curvature.auto_damping.heldout=4"],
            # quantization after the shots: its KFAC pass split like the others, its RTN twin, one export by rank 0
            "quantize-unstructured": [*STRUCTURES["unstructured"], "quantize=w4g128", "quantize.baseline=true",
                                      "save_model=true"]}


def test_share_is_contiguous_and_owners_balance_the_work():
    items = list(range(7))
    parts = [distributed.share(items, part, 3) for part in range(3)]
    assert parts == [[0, 1, 2], [3, 4], [5, 6]]
    assert distributed.share(items, 0, 1) == items
    assert distributed.owners([5.0, 1.0, 1.0]) == [0, 0, 0]  # one process owns everything


def test_owners_over_two_ranks(monkeypatch):
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    # longest first onto the least loaded rank: 8 -> 0, 5 -> 1, 4 -> 1, 3 -> 0, 1 -> 0 or 1 (loads 11, 9 -> 1)
    assert distributed.owners([3.0, 8.0, 1.0, 5.0, 4.0]) == [0, 0, 1, 1, 1]


def test_world_size_from_torchrun_or_an_srun_step(monkeypatch):
    for key in ("WORLD_SIZE", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS"):
        monkeypatch.delenv(key, raising=False)
    assert distributed.env_world_size() == 1
    monkeypatch.setenv("SLURM_NTASKS", "8")  # a shell inside an allocation: still one process
    assert distributed.env_world_size() == 1
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "8")  # a task of an srun step of 8 (submitit's launcher)
    assert distributed.env_world_size() == 8
    monkeypatch.setenv("WORLD_SIZE", "2")  # torchrun's variables win
    assert distributed.env_world_size() == 2


def test_an_srun_step_without_torchrun_or_submitit_is_refused(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("SUBMITIT_EXECUTOR", raising=False)
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "2")
    with pytest.raises(ConfigError, match=r"srun step has 2 tasks .* \+cluster=slurm .* torchrun inside srun"):
        distributed.init(torch.device("cpu"), timeout_s=10)
    assert not torch.distributed.is_initialized()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _helpers_worker(rank: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    assert distributed.init(torch.device("cpu"), timeout_s=60)
    try:
        summed = distributed.sum_(torch.tensor([1.0, 2.0], dtype=torch.float64) * (rank + 1))
        owned = {"a": torch.full((2, 3), 7.0)} if rank == 0 else {"b": torch.arange(4, dtype=torch.int32)}
        shared = distributed.from_owners(owned, {"a": 0, "b": 1}, ["a", "b"], torch.device("cpu"))
        losses = distributed.gather_losses(torch.tensor([10.0 * rank, 10.0 * rank + 1], dtype=torch.float64))
        result = {"rank": distributed.rank(), "world": distributed.world_size(), "sum": summed.tolist(),
                  "a": shared["a"].tolist(), "b": shared["b"].tolist(), "b_dtype": str(shared["b"].dtype),
                  "losses": losses.tolist(), "object": distributed.broadcast_object(f"from {rank}")}
        with open(f"{out}.{rank}", "w") as f:
            json.dump(result, f)
    finally:
        distributed.close()


def test_helpers_over_two_gloo_processes(tmp_path):
    mp.start_processes(_helpers_worker, args=(_free_port(), str(tmp_path / "out")), nprocs=2, start_method="spawn")
    for rank in (0, 1):
        result = json.loads((tmp_path / f"out.{rank}").read_text())
        assert result["rank"] == rank and result["world"] == 2
        assert result["sum"] == [3.0, 6.0]
        assert result["a"] == [[7.0] * 3] * 2 and result["b"] == [0, 1, 2, 3] and result["b_dtype"] == "torch.int32"
        assert result["losses"] == [0.0, 1.0, 10.0, 11.0]
        assert result["object"] == "from 0"


def _tiny_shots(shots: int = 2, structure: str = "unstructured"):
    """Shots of prune_shot on a small random OPT (the same in every process): each shot's balance and masks,
    and the state's per-layer seconds after each."""
    from transformers import AutoModelForCausalLM, OPTConfig

    from surgeon.adapters import adapter_for
    from surgeon.prune import PruneState, ShotOptions, prune_shot

    torch.manual_seed(0)
    config = OPTConfig(hidden_size=32, ffn_dim=96, num_hidden_layers=2, num_attention_heads=2, vocab_size=64,
                       max_position_embeddings=64, word_embed_proj_dim=32)
    model = AutoModelForCausalLM.from_config(config).eval()
    layers = adapter_for("opt").layers(model)
    batches = list(torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(1)).split(2))
    state, out = PruneState.empty(layers), []
    opts = ShotOptions(structure=structure, damping_a=0.01, damping_g=0.1, tol=1e-8, max_iter=500,
                       accumulate="float64")
    for shot in range(1, shots + 1):
        _, info = prune_shot(model, layers, batches, state, 0.5 * shot / shots, opts, seed=shot)
        out.append({"balance": info.get("balance"), "work": dict(state.work),
                    "masks": {k: v.tolist() for k, v in state.removed.items()}})
    return out


def _balance_worker(rank: int, port: int, out: str, make=None) -> None:
    """One of two gloo processes: `make()` (default `_tiny_shots`) written as JSON to out.<rank>."""
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    assert distributed.init(torch.device("cpu"), timeout_s=120)
    try:
        shots = (make or _tiny_shots)()
        with open(f"{out}.{rank}", "w") as f:
            json.dump(shots, f)
    finally:
        distributed.close()


def test_layers_are_divided_by_the_seconds_they_took_in_the_shot_before(tmp_path):
    """Two gloo processes: the first shot divides the layers by R^3 + C^3, the second by the seconds each layer's
    costs and update took in the first (the same on both ranks); the masks are those of one process."""
    mp.start_processes(_balance_worker, args=(_free_port(), str(tmp_path / "out")), nprocs=2, start_method="spawn")
    ranks = [json.loads((tmp_path / f"out.{rank}").read_text()) for rank in (0, 1)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank: the same kernels
    try:
        one = _tiny_shots()
    finally:
        torch.set_num_threads(threads)  # the tests after this one run with the process's default
    names = list(one[0]["masks"])
    for shots in ranks:
        assert [s["balance"] for s in shots] == ["R^3+C^3", "previous shot"]
        for shot, alone in zip(shots, one):
            assert list(shot["work"]) == names and all(t > 0 for t in shot["work"].values())
            assert shot["masks"] == alone["masks"]
    assert ranks[0][0]["work"] == ranks[1][0]["work"] and ranks[0][1]["work"] == ranks[1][1]["work"]
    assert [s["balance"] for s in one] == [None, None] and one[-1]["work"] == {}  # one process: nothing measured


@pytest.mark.parametrize("rank", [1, 2])
def test_float64_sums_give_the_same_factors_however_the_batches_are_split(rank):
    """Two 'processes' (threads, each with its own copy of the model and a share of the batches, adding up their
    sums as distributed.sum_ does) give bitwise the factors of one process over all batches: float64 sums of
    float32 products are exact, in any order; at rank 2 every power-iteration pass is summed too."""
    import copy
    import threading

    from test_curvature import N, T, V, tiny_model

    from surgeon.adapters import adapter_for

    model = tiny_model("opt").to(torch.float32)
    ids = torch.randint(0, V, (N, T), generator=torch.Generator().manual_seed(1))
    batches = list(ids.split(1))
    kwargs = dict(rank=rank, rank2_iters=2, accumulate="float64")
    one = estimate_curvature(model, adapter_for("opt").layers(model), batches, **kwargs)

    barrier, slots, two = threading.Barrier(2), [None, None], [None, None]

    def process(part: int) -> None:
        def sum_(tensor):
            slots[part] = tensor
            barrier.wait()
            total = slots[0] + slots[1]
            barrier.wait()
            return tensor.copy_(total)

        copy_ = copy.deepcopy(model)
        two[part] = estimate_curvature(copy_, adapter_for("opt").layers(copy_), distributed.share(batches, part, 2),
                                       sum_=sum_, **kwargs)

    threads = [threading.Thread(target=process, args=(part,)) for part in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    for name in one:
        for key in ("A", "G", "A2", "G2") if rank == 2 else ("A", "G"):
            a, b, c = (getattr(f[name], key) for f in (one, *two))
            assert a.dtype == torch.float32 and torch.equal(a, b) and torch.equal(a, c), (name, key)


def _threads(n: int, work) -> list:
    """Run work(part, reduce) in n threads whose `reduce(values, op)` combines integer lists as the ranks'
    all_reduce does; returns each thread's result."""
    import threading

    barrier, slots, out = threading.Barrier(n), [None] * n, [None] * n
    combine = {"sum": sum, "min": min, "max": max}

    def reducer(part):
        def reduce(values, op):
            slots[part] = list(values)
            barrier.wait()
            total = [combine[op](column) for column in zip(*slots)]
            barrier.wait()
            return total

        return reduce

    def run(part):
        out[part] = work(part, reducer(part))

    threads = [threading.Thread(target=run, args=(part,)) for part in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return out


@pytest.mark.parametrize("structure", ["unstructured", "semistructured"])
def test_selection_split_over_processes_exchanges_counts_and_gives_the_same_masks(structure):
    """Layers owned by 3 'processes' (interleaved), costs with many ties across layers and already removed
    entries: the selection from combined counts equals the selection with all costs in one process."""
    from surgeon.selection import Split, select_nm, select_unstructured

    gen = torch.Generator().manual_seed(0)
    shapes = [(6, 8), (4, 12), (8, 4), (5, 8), (3, 16)]
    names = [f"layer{i}" for i in range(len(shapes))]
    costs = {n: torch.randint(0, 6, s, generator=gen).float() for n, s in zip(names, shapes)}  # ties everywhere
    removed = {n: torch.zeros(s, dtype=torch.bool) for n, s in zip(names, shapes)}
    removed["layer1"][0, :2] = removed["layer3"][2, 4:6] = True  # earlier shots: at most 2 of every block of 4
    owner = {n: i % 3 for i, n in enumerate(names)}
    numel = sum(c.numel() for c in costs.values())

    def select(c, r, split=None):
        if structure == "semistructured":
            return select_nm(c, r, 0.5, 2, 4, split=split)
        return select_unstructured(c, r, 0.37, split=split)

    one = select(dict(costs), dict(removed))
    parts = _threads(3, lambda part, reduce: select({n: costs[n] for n in names if owner[n] == part},
                                                    {n: removed[n] for n in names if owner[n] == part},
                                                    Split(names, numel, reduce)))
    for name in names:
        assert torch.equal(parts[owner[name]][name], one[name]), name
    assert sum(int(m.sum()) for m in one.values()) == (numel // 2 if structure == "semistructured"
                                                       else round(0.37 * numel))


@pytest.mark.parametrize("override, key", [
    ("lora.enabled=true", "lora.enabled"),
    ("curvature.offload=cpu", "curvature.offload"),
    ("method=sparsegpt", "method=sparsegpt"),
    ("curvature.fisher=sampled", "curvature.fisher"),
    ("calib.n=8", "calib.n=8"),
])
def test_settings_not_split_over_processes_are_refused_up_front(override, key, monkeypatch):
    overrides = ["structure=unstructured", "target=0.5", override]
    validate(compose(overrides), check_sources=False)  # fine in one process
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(compose(overrides), check_sources=False)


def test_processes_of_one_machine_share_its_memory_in_the_check(tmp_path, monkeypatch):
    """On CPU, K processes of one machine each hold the model and its factors: the check gives each 1/K."""
    from test_memory import LLAMA_7B

    from surgeon import config as config_mod
    from surgeon import memory

    LLAMA_7B.save_pretrained(tmp_path)
    cfg = compose([f"model.name_or_path={tmp_path}", "model.name=x", "model.params=null", "device=cpu",
                   "model.dtype=bfloat16", "structure=structured"])
    monkeypatch.setattr(memory, "available_bytes", lambda device: 141 * 2**30)
    config_mod.check_memory(cfg)  # fits one process
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=r"but cpu has 70\.5 GiB for each of its 2 processes; try"):
        config_mod.check_memory(cfg)


def test_auto_accumulate_is_float64_where_it_fits_and_decided_alike_by_one_or_two_processes(tmp_path, monkeypatch):
    """curvature.accumulate=auto: float64 sums for a model whose run fits with them, float32 for Llama-2-7B in
    bfloat16 on one 141 GB device (its float64 sums alone would be 127 GB); the whole device decides, so a
    second process on the machine changes nothing; resolved in the config the run and its record see."""
    from test_memory import LLAMA_7B

    from surgeon import config as config_mod
    from surgeon import memory

    small = compose(["model=opt-tiny", "device=cpu"])
    assert small.curvature.accumulate == "auto"
    assert config_mod.resolve_accumulate(small) == "float64"
    LLAMA_7B.save_pretrained(tmp_path)
    big = compose([f"model.name_or_path={tmp_path}", "model.name=x", "model.params=null", "device=cpu",
                   "model.dtype=bfloat16", "structure=structured"])
    monkeypatch.setattr(memory, "available_bytes", lambda device: 141 * 2**30)
    assert config_mod.resolve_accumulate(big) == "float32"
    settings = config_mod.run_settings(big)
    assert memory.estimate(LLAMA_7B, **{**settings, "accumulate": "float32"}).peak < 141 * 2**30 \
        < memory.estimate(LLAMA_7B, **{**settings, "accumulate": "float64"}).peak
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert config_mod.resolve_accumulate(small) == "float64"
    assert config_mod.resolve_accumulate(big) == "float32"
    for value in ("float32", "float64"):  # a value set by hand is kept
        assert config_mod.resolve_accumulate(compose(["model=opt-tiny", f"curvature.accumulate={value}"])) == value
    with pytest.raises(ConfigError, match="curvature.accumulate"):
        validate(compose(["curvature.accumulate=float16"]), check_sources=False)


def test_bad_timeout_is_refused():
    with pytest.raises(ConfigError, match="distributed.timeout_s"):
        validate(compose(["distributed.timeout_s=0"]), check_sources=False)


def _python(run_dir, overrides, env=ENV, timeout=300):
    return subprocess.run([sys.executable, "run.py", *overrides, f"hydra.run.dir={run_dir}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _torchrun(run_dir, overrides, env=ENV, timeout=300):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port",
                           str(_free_port()), "tests/torchrun_entry.py", *overrides, f"hydra.run.dir={run_dir}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _torchrun_with_fault(run_dir, overrides, fault: str):
    """torchrun with the fault tests/torchrun_entry.py injects (`rank:shot[:hang]`); it must fail. Returns the
    process, its seconds and the run's (record, checkpoint)."""
    t0 = time.perf_counter()
    proc = _torchrun(run_dir, overrides, env={**ENV, "SURGEON_TEST_FAIL": fault})
    elapsed = time.perf_counter() - t0
    assert proc.returncode != 0
    return proc, elapsed, _load(run_dir)


def _load(run_dir):
    return (json.loads((run_dir / "record.json").read_text()),
            torch.load(run_dir / "checkpoint.pt", weights_only=False))


def _assert_same_run(one_dir, two_dir):
    (one, one_ckpt), (two, two_ckpt) = _load(one_dir), _load(two_dir)
    assert two["status"] == "complete" and len(two["points"]) == len(one["points"])
    for kind in ("removed", "rows", "cols"):
        for name, mask in one_ckpt["state"][kind].items():
            assert torch.equal(mask, two_ckpt["state"][kind][name]), (kind, name)
    # the same weights bit for bit (float32 sums split over the ranks move them by ~1e-5, masks or not)
    for name, tensors in one_ckpt["weights"].items():
        for key, tensor in tensors.items():
            assert torch.equal(tensor, two_ckpt["weights"][name][key]), (name, key)
    assert two["final_ppl"] == pytest.approx(one["final_ppl"], rel=1e-9)
    assert two["dense_ppl"] == pytest.approx(one["dense_ppl"], rel=1e-9)
    assert one["protocol"]["accumulate"] == two["protocol"]["accumulate"] == "float64"
    assert [p["layer_sparsity"] for p in two["points"]] == [p["layer_sparsity"] for p in one["points"]]
    return one, two


@pytest.mark.slow
@pytest.mark.parametrize("structure", [*STRUCTURES, *VARIANTS])
def test_torchrun_two_processes_match_one_process(structure, tmp_path, shared):
    overrides = [*SMALL, *{**STRUCTURES, **VARIANTS}[structure], f"results={tmp_path}/records.jsonl"]
    env = {**ENV, "WANDB_MODE": "offline"} if "logger=wandb" in overrides else ENV
    single = _python(tmp_path / "one", overrides, env)
    assert single.returncode == 0, single.stderr[-3000:]
    double = _torchrun(tmp_path / "two", overrides, env)
    assert double.returncode == 0, double.stderr[-3000:]
    one, two = _assert_same_run(tmp_path / "one", tmp_path / "two")
    assert (one["processes"], two["processes"]) == (1, 2)
    if structure.startswith("rank2"):  # the shrink factors of term 2, from both ranks
        assert two["points"][-1]["beta"] == one["points"][-1]["beta"]
    if "curvature.damping=auto" in overrides:
        for a, b in zip(one["points"], two["points"]):
            assert a["damping"]["chosen"] == b["damping"]["chosen"]
            assert [t["heldout_loss"] for t in a["damping"]["tried"]] == pytest.approx(
                [t["heldout_loss"] for t in b["damping"]["tried"]], rel=1e-9)
    if "save_model=true" in overrides:
        assert (tmp_path / "two" / "model" / "model.safetensors").is_file()
    if "compact=true" in overrides:
        assert two["compact"]["params"] == one["compact"]["params"] < one["compact"]["params_before"]
        assert two["compact"]["ppl"] == pytest.approx(one["compact"]["ppl"], rel=1e-9)
    if "logger=wandb" in overrides:
        assert len(list((tmp_path / "two" / "wandb").glob("offline-run-*"))) == 1
    if "quantize=w4g128" in overrides:
        assert two["quantize"]["ppl"] == pytest.approx(one["quantize"]["ppl"], rel=1e-9)
        assert two["quantize"]["baseline"]["ppl"] == pytest.approx(one["quantize"]["baseline"]["ppl"], rel=1e-9)
        assert two["quantize"]["export"]["bytes"] == one["quantize"]["export"]["bytes"]
    for point in two["points"]:  # every rank's phase seconds and peak, in rank order; none in one process
        assert len(point["ranks"]) == 2 and point["ranks"][0]["seconds"] == point["seconds"]
        assert all(set(r["seconds"]) == set(point["seconds"]) and r["peak_memory_mb"] > 0
                   and 0 < r["own_update_s"] <= r["seconds"]["update"] for r in point["ranks"])
    assert all("ranks" not in point for point in one["points"])
    if structure in ("unstructured", "semistructured"):  # both ranks' joint solves reach the record, in layer order
        assert list(two["points"][-1]["solves"]) == list(one["points"][-1]["solves"])
    # one record, one line in the results, written by rank 0
    lines = (tmp_path / "records.jsonl").read_text().splitlines()
    assert len(lines) == 2 and {json.loads(line)["run_id"] for line in lines} == {one["run_id"], two["run_id"]}


@pytest.mark.slow
def test_a_sweep_under_torchrun_runs_every_job_over_both_processes(tmp_path, shared):
    """`torchrun ... run.py -m a=x,y`: the jobs share one process group (joined once per process); before, the
    second job's init_process_group waited for ever on torchrun's store."""
    overrides = ["-m", *SMALL, "shots=1", "structure=structured", "target=0.2,0.3", f"results={tmp_path}/r.jsonl",
                 f"hydra.sweep.dir={tmp_path}/sweep"]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port",
                           str(_free_port()), "tests/torchrun_entry.py", *overrides], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert [(r["status"], r["processes"], r["protocol"]["target"]) for r in records] == [
        ("complete", 2, 0.2), ("complete", 2, 0.3)]
    assert records[0]["final_ppl"] < records[1]["final_ppl"]


@pytest.mark.slow
def test_failing_rank_stops_all_ranks_and_the_run_resumes(tmp_path, shared):
    """Rank 1 fails in shot 2: torchrun ends promptly with an error, rank 0's record names rank 1's error and
    the checkpoint holds shot 1; resuming under torchrun finishes the run as one process does."""
    overrides = [*SMALL, *STRUCTURES["structured"], "eval.every=1", f"results={tmp_path}/records.jsonl"]
    run_dir = tmp_path / "two"
    failed, elapsed, (record, ckpt) = _torchrun_with_fault(run_dir, overrides, "1:2")
    assert "injected failure of rank 1 in shot 2" in failed.stderr
    assert record["status"] == "failed"
    assert record["error"].startswith("rank 1: RuntimeError: injected failure of rank 1 in shot 2"), record["error"]
    assert ckpt["shot"] == 1 and [p["shot"] for p in record["points"]] == [1]
    assert elapsed < 240, f"the ranks took {elapsed:.0f} s to stop"

    resumed = _torchrun(run_dir, [*overrides, "resume=true"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _load(run_dir)[0]["resumed_from_shot"] == 1
    single = _python(tmp_path / "one", overrides)
    assert single.returncode == 0, single.stderr[-3000:]
    _assert_same_run(tmp_path / "one", run_dir)


@pytest.mark.slow
def test_a_hanging_rank_stops_the_run_at_the_collective_timeout(tmp_path, shared):
    """Rank 1 hangs in shot 2 (no error, no exit): rank 0 gives up at distributed.timeout_s, records the
    failure, and torchrun stops the hanging rank; nothing waits for ever."""
    overrides = [*SMALL, *STRUCTURES["structured"], "distributed.timeout_s=15", f"results={tmp_path}/records.jsonl"]
    run_dir = tmp_path / "two"
    _, elapsed, (record, ckpt) = _torchrun_with_fault(run_dir, overrides, "1:2:hang")
    assert record["status"] == "failed" and record["error"].startswith("rank 0:"), record["error"]
    assert ckpt["shot"] == 1
    assert elapsed < 200, f"the ranks took {elapsed:.0f} s to stop"


def _slurm_task(rank: int, port: int, overrides: list[str], run_dir):
    """One task of a SLURM job step of 2 on this machine, as submitit's launcher starts it (srun, no torchrun)."""
    env = {**ENV, "SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "4242", "SLURM_NTASKS": "2",
           "SLURM_STEP_NUM_TASKS": "2", "SLURM_JOB_NUM_NODES": "1", "SLURM_JOB_NODELIST": "localhost",
           "SLURM_NODEID": "0", "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank), "MASTER_PORT": str(port)}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR"):
        env.pop(key, None)
    return subprocess.Popen([sys.executable, "run.py", *overrides, f"hydra.run.dir={run_dir}"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_two_slurm_tasks_launched_by_submitit_match_one_process(tmp_path, shared):
    """The tasks of a `+cluster=slurm` job with tasks_per_node=2 (simulated on this machine: SLURM's and
    submitit's variables, no srun) form the process group from SLURM's variables and match one process."""
    overrides = [*SMALL, *STRUCTURES["structured"], f"results={tmp_path}/records.jsonl"]
    port = _free_port()
    tasks = [_slurm_task(rank, port, overrides, tmp_path / "two") for rank in (0, 1)]
    for task in tasks:
        _, err = task.communicate(timeout=300)
        assert task.returncode == 0, err[-3000:]
    single = _python(tmp_path / "one", overrides)
    assert single.returncode == 0, single.stderr[-3000:]
    one, two = _assert_same_run(tmp_path / "one", tmp_path / "two")
    assert two["processes"] == 2
