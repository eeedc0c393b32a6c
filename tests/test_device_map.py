"""model.device_map (accelerate's placement of one model over several devices): the same run as without it,
refused where it does not apply, and every device-dependent helper working on its layer's weight's device.
No GPU here: placement is on the CPU, and "another device" is the meta device."""
import pytest
import torch
from transformers import AutoModelForCausalLM, OPTConfig

from conftest import compose
from surgeon import curvature, memory, models, runner
from surgeon.adapters import adapter_for
from surgeon.config import ConfigError, validate
from surgeon.prune import PruneState

SMALL = ["calib.n=8", "calib.seq_len=64", "calib.batch_size=4", "eval.max_windows=4", "eval.seq_len=128", "shots=1"]


def run_job(tmp_path, name, overrides, device_map):
    cfg = compose([*SMALL, f"results={tmp_path}/records.jsonl", *overrides])
    cfg.model.device_map = device_map
    record = runner.run(cfg, tmp_path / name)
    masks = torch.load(tmp_path / name / runner.CHECKPOINT, weights_only=False)["state"]["removed"]
    return record, masks


@pytest.mark.parametrize("overrides", [["structure=structured", "target=0.3"],
                                       ["method=sparsegpt", "structure=unstructured", "target=0.5"]])
def test_device_map_gives_the_run_without_it(overrides, tmp_path, shared):
    """auto and an explicit mapping on opt-tiny: the default run's masks and perplexity."""
    base, base_masks = run_job(tmp_path, "default", overrides, None)
    for name, device_map in (("auto", "auto"), ("mapping", {"": "cpu"})):
        record, masks = run_job(tmp_path, name, overrides, device_map)
        assert record["device_map"] == {"": "cpu"} and record["config"]["model"]["device_map"] == device_map
        assert record["protocol"] == base["protocol"]
        assert record["final_ppl"] == pytest.approx(base["final_ppl"], rel=1e-6)
        assert record["dense_ppl"] == pytest.approx(base["dense_ppl"], rel=1e-6)
        assert masks.keys() == base_masks.keys()
        assert all(torch.equal(masks[k], base_masks[k]) for k in masks)
    assert "device_map" not in base


@pytest.mark.parametrize("overrides,env,message", [
    (["model.device_map=everywhere"], {}, "model.device_map='everywhere' is not valid"),
    (["model.device_map=auto"], {"WORLD_SIZE": "2"}, "model.device_map=auto does not work with torchrun"),
    (["model.device_map=auto", "lora.enabled=true"], {}, "does not work with lora.enabled=true"),
    (["model.device_map=auto", "curvature.offload=cpu"], {}, "does not work with curvature.offload=cpu"),
    (["model.device_map=auto", "compact=true"], {}, "does not work with compact=true"),
    (["model.device_map={model.decoder:nowhere}"], {},
     "model.device_map: 'model.decoder' -> 'nowhere' is not a device"),
    (["model.max_memory={cpu:1GiB}"], {}, "model.max_memory is read only with model.device_map"),
    (["model.device_map=auto", "model.max_memory={cpu:lots}"], {}, "model.max_memory: cpu: 'lots' is not a size"),
])
def test_device_map_refusals(overrides, env, message, tmp_path, monkeypatch):
    """Each refusal is one line naming the key, before anything is loaded."""
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError) as err:
        validate(compose(overrides), check_sources=False)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("args", [["model.device_map=everywhere"], ["model.device_map=auto", "lora.enabled=true"]])
def test_cli_device_map_refusal_is_one_line_exit_2(args, tmp_path, shared):
    import os
    import subprocess
    import sys

    from conftest import ROOT

    proc = subprocess.run([sys.executable, "run.py", f"hydra.run.dir={tmp_path}/run", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: model.device_map=")
    assert not (tmp_path / "run").exists()


def test_memory_check_sums_the_device_map_devices(shared):
    """With a device map the estimate is compared with its devices' memory (here model.max_memory), and the hint
    never suggests curvature.offload=cpu, which a device map refuses."""
    with pytest.raises(ConfigError, match=r"the device map's devices \(cpu\) model.max_memory gives 0.0 GiB") as err:
        validate(compose(["model.device_map=auto", "model.max_memory={cpu:1MiB}"]))
    assert "curvature.offload" not in str(err.value)
    have, devices = memory.placement_bytes("auto", {0: "20GiB", 1: "20GiB", "disk": "1TiB"})
    assert have == 40 * 2**30 and devices == [torch.device("cuda", 0), torch.device("cuda", 1)]
    assert memory.placement_bytes({"": "cpu"}) == (memory.available_bytes(torch.device("cpu")), [torch.device("cpu")])


def test_offloaded_placement_is_refused():
    models.check_placement({"": "cpu"})
    models.check_placement({"model.decoder": 0, "lm_head": 1})
    for device_map in ({"model.decoder": 0, "lm_head": "cpu"}, {"model.decoder": "disk"}):
        with pytest.raises(ConfigError, match="offloaded"):
            models.check_placement(device_map)


def split_model():
    """A tiny OPT whose second block is on the meta device: "another device" than the rest."""
    torch.manual_seed(0)
    config = OPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
                       max_position_embeddings=64, word_embed_proj_dim=32)
    model = AutoModelForCausalLM.from_config(config)
    model.model.decoder.layers[1].to("meta")
    return model, adapter_for("opt").layers(model)


def test_identity_and_diagonal_factors_and_masks_live_on_the_layer_device():
    model, layers = split_model()
    expected = {layer.name: layer.module.weight.device for layer in layers}
    assert {d.type for d in expected.values()} == {"cpu", "meta"}
    factors = curvature.estimate_curvature(model, layers, [], kind="identity")
    assert all(f.A.device == f.G.device == expected[name] for name, f in factors.items())
    state = PruneState.empty(layers)
    for masks in (state.removed, state.rows, state.cols):
        assert {name: m.device for name, m in masks.items()} == expected
    cpu_model = AutoModelForCausalLM.from_config(model.config)
    saved = PruneState.empty(adapter_for("opt").layers(cpu_model)).state_dict()
    restored = PruneState.from_state_dict(saved, layers)
    for masks in (restored.removed, restored.rows, restored.cols):
        assert {name: m.device for name, m in masks.items()} == expected


def test_rank2_random_start_is_drawn_on_the_layer_device(monkeypatch):
    """The rank-2 term's random start A2 of each layer is drawn on its weight's device, from one seeded stream per
    device (meta has no generator: a CPU stream stands in for it and remembers the device it was asked for)."""
    model, layers = split_model()
    real_generator, real_randn, drawn = torch.Generator, torch.randn, []

    class Stream(real_generator):
        def __new__(cls, device="cpu"):
            stream = real_generator.__new__(cls)
            stream.asked = torch.device(device)
            return stream

        def __init__(self, device="cpu"):
            super().__init__()

    def randn(*size, generator, device, dtype):
        drawn.append((torch.device(device), generator.asked))
        return real_randn(*size, generator=generator, dtype=dtype).to(device)

    class Stop(Exception):
        pass

    def first_pass(model, stats, *args, **kwargs):
        raise Stop(stats)

    monkeypatch.setattr(torch, "Generator", Stream)
    monkeypatch.setattr(torch, "randn", randn)
    monkeypatch.setattr(curvature, "_share_inputs", lambda *a: None)
    monkeypatch.setattr(curvature, "_run_pass", first_pass)
    with pytest.raises(Stop) as stop:
        curvature.estimate_curvature(model, layers, [torch.zeros(1, 4, dtype=torch.long)], rank=2)
    stats = stop.value.args[0]
    assert all(s.A2.device == s.layer.module.weight.device for s in stats.values())
    assert [d for d, _ in drawn] == [layer.module.weight.device for layer in layers]
    assert all(device == asked for device, asked in drawn)


def test_inputs_go_to_the_input_embeddings_device():
    model, _ = split_model()
    assert models.input_device(model) == torch.device("cpu")
    model.get_input_embeddings().to("meta")
    assert models.input_device(model) == torch.device("meta")
    assert models.devices(model) == [torch.device("cpu"), torch.device("meta")]
