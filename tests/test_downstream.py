"""lm-eval on the in-memory testbed model, checked against scoring the same questions by hand."""
from __future__ import annotations

import json
import os
from pathlib import Path

import lm_eval
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from surgeon.adapters import adapter_for
from surgeon.downstream import run_lm_eval

SHARED = Path(os.environ.get("SURGEON_SHARED", Path(__file__).resolve().parents[2] / "shared"))
MODEL = SHARED / "models" / "opt-tiny-wt2"
TASKS = Path(__file__).resolve().parent / "lm_eval_tasks"
LIMIT = 24


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """lm-eval results for the dense model and for it with every prunable layer zeroed."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setenv("HF_HUB_OFFLINE", "1")
        # the task folder must work from any working directory, not only the project root
        mp.chdir(tmp_path_factory.mktemp("elsewhere"))
        tokenizer = AutoTokenizer.from_pretrained(MODEL)
        model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32)
        dense = evaluate(model, tokenizer)
        with torch.no_grad():
            for layer in adapter_for(model.config.model_type).layers(model):
                layer.module.weight.zero_()
                layer.module.bias.zero_()
        return {"dense": dense, "zeroed": evaluate(model, tokenizer)}


def evaluate(model, tokenizer) -> tuple[dict, float]:
    """run_lm_eval's record on both local tasks, and the multiple-choice accuracy scored by hand."""
    tasks = ["wikitext_mc", "wikitext_ppl"]
    record = run_lm_eval(model, tokenizer, tasks, include_path=str(TASKS), limit=LIMIT)
    return record, brute_force_accuracy(model, tokenizer)


def brute_force_accuracy(model, tokenizer) -> float:
    """Share of the first LIMIT questions whose true ending has the best log-likelihood per char."""
    lines = (TASKS / "wikitext_mc.jsonl").read_text(encoding="utf-8").splitlines()[:LIMIT]
    correct = 0
    for q in map(json.loads, lines):
        context = tokenizer(q["context"])["input_ids"]
        scores = []
        for choice in q["choices"]:
            ending = tokenizer(" " + choice)["input_ids"]
            with torch.no_grad():
                logp = model(torch.tensor([context + ending])).logits[0].log_softmax(-1)
            positions = torch.arange(len(context) - 1, len(context) + len(ending) - 1)
            scores.append(logp[positions, torch.tensor(ending)].sum().item() / len(choice))
        correct += max(range(len(scores)), key=scores.__getitem__) == q["label"]
    return correct / len(lines)


def test_record_is_well_formed(results):
    record, _ = results["dense"]
    assert record["version"] == lm_eval.__version__
    assert record["limit"] == LIMIT
    assert set(record["tasks"]) == {"wikitext_mc", "wikitext_ppl"}
    mc, ppl = record["tasks"]["wikitext_mc"], record["tasks"]["wikitext_ppl"]
    assert mc["metric"] == "acc_norm" and set(mc["all"]) == {"acc", "acc_norm"}
    assert 0.0 <= mc["value"] <= 1.0 and mc["value"] == mc["all"]["acc_norm"]
    assert mc["stderr"] > 0
    assert mc["num_fewshot"] == 0 and mc["version"] == 1.0
    # no acc: the first metric lm-eval reports, and perplexities have no stderr
    assert ppl["metric"] == "word_perplexity" and ppl["stderr"] is None
    assert set(ppl["all"]) == {"word_perplexity", "byte_perplexity", "bits_per_byte"}
    json.dumps(record)  # goes into JSON-lines result records as is


@pytest.mark.parametrize("state", ["dense", "zeroed"])
def test_accuracy_matches_scoring_by_hand(results, state):
    record, by_hand = results[state]
    assert record["tasks"]["wikitext_mc"]["value"] == pytest.approx(by_hand, abs=1e-12)


def test_dense_model_beats_chance_and_zeroed_model_scores_worse(results):
    dense, zeroed = results["dense"][0]["tasks"], results["zeroed"][0]["tasks"]
    # four choices: chance is 0.25
    assert dense["wikitext_mc"]["value"] >= 0.5
    assert zeroed["wikitext_mc"]["value"] < dense["wikitext_mc"]["value"]
    assert zeroed["wikitext_ppl"]["value"] > 10 * dense["wikitext_ppl"]["value"]


def test_unknown_task_is_refused_before_any_model_work():
    # no model at all: the names are checked first
    with pytest.raises(ValueError, match=r"eval\.lm_eval\.tasks.*wikitext_mcq"):
        run_lm_eval(None, None, ["wikitext_mc", "wikitext_mcq"], include_path=str(TASKS))
