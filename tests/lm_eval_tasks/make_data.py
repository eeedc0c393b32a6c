"""Writes wikitext_mc.jsonl, sentence-completion questions from the WikiText-2 test split,
and loads it for the lm-eval tasks in this folder.

Each question gives the first half of a test sentence as context and four candidate
endings: the true one and three copies of it with two of its words swapped. The
testbed models never saw the test split; word order is what a small model learns
first (the dense opt-tiny-wt2 gets 0.65 of the 40 right, chance is 0.25, and 0.1 with
the weights of its prunable layers zeroed). Same words, same length: no unigram or
length bias picks the answer.

Run once from anywhere: `python tests/lm_eval_tasks/make_data.py` (reads
`$SURGEON_SHARED/data/wikitext-2/test.txt`, default `../shared` beside the project).
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

import datasets

HERE = Path(__file__).resolve().parent
SHARED = Path(os.environ.get("SURGEON_SHARED", HERE.parents[2] / "shared"))
OUT = HERE / "wikitext_mc.jsonl"

N_QUESTIONS = 40
N_CHOICES = 4
SEED = 0


def sentences(text: str, min_words: int = 14, max_words: int = 32) -> list[list[str]]:
    """Whole sentences of the tokenised release (split on " . "), headings dropped."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("="):
            continue
        for sentence in line.split(" . ")[:-1]:  # the last piece may be an unfinished sentence
            words = sentence.split() + ["."]
            if min_words <= len(words) <= max_words and words.count("<unk>") <= 1:
                out.append(words)
    return out


def swapped(words: list[str], rng: random.Random) -> str:
    """`words` with two positions exchanged."""
    i, j = rng.sample(range(len(words)), 2)
    words = list(words)
    words[i], words[j] = words[j], words[i]
    return " ".join(words)


def question(words: list[str], rng: random.Random) -> dict:
    context, ending = words[: len(words) // 2], words[len(words) // 2 :]
    answer = " ".join(ending)
    distractors: set[str] = set()
    while len(distractors) < N_CHOICES - 1:  # swapping two equal words changes nothing
        distractors.add(swapped(ending, rng))
        distractors.discard(answer)
    choices = [answer, *sorted(distractors)]
    rng.shuffle(choices)
    return {"context": " ".join(context), "choices": choices, "label": choices.index(answer)}


def load(**_task_metadata) -> datasets.DatasetDict:
    """The questions as lm-eval's `custom_dataset`, read next to this file from any directory."""
    rows = [json.loads(line) for line in OUT.read_text(encoding="utf-8").splitlines()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def main() -> None:
    rng = random.Random(SEED)
    pool = sentences((SHARED / "data" / "wikitext-2" / "test.txt").read_text(encoding="utf-8"))
    with OUT.open("w", encoding="utf-8") as f:
        for words in rng.sample(pool, N_QUESTIONS):
            f.write(json.dumps(question(words, rng)) + "\n")
    print(f"wrote {N_QUESTIONS} questions to {OUT}")


if __name__ == "__main__":
    main()
