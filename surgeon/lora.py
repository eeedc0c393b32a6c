"""Interleaved low-rank first-order updates between shots (docs/algorithm.md section 6).

After a shot the gradient is no longer zero, so the quadratic model misses a first-order
term. Rank-r adapters are trained briefly on calibration data and merged into W through
the current mask, so that removed weights stay exactly zero.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from surgeon.adapters import PrunableLayer


def _adapter_hook(B: Tensor, A: Tensor, removed: Tensor):
    """Forward hook adding x ((B A) o ~removed)^T, the masked low-rank update, to a Linear's output."""

    def hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        # Train through the mask, so the trained function is exactly the one that gets merged.
        return output + F.linear(args[0], (B @ A).masked_fill(removed, 0))

    return hook


def lora_correction(model: nn.Module, layers: list[PrunableLayer], batches: list[Tensor],
                    masks: dict[str, Tensor], *, rank: int = 8, lr: float = 1e-4, steps: int,
                    seed: int = 0) -> list[float]:
    """Train rank-`rank` adapters with Adam on next-token loss, merge W += (B A) o ~removed (section 6)."""
    if rank < 1:
        raise ValueError(f"lora rank must be a positive integer, got {rank}")
    if steps < 0:
        raise ValueError(f"lora steps must be >= 0, got {steps}")
    if steps and not batches:
        raise ValueError("lora_correction needs at least one calibration batch")
    generator = torch.Generator().manual_seed(seed)
    adapters = []
    for layer in layers:
        W = layer.weight
        R, C = W.shape
        removed = masks.get(layer.name, torch.zeros(R, C, dtype=torch.bool))
        if removed.shape != W.shape:
            raise ValueError(f"layer '{layer.name}': mask shape {tuple(removed.shape)} != weight shape {(R, C)}")
        # LoRA's initialisation: B = 0 so training starts at the pruned model; A ~ U(+-1/sqrt(C)).
        A = (torch.rand(rank, C, generator=generator, dtype=torch.float64) * 2 - 1) / math.sqrt(C)
        A = A.to(W.device, W.dtype).requires_grad_()
        B = torch.zeros(R, rank, device=W.device, dtype=W.dtype, requires_grad=True)
        adapters.append((layer, A, B, removed.to(W.device, torch.bool)))

    requires_grad = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    device = model.get_input_embeddings().weight.device
    handles = []
    losses = []
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        # Eval mode: no dropout, so the run is deterministic given `seed` and matches how the model is scored.
        model.eval()
        handles = [layer.module.register_forward_hook(_adapter_hook(B, A, removed))
                   for layer, A, B, removed in adapters]
        optimizer = torch.optim.Adam([t for _, A, B, _ in adapters for t in (A, B)], lr=lr)
        with torch.enable_grad():
            for step in range(steps):
                input_ids = batches[step % len(batches)].to(device)
                logits = model(input_ids=input_ids, use_cache=False).logits
                # Half-precision logits are upcast for the loss; float64 models keep float64.
                logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
                loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), input_ids[:, 1:].flatten())
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in requires_grad.items():
            p.requires_grad_(flag)
        model.train(was_training)
    with torch.no_grad():
        for layer, A, B, removed in adapters:
            layer.weight.add_((B @ A).masked_fill(removed, 0))
    return losses
