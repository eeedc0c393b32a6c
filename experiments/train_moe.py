"""A small trained mixture-of-experts model for measurements (docs/moe.md), made on CPU in minutes, no download.

    python -m experiments.train_moe --out outputs/moe-tiny-wt2 [--steps 300] [--experts 8] [--seed 0]

Sparse upcycling of the Llama testbed model (../shared/models/llama-tiny-wt2): a Mixtral of the same widths
whose 8 experts per block start as copies of the block's dense MLP (plus noise of 1e-3 of the weights' scale, so
they can part ways) behind a random router, top-2 with normalised weights, so at the start it computes the
dense model; then `--steps` AdamW steps on the testbed's calibration text (wikitext-2 valid; the testbed ships
no train split), sequences of 128 tokens, router auxiliary loss on, so the experts specialise and the router
spreads the tokens. Evaluation is on the test split, never seen in training. Writes the model and the testbed
tokenizer to --out, and `train.json` there (steps, final training loss, seconds, tokens per expert).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402


def upcycle(dense, experts: int, seed: int, noise: float = 1e-3):
    """The Mixtral twin of a Llama model: every expert a copy of its block's MLP (+ `noise` x the weights' std)."""
    from transformers import AutoModelForCausalLM, MixtralConfig

    c = dense.config
    config = MixtralConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                           num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                           num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim,
                           max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
                           tie_word_embeddings=c.tie_word_embeddings, num_local_experts=experts,
                           num_experts_per_tok=2, output_router_logits=True, router_aux_loss_coef=0.02,
                           bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id,
                           rope_parameters=getattr(c, "rope_parameters", None))
    torch.manual_seed(seed)
    moe = AutoModelForCausalLM.from_config(config)
    state = dense.state_dict()
    own = moe.state_dict()
    with torch.no_grad():
        for key, value in state.items():
            if key in own and own[key].shape == value.shape:
                own[key].copy_(value)
        for i, block in enumerate(moe.model.layers):
            mlp = dense.model.layers[i].mlp
            gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
            experts_ = block.mlp.experts
            down = mlp.down_proj.weight
            for e in range(experts):
                experts_.gate_up_proj[e].copy_(gate_up + noise * gate_up.std() * torch.randn_like(gate_up))
                experts_.down_proj[e].copy_(down + noise * down.std() * torch.randn_like(down))
    return moe


def main(argv=None) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from surgeon.config import shared_dir

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    source = shared_dir() / "models" / "llama-tiny-wt2"
    tokenizer = AutoTokenizer.from_pretrained(source)
    dense = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    model = upcycle(dense, args.experts, args.seed).train()
    text = (shared_dir() / "data" / "wikitext-2" / "valid.txt").read_text()
    ids = torch.tensor(tokenizer(text)["input_ids"])
    n = len(ids) // args.seq_len
    windows = ids[: n * args.seq_len].view(n, args.seq_len)
    generator = torch.Generator().manual_seed(args.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    t0, losses = time.perf_counter(), []
    for step in range(args.steps):
        batch = windows[torch.randint(0, n, (args.batch,), generator=generator)]
        out = model(input_ids=batch, labels=batch, use_cache=False)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step}: loss {out.loss.item():.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    model.eval()
    counts = torch.zeros(len(model.model.layers), args.experts, dtype=torch.long)
    with torch.no_grad():
        out = model(input_ids=windows[:32], use_cache=False, output_router_logits=True)
        for i, logits in enumerate(out.router_logits):
            top = logits.topk(2, dim=-1).indices.flatten()
            counts[i] = torch.bincount(top, minlength=args.experts)
    model.config.output_router_logits = False
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    info = {"source": "llama-tiny-wt2 upcycled", "steps": args.steps, "experts": args.experts, "lr": args.lr,
            "batch": args.batch, "seq_len": args.seq_len, "seed": args.seed,
            "final_loss": sum(losses[-20:]) / len(losses[-20:]), "seconds": time.perf_counter() - t0,
            "tokens_per_expert": counts.tolist()}
    (args.out / "train.json").write_text(json.dumps(info, indent=1))
    print(json.dumps({k: v for k, v in info.items() if k != "tokens_per_expert"}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
