import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, OPTConfig

from surgeon.adapters import adapter_for
from surgeon.lora import lora_correction

VOCAB = 64
UNMASKED = {"opt": "model.decoder.layers.1.fc2", "llama": "model.layers.1.mlp.down_proj"}


def tiny_model(family):
    torch.manual_seed(0)
    if family == "opt":
        config = OPTConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
                           max_position_embeddings=64, word_embed_proj_dim=32, enable_bias=True)
    else:
        config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return AutoModelForCausalLM.from_config(config).to(torch.float32).eval()


def batches(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (2, 16), generator=g) for _ in range(n)]


def pruned(model, p=0.5, seed=1, skip=()):
    """Zero a random fraction of every prunable weight (except layers in `skip`); return layers and masks."""
    g = torch.Generator().manual_seed(seed)
    layers = adapter_for(model.config.model_type).layers(model)
    masks = {}
    for layer in layers:
        if layer.name in skip:
            continue
        masks[layer.name] = torch.rand(layer.shape, generator=g) < p
        with torch.no_grad():
            layer.module.weight[masks[layer.name]] = 0
    return layers, masks


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_loss_drops_and_merge_respects_masks(family):
    model = tiny_model(family)
    layers, masks = pruned(model, skip={UNMASKED[family]})
    before = state(model)
    losses = lora_correction(model, layers, batches(), masks, lr=1e-2, steps=30)
    assert len(losses) == 30
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.1
    after = state(model)
    prunable = set()
    for layer in layers:
        key = f"{layer.name}.weight"
        prunable.add(key)
        changed = after[key] != before[key]
        if layer.name in masks:
            assert (after[key][masks[layer.name]] == 0).all()
            assert not changed[masks[layer.name]].any()
            assert changed[~masks[layer.name]].float().mean() > 0.9
        else:  # a layer without a mask has nothing removed: all its entries move
            assert changed.float().mean() > 0.9
    for key in before:
        if key not in prunable:  # biases, embeddings, norms
            assert torch.equal(after[key], before[key]), key


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_merged_model_is_the_trained_model(family):
    # Step t's loss is taken with the adapters after t updates, so one extra step scores the merge of t steps.
    model = tiny_model(family).double()
    layers, masks = pruned(model)
    data = batches(3)
    longer = copy.deepcopy(model)
    losses = lora_correction(longer, adapter_for(family).layers(longer), data, masks, lr=1e-2, steps=5)
    lora_correction(model, layers, data, masks, lr=1e-2, steps=4)
    input_ids = data[4 % len(data)]
    logits = model(input_ids=input_ids).logits
    merged = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), input_ids[:, 1:].flatten())
    assert merged.item() == pytest.approx(losses[4], rel=1e-10)


def test_nothing_left_behind():
    model = tiny_model("opt")
    layers, masks = pruned(model)
    model.model.decoder.embed_positions.weight.requires_grad_(False)
    model.train()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    classes = {n: type(m) for n, m in model.named_modules()}
    lora_correction(model, layers, batches(), masks, steps=3)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert {n: type(m) for n, m in model.named_modules()} == classes
    assert model.training
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
    assert all(p.grad is None for p in model.parameters())


def test_deterministic_with_seed():
    runs = []
    for seed in (0, 0, 1):
        model = tiny_model("llama")
        layers, masks = pruned(model)
        losses = lora_correction(model, layers, batches(), masks, lr=1e-3, steps=4, seed=seed)
        runs.append((losses, state(model)))
    (l0, s0), (l1, s1), (l2, s2) = runs
    assert l0 == l1 and all(torch.equal(s0[k], s1[k]) for k in s0)
    assert l0[0] == l2[0]  # B = 0: the first loss is the pruned model's, whatever the seed
    assert any(not torch.equal(s0[k], s2[k]) for k in s0)


def test_zero_steps_leaves_model_unchanged():
    model = tiny_model("opt")
    layers, masks = pruned(model)
    before = state(model)
    assert lora_correction(model, layers, batches(), masks, steps=0) == []
    after = state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_bad_mask_shape_names_layer():
    model = tiny_model("opt")
    layers, masks = pruned(model)
    name = layers[0].name
    masks[name] = masks[name][:, :-1]
    with pytest.raises(ValueError, match=name):
        lora_correction(model, layers, batches(), masks, steps=1)
