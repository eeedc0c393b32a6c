"""curvature.damping=auto (docs/algorithm.md section 5): held-out windows, the candidate order, the predicted loss
increase against a brute-force per-token Fisher, the search keeping its best try exactly, two processes, the
runner's record, resume and the refusals."""
import json

import pytest
import torch
import torch.multiprocessing as mp
from transformers import AutoModelForCausalLM, OPTConfig

from conftest import compose
from surgeon import data as data_mod
from surgeon import runner
from surgeon.adapters import adapter_for, weight_with_bias
from surgeon.config import ConfigError, validate
from surgeon.curvature import estimate_curvature
from surgeon import prune
from surgeon.prune import (PruneState, ShotOptions, _choice, _exponents, _paired_se, _Shot, _Snapshot,
                          predicted_increase, prune_shot)

SMALL = ["calib.n=8", "calib.seq_len=64", "calib.batch_size=4", "eval.max_windows=4", "eval.seq_len=128",
         "curvature.auto_damping.heldout=4"]


def tiny_opt(seed: int = 0):
    torch.manual_seed(seed)
    config = OPTConfig(hidden_size=32, ffn_dim=96, num_hidden_layers=2, num_attention_heads=2, vocab_size=64,
                       max_position_embeddings=64, word_embed_proj_dim=32)
    model = AutoModelForCausalLM.from_config(config).eval()
    return model, adapter_for("opt").layers(model)


def tiny_data():
    gen = torch.Generator().manual_seed(1)
    batches = list(torch.randint(0, 64, (8, 16), generator=gen).split(2))
    heldout = torch.randint(0, 64, (4, 16), generator=gen)
    return batches, heldout


def test_heldout_windows_share_no_token_with_the_calibration_windows():
    ids = torch.arange(5000)  # token i at offset i: a window's ids are its span
    starts = data_mod.calibration_starts(ids, 16, 64, 100)
    calib = data_mod.calibration_windows(ids, 16, 64, 100)
    assert torch.equal(calib[:, 0], starts)
    held = data_mod.heldout_windows(ids, 8, 64, data_mod.heldout_seed(100), starts)
    again = data_mod.heldout_windows(ids, 8, 64, data_mod.heldout_seed(100), starts)
    assert held.shape == (8, 64) and torch.equal(held, again)
    used = set(calib.flatten().tolist())
    assert not used & set(held.flatten().tolist())
    assert len(set(held.flatten().tolist())) == 8 * 64  # nor with each other
    with pytest.raises(ConfigError, match="no room for 200 held-out windows"):
        data_mod.heldout_windows(ids, 200, 64, 101, starts)


def test_candidates_bracket_the_previous_scale_then_go_out_where_an_end_is_best():
    def order(losses: dict, tries: int):
        tried = {}
        for k in _exponents(tries, tried):
            tried[k] = {"heldout_loss": losses[k]}
        return list(tried)

    valley = {k: (k - 3) ** 2 for k in range(-5, 6)}  # best at k = 3
    assert order(valley, 3) == [0, 1, -1]
    assert order(valley, 5) == [0, 1, -1, 2, 3]
    assert order(valley, 9) == [0, 1, -1, 2, 3, 4]  # 3 is inside: stop
    assert order({k: (k + 2) ** 2 for k in range(-5, 6)}, 6) == [0, 1, -1, -2, -3]
    assert order({k: abs(k) for k in range(-5, 6)}, 6) == [0, 1, -1]  # the centre is best
    assert order(valley, 2) == [0, 1]


def test_monotone_candidates_only_go_up_from_the_previous_scale():
    def order(losses: dict, tries: int):
        tried = {}
        for k in _exponents(tries, tried, upward=True):
            tried[k] = {"heldout_loss": losses[k]}
        return list(tried)

    assert order({k: (k - 3) ** 2 for k in range(-5, 6)}, 9) == [0, 1, 2, 3, 4]
    assert order({k: (k + 2) ** 2 for k in range(-5, 6)}, 9) == [0, 1]  # smaller would be better: not tried
    assert order({k: (k - 3) ** 2 for k in range(-5, 6)}, 3) == [0, 1, 2]


def test_the_within_se_rule_takes_the_most_damped_try_the_windows_cannot_tell_from_the_lowest():
    """By hand: the paired standard error over windows, and which try each rule picks."""
    t = torch.tensor
    losses = {0: t([1.0, 1.0, 1.0, 1.0]), 1: t([1.1, 1.1, 1.1, 1.1]), -1: t([0.4, 1.5, 0.4, 1.5])}
    d = losses[1] - losses[-1]  # 0.7, -0.4, 0.7, -0.4: mean 0.15, sample sd 0.635
    assert _paired_se(losses[1], losses[-1]) == pytest.approx(d.std().item() / 2) == pytest.approx(0.31754, rel=1e-4)
    assert _choice(losses, "lowest") == -1
    assert _choice(losses, "within_se") == 1  # 0.15 <= 0.3175, and 1 is the largest scale
    assert _choice({0: losses[0], 1: losses[1]}, "within_se") == 0  # 0.1 above, with no spread: told apart
    losses[2] = t([0.9, 2.5, 0.9, 2.5])  # 0.5, 1.0, 0.5, 1.0 above -1: mean 0.75, standard error 0.144
    assert _paired_se(losses[2], losses[-1]) == pytest.approx(0.14434, rel=1e-4)
    assert _choice(losses, "within_se") == 1
    assert _choice({5: t([2.0]), 6: t([2.0])}, "lowest") == 5  # ties: the earlier try


@pytest.mark.parametrize("rank", [1, 2])
def test_predicted_increase_is_half_the_step_under_the_kronecker_fisher(rank):
    """Brute force (float64): 1/2 T (T-1) sum over layers of vec(D)^T (G (x) A [+ G2 (x) A2]) vec(D) with the
    Kronecker products formed, D = the change of each layer's weights and bias since the snapshot."""
    model, layers = tiny_opt()
    model.double()
    batches, _ = tiny_data()
    some = [l for l in layers if l.name.endswith(("fc1", "k_proj"))]
    factors = estimate_curvature(model, some, batches, rank=rank, rank2_iters=2, accumulate="float64")
    start = _Snapshot.take(layers, PruneState.empty(layers))
    gen = torch.Generator().manual_seed(3)
    brute = 0.0
    with torch.no_grad():
        for layer in some:
            W = start.weights[layer.name]
            D = torch.randn(W.shape, generator=gen, dtype=torch.float64)
            layer.module.weight.copy_(W[:, :-1] + D[:, :-1])
            layer.module.bias.copy_(W[:, -1] + D[:, -1])
            f = factors[layer.name]
            F = torch.kron(f.G, f.A) + (torch.kron(f.G2, f.A2) if rank == 2 else 0)
            brute += 0.5 * (D.flatten() @ F @ D.flatten()).item()
    T = batches[0].shape[1]
    shot = _Shot(model, layers, [torch.device("cpu")], PruneState.empty(layers), 0.5,
                 {l.name: 0 for l in layers}, layers, False)
    assert predicted_increase(shot, factors, start, T) == pytest.approx(T * (T - 1) * brute, rel=1e-10)


@pytest.mark.parametrize("overrides", [dict(structure="unstructured", damping_g=0.1),
                                       dict(structure="structured"),
                                       dict(structure="structured", method="kobd", correlation="none"),
                                       dict(structure="unstructured", rank=2, damping_g=0.1)])
def test_the_search_keeps_its_best_try_exactly(overrides):
    """Every try starts from the shot's start (its measured increase is against the same loss), the chosen scale
    has the lowest held-out loss, and the model and masks are those of a fixed-damping shot at the chosen
    damping from the same start."""
    batches, heldout = tiny_data()
    base = dict(damping_a=0.01, damping_g=0.01, tol=1e-10, max_iter=2000, accumulate="float64", tries=4,
                choose="lowest", try_tol=None) | overrides  # tries solved to tol (the loose ones: below)
    model, layers = tiny_opt()
    state = PruneState.empty(layers)
    prune_shot(model, layers, batches, state, 0.2, ShotOptions(**base), seed=1)  # a shot before: not a dense start
    fixed_model, fixed_layers = tiny_opt()
    fixed_model.load_state_dict(model.state_dict())
    fixed_state = PruneState.from_state_dict(state.state_dict(), fixed_layers)

    seconds, info = prune_shot(model, layers, batches, state, 0.4, ShotOptions(**base, damping="auto"), seed=2,
                               heldout=heldout, scale=3.0)
    account = info["damping"]
    tried = account["tried"]
    assert len(tried) >= 3 and [t["scale"] for t in tried[:3]] == pytest.approx([3.0, 9.0, 1.0])
    best = min(tried, key=lambda t: t["heldout_loss"])
    assert account["chosen"] == best["scale"] and account["heldout_loss"] == best["heldout_loss"]
    for t in tried:
        assert t["measured"] == pytest.approx(t["heldout_loss"] - account["before"], abs=1e-12)
        assert t["damping_a"] == pytest.approx(base["damping_a"] * t["scale"])
        assert t["damping_g"] == pytest.approx(base["damping_g"] * t["scale"])
    assert len({round(t["heldout_loss"], 12) for t in tried}) > 1, "the dampings made no difference: a weak test"
    assert account["predicted"] > 0 and account["ratio"] == pytest.approx(account["measured"] / account["predicted"])
    assert {"curvature", "costs", "update", "damping"} <= set(seconds)

    chosen = ShotOptions(**base | dict(damping_a=account["damping_a"], damping_g=account["damping_g"]))
    prune_shot(fixed_model, fixed_layers, batches, fixed_state, 0.4, chosen, seed=2)
    for a, b in zip(layers, fixed_layers):
        assert torch.allclose(weight_with_bias(a.module), weight_with_bias(b.module), rtol=0, atol=1e-6), a.name
        assert torch.equal(state.removed[a.name], fixed_state.removed[b.name])
    assert runner.perplexity(model, heldout) == pytest.approx(runner.perplexity(fixed_model, heldout), rel=1e-6)


def test_a_try_chosen_after_later_tries_is_solved_again_exactly(monkeypatch):
    """within_se can pick a try that was not the pick when it was made (no copy kept): the search solves it
    once more from the shot's start, and the model is that of a fixed-damping shot at its damping."""
    batches, heldout = tiny_data()
    t = torch.tensor
    # before the shot, then tries k = 0, 1, -1, -2: k = 1 is told apart from k = 0, then within one standard
    # error of k = -1, the lowest
    fake = iter([t([5.0] * 4), t([1.0] * 4), t([1.1] * 4), t([0.4, 1.5, 0.4, 1.5]), t([2.0] * 4)])
    base = dict(structure="unstructured", damping_a=0.01, damping_g=0.1, tol=1e-10, max_iter=2000,
                accumulate="float64", tries=4, try_tol=None)
    model, layers = tiny_opt()
    state = PruneState.empty(layers)
    with monkeypatch.context() as m:
        m.setattr(prune, "heldout_losses", lambda model, windows: next(fake))
        seconds, info = prune_shot(model, layers, batches, state, 0.3,
                                   ShotOptions(**base, damping="auto", choose="within_se"), seed=2, heldout=heldout)
    account = info["damping"]
    assert [t["scale"] for t in account["tried"]] == pytest.approx([1.0, 3.0, 1 / 3, 1 / 9])
    assert account["chosen"] == pytest.approx(3.0) and account["heldout_loss"] == pytest.approx(1.1)
    assert [t["se"] for t in account["tried"]] == pytest.approx([0.31754, 0.31754, 0.0, 0.31754], rel=1e-4)
    fixed_model, fixed_layers = tiny_opt()
    fixed_state = PruneState.empty(fixed_layers)
    prune_shot(fixed_model, fixed_layers, batches, fixed_state, 0.3,
               ShotOptions(**base | dict(damping_a=account["damping_a"], damping_g=account["damping_g"])), seed=2)
    for a, b in zip(layers, fixed_layers):
        assert torch.allclose(weight_with_bias(a.module), weight_with_bias(b.module), rtol=0, atol=1e-6), a.name
        assert torch.equal(state.removed[a.name], fixed_state.removed[b.name])


def test_a_monotone_search_after_the_first_shot_tries_no_smaller_scale():
    batches, heldout = tiny_data()
    model, layers = tiny_opt()
    state = PruneState.empty(layers)
    opts = ShotOptions(structure="structured", damping_a=0.01, damping_g=0.01, accumulate="float64", tries=4,
                       damping="auto", monotone=True)
    _, first = prune_shot(model, layers, batches, state, 0.2, opts, seed=1, heldout=heldout, scale=1.0, first=True)
    assert [t["scale"] for t in first["damping"]["tried"][:3]] == pytest.approx([1.0, 3.0, 1 / 3])
    _, later = prune_shot(model, layers, batches, state, 0.4, opts, seed=2, heldout=heldout, scale=3.0, first=False)
    scales = [t["scale"] for t in later["damping"]["tried"]]
    assert scales[:2] == pytest.approx([3.0, 9.0]) and min(scales) == pytest.approx(3.0)
    assert later["damping"]["chosen"] >= 3.0


def _auto_shots(try_tol=None):
    model, layers = tiny_opt()
    batches, heldout = tiny_data()
    state, out = PruneState.empty(layers), []
    opts = ShotOptions(structure="unstructured", damping_a=0.01, damping_g=0.1, tol=1e-8, max_iter=500,
                       accumulate="float64", damping="auto", tries=4, choose="lowest", try_tol=try_tol)
    scale = 1.0
    for shot in (1, 2):
        _, info = prune_shot(model, layers, batches, state, 0.25 * shot, opts, seed=shot, heldout=heldout,
                             scale=scale)
        scale = info["damping"]["chosen"]
        out.append({"damping": info["damping"], "masks": {k: v.tolist() for k, v in state.removed.items()}})
    return out


def _auto_shots_loose():
    return _auto_shots(try_tol=1e-3)


@pytest.mark.parametrize("shots", [_auto_shots, _auto_shots_loose])
def test_two_processes_choose_as_one_process(tmp_path, shots):
    """Two gloo processes (held-out loss split over the ranks, predictions summed over the layers' owners): the
    same tries, losses and choice as one process, and the same masks; also with loose tries refined (each rank
    its own layers' solutions)."""
    from test_distributed import _balance_worker, _free_port

    mp.start_processes(_balance_worker, args=(_free_port(), str(tmp_path / "out"), shots), nprocs=2,
                       start_method="spawn")
    ranks = [json.loads((tmp_path / f"out.{rank}").read_text()) for rank in (0, 1)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = shots()
    finally:
        torch.set_num_threads(threads)
    for shots in ranks:
        for shot, alone in zip(shots, one):
            assert shot["masks"] == alone["masks"]
            assert shot["damping"]["chosen"] == alone["damping"]["chosen"]
            for a, b in zip(shot["damping"]["tried"], alone["damping"]["tried"]):
                assert a["scale"] == b["scale"]
                assert a["heldout_loss"] == pytest.approx(b["heldout_loss"], rel=1e-9)
                assert a["measured"] == pytest.approx(b["measured"], rel=1e-9)
            assert shot["damping"]["predicted"] == pytest.approx(alone["damping"]["predicted"], rel=1e-6)
            assert shot["damping"].get("try_tol") == alone["damping"].get("try_tol")


def test_a_run_records_its_search_and_resumes_with_the_same_choices(tmp_path, shared, monkeypatch, capsys):
    args = [*SMALL, "model=opt-tiny", "structure=structured", "target=0.4", "shots=3", "curvature.damping=auto",
            f"results={tmp_path}/records.jsonl"]
    full = runner.run(compose(args), tmp_path / "full")
    assert full["protocol"]["damping"] == "auto"
    assert full["protocol"]["auto_damping"] == {"heldout": 4, "heldout_seed": 101, "step": 3.0, "tries": 4,
                                                "choose": "within_se", "monotone": False, "every": 1, "tol": 0.001}
    chosen = [p["damping"]["chosen"] for p in full["points"]]
    for p, center in zip(full["points"], [1.0, *chosen]):  # each shot searches around the previous choice
        assert p["damping"]["tried"][0]["scale"] == pytest.approx(center)
        assert p["seconds"]["damping"] > 0
    table = capsys.readouterr().out
    assert "damping_a" in table and f"{full['points'][-1]['damping']['damping_a']:.4g}" in table

    real_shot = runner._shot

    def stop_at_two(job, shot, target, opts):
        if shot == 2:
            raise KeyboardInterrupt
        real_shot(job, shot, target, opts)

    monkeypatch.setattr(runner, "_shot", stop_at_two)
    with pytest.raises(KeyboardInterrupt):
        runner.run(compose(args), tmp_path / "cut")
    monkeypatch.setattr(runner, "_shot", real_shot)
    resumed = runner.run(compose([*args, "resume=true"]), tmp_path / "cut")
    assert resumed["resumed_from_shot"] == 1
    assert [p["damping"]["chosen"] for p in resumed["points"]] == chosen
    assert [p["damping"]["tried"] for p in resumed["points"]] == [p["damping"]["tried"] for p in full["points"]]
    assert resumed["final_ppl"] == pytest.approx(full["final_ppl"], rel=1e-9)


def test_a_search_every_second_shot_keeps_its_choice_between(tmp_path):
    """curvature.auto_damping.every=2 over 3 shots: shots 1 and 3 search (3 around 1's choice), shot 2 is a
    fixed-damping shot at shot 1's choice (no tries, no held-out evaluation); with choose=within_se the choice
    is the largest scale within one standard error of the lowest."""
    args = [*SMALL, "model=opt-tiny", "structure=structured", "target=0.4", "shots=3", "curvature.damping=auto",
            "curvature.auto_damping.every=2", "curvature.auto_damping.choose=within_se",
            f"results={tmp_path}/records.jsonl"]
    rec = runner.run(compose(args), tmp_path / "run")
    assert rec["protocol"]["auto_damping"]["every"] == 2
    one, two, three = (p["damping"] for p in rec["points"])
    assert len(one["tried"]) >= 3 and two["tried"] == [] and len(three["tried"]) >= 3
    assert two["chosen"] == one["chosen"] and two["damping_a"] == pytest.approx(0.01 * one["chosen"])
    assert "damping" not in rec["points"][1]["seconds"] and three["tried"][0]["scale"] == pytest.approx(one["chosen"])
    for d in (one, three):
        lowest = min(d["tried"], key=lambda t: t["heldout_loss"])
        within = [t["scale"] for t in d["tried"] if t["heldout_loss"] - lowest["heldout_loss"] <= t["se"] + 1e-15]
        assert d["chosen"] == max(within)


@pytest.mark.parametrize("override, message", [
    (["method=sparsegpt", "structure=unstructured", "target=0.5"], "method=sparsegpt has none"),
    (["method=magnitude"], "identity curvature"),
    (["curvature.damping_a=0", "curvature.damping_g=0"], "both 0"),
    (["curvature.auto_damping.step=1"], "step=1 must be a factor > 1"),
    (["curvature.auto_damping.tries=1"], "tries=1 must be an integer >= 2"),
    (["curvature.auto_damping.heldout=0"], "heldout=0 must be a positive integer"),
    (["curvature.damping=lm"], "curvature.damping"),
    (["curvature.auto_damping.choose=median"], "curvature.auto_damping.choose"),
    (["curvature.auto_damping.every=0"], "every=0 must be a positive integer"),
    (["curvature.auto_damping.monotone=sometimes"], "monotone='sometimes' must be true or false"),
    (["curvature.auto_damping.tol=1"], "tol=1 must be a relative residual in \\(0, 1\\)"),
    (["curvature.auto_damping.tol=fast"], "tol='fast' must be a relative residual"),
])
def test_bad_auto_damping_settings_are_refused_up_front(override, message):
    damping = [] if override == ["curvature.damping=lm"] else ["curvature.damping=auto"]
    with pytest.raises(ConfigError, match=message):
        validate(compose([*damping, *override]), check_sources=False)


def test_records_before_auto_damping_read_as_fixed():
    from surgeon.records import upgrade

    old = {"protocol": {"method": "surgeon"}, "config": {"curvature": {"kind": "kfac"}}}
    new = upgrade(old)
    assert new["protocol"]["damping"] == "fixed" and new["config"]["curvature"]["damping"] == "fixed"
    fresh = compose([])
    old_rule = dict(fresh.curvature.auto_damping) | {"choose": "lowest", "tol": None}  # the only rule then
    assert new["config"]["curvature"]["auto_damping"] == old_rule
    assert new["protocol"]["auto_damping"] is None
    before = upgrade({"protocol": {"damping": "auto", "auto_damping": {"heldout": 8, "heldout_seed": 101, "step": 3.0,
                                                                      "tries": 4}},
                      "config": {"curvature": {"damping": "auto", "auto_damping": {"heldout": 8, "step": 3.0,
                                                                                   "tries": 4}}}})
    assert before["protocol"]["auto_damping"]["choose"] == "lowest" and not before["protocol"]["auto_damping"]["monotone"]
    assert before["config"]["curvature"]["auto_damping"] == old_rule


def test_loose_tries_refined_give_the_tight_search():
    """curvature.auto_damping.tol: the tries' joint solves stop at 1e-3, their held-out losses are the tight
    tries' (to 1e-5), the search picks the same scale, and the chosen try refined from its solutions is the model
    of a fixed-damping shot at that damping to update.tol; the tries' iterations are recorded and fewer."""
    batches, heldout = tiny_data()
    base = dict(structure="unstructured", damping_a=0.01, damping_g=0.1, tol=1e-10, max_iter=2000,
                accumulate="float64", tries=4, damping="auto")
    accounts, models = {}, {}
    for try_tol in (None, 1e-3):
        model, layers = tiny_opt()
        state = PruneState.empty(layers)
        _, info = prune_shot(model, layers, batches, state, 0.4, ShotOptions(**base, try_tol=try_tol), seed=2,
                             heldout=heldout)
        accounts[try_tol], models[try_tol] = info["damping"], (model, layers, state, info["solves"])
    tight, loose = accounts[None], accounts[1e-3]
    assert loose["try_tol"] == 1e-3 and "try_tol" not in tight
    assert [t["scale"] for t in loose["tried"]] == [t["scale"] for t in tight["tried"]]
    for a, b in zip(loose["tried"], tight["tried"]):
        assert a["heldout_loss"] == pytest.approx(b["heldout_loss"], abs=1e-5)
        assert 0 < a["iterations"] < b["iterations"]
    assert loose["chosen"] == tight["chosen"]
    assert loose["heldout_loss"] == pytest.approx(tight["heldout_loss"], abs=1e-9)  # the refined model's loss
    model, layers, state, solves = models[1e-3]
    assert all(s["converged"] and s["residual"] <= 1e-10 for s in solves.values())
    fixed_model, fixed_layers = tiny_opt()
    fixed_state = PruneState.empty(fixed_layers)
    chosen = base | dict(damping="fixed", damping_a=loose["damping_a"], damping_g=loose["damping_g"])
    _, fixed = prune_shot(fixed_model, fixed_layers, batches, fixed_state, 0.4, ShotOptions(**chosen), seed=2)
    for a, b in zip(layers, fixed_layers):
        assert torch.allclose(weight_with_bias(a.module), weight_with_bias(b.module), rtol=0, atol=1e-7), a.name
        assert torch.equal(state.removed[a.name], fixed_state.removed[b.name])
    # the refinement started from the try's solutions: fewer iterations than the fixed shot's cold solves
    assert sum(s["iterations"] for s in solves.values()) < sum(s["iterations"] for s in fixed["solves"].values())
