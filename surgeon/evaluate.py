"""Perplexity under the evaluation protocol: exp(mean over windows of the mean token cross-entropy)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .models import input_device


@torch.no_grad()
def window_losses(model, windows: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """Mean next-token cross-entropy of each window, in float64; the windows go to the input embeddings' device,
    the loss is taken on the logits' (the same but under a device map)."""
    device = input_device(model)
    was_training = model.training
    model.eval()
    out = []
    for batch in windows.split(batch_size):
        batch = batch.to(device)
        logits = model(input_ids=batch).logits[:, :-1].float()
        targets = batch[:, 1:].to(logits.device)
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
        out.append(ce.view(batch.shape[0], -1).double().mean(dim=1).cpu())
    model.train(was_training)
    return torch.cat(out)


def perplexity(model, windows: torch.Tensor, batch_size: int = 8) -> float:
    return math.exp(window_losses(model, windows, batch_size).mean().item())
