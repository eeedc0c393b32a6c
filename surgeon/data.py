"""Calibration and evaluation data (docs/protocol.md).

Calibration: `calib.n` windows of `calib.seq_len` tokens at seeded random offsets of the
training text, tokenised once. Evaluation: non-overlapping windows of `eval.seq_len`
tokens of the test text, remainder dropped.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .paths import ConfigError


@dataclass
class Texts:
    calib: str
    eval: str
    calib_source: str
    eval_source: str
    eval_split: str


def _read(path: str) -> str:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"data file not found: {p} (set data paths or SURGEON_SHARED)")
    return p.read_text(encoding="utf-8")


def load_texts(data_cfg) -> Texts:
    """The calibration and evaluation text of a data preset (`data=testbed|wikitext2|text`)."""
    if data_cfg.name in ("testbed", "text"):
        return Texts(
            calib=_read(data_cfg.calib_path),
            eval=_read(data_cfg.eval_path),
            calib_source=str(data_cfg.calib_path),
            eval_source=str(data_cfg.eval_path),
            eval_split=str(data_cfg.get("eval_split", "test")),
        )
    if data_cfg.name == "wikitext2":
        from datasets import load_dataset

        try:
            ds = load_dataset(data_cfg.hub_path, data_cfg.hub_name)
        except Exception as err:  # noqa: BLE001 - datasets raises many kinds when offline
            raise RuntimeError(
                f"could not load {data_cfg.hub_path}/{data_cfg.hub_name} from the Hugging Face hub ({err}); "
                "offline? use data=testbed or data=text with data.calib_path/data.eval_path"
            ) from err
        return Texts(
            calib=" ".join(ds["train"]["text"]),
            eval="\n\n".join(ds["test"]["text"]),
            calib_source=f"{data_cfg.hub_path}/{data_cfg.hub_name}:train",
            eval_source=f"{data_cfg.hub_path}/{data_cfg.hub_name}:test",
            eval_split="test",
        )
    raise ValueError(f"unknown data preset '{data_cfg.name}'; valid: testbed, wikitext2, text")


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """The whole text as one 1-D tensor of token ids, tokenised once."""
    return torch.tensor(tokenizer(text, return_attention_mask=False)["input_ids"], dtype=torch.long)


def calibration_starts(ids: torch.Tensor, n: int, seq_len: int, seed: int) -> torch.Tensor:
    """The offsets of `calibration_windows`."""
    if ids.numel() <= seq_len:
        raise ConfigError(f"calibration text has {ids.numel()} tokens, fewer than calib.seq_len={seq_len}; "
                          "use a longer text (data.calib_path) or a smaller calib.seq_len")
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, ids.numel() - seq_len, (n,), generator=gen)


def calibration_windows(ids: torch.Tensor, n: int, seq_len: int, seed: int) -> torch.Tensor:
    """(n, seq_len) windows at random offsets, seeded by `calib.seed`."""
    starts = calibration_starts(ids, n, seq_len, seed)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])


def heldout_seed(calib_seed: int) -> int:
    """The seed of the held-out windows of curvature.damping=auto: the one after the calibration seed."""
    return calib_seed + 1


def heldout_windows(ids: torch.Tensor, n: int, seq_len: int, seed: int, avoid: torch.Tensor) -> torch.Tensor:
    """(n, seq_len) windows of the calibration text that share no token with the windows starting at `avoid`
    (the calibration windows) nor with each other: random offsets (seeded by `seed`) that overlap are skipped.
    The held-out loss of curvature.damping=auto (docs/algorithm.md section 5)."""
    gen = torch.Generator().manual_seed(seed)
    taken = sorted(avoid.tolist())
    starts: list[int] = []
    for _ in range(100):  # rounds of candidate offsets; a text this crowded fails below
        for s in torch.randint(0, ids.numel() - seq_len, (4 * n,), generator=gen).tolist():
            if len(starts) < n and all(abs(s - t) >= seq_len for t in taken):
                starts.append(s)
                taken.append(s)
        if len(starts) == n:
            return torch.stack([ids[s : s + seq_len] for s in starts])
    raise ConfigError(f"the calibration text ({ids.numel()} tokens) has no room for {n} held-out windows of "
                      f"{seq_len} tokens beside the calibration windows; lower curvature.auto_damping.heldout "
                      "or calib.n, or use a longer text")


def eval_windows(ids: torch.Tensor, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping (n, seq_len) windows; the remainder shorter than a window is dropped."""
    n = ids.numel() // seq_len
    if max_windows is not None:
        n = min(n, int(max_windows))
    if n == 0:
        raise ConfigError(f"evaluation text has {ids.numel()} tokens, fewer than eval.seq_len={seq_len}; "
                          "use a longer text (data.eval_path) or a smaller eval.seq_len")
    return ids[: n * seq_len].view(n, seq_len)


def batches(windows: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    return list(windows.split(batch_size))
