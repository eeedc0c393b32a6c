"""The paper's ordering on a trained model, at the testbed protocol (128 x 256 calibration tokens).

Slow (tens of minutes on 2 cores): run on purpose with `pytest -m slow`.
"""
import pytest

from conftest import compose
from surgeon import runner


def _final(tmp_path, name, *overrides):
    cfg = compose(["model=opt-tiny", "eval.max_windows=400", f"results={tmp_path}/records.jsonl", *overrides])
    return runner.run(cfg, tmp_path / name)["final_ppl"]


@pytest.mark.slow
def test_surgeon_beats_kobd_beats_magnitude_and_multishot_beats_single_shot(tmp_path, shared):
    args = ["structure=structured", "target=0.3"]
    surgeon = _final(tmp_path, "surgeon", *args, "shots=5")
    kobd = _final(tmp_path, "kobd", *args, "shots=5", "method=kobd")
    magnitude = _final(tmp_path, "magnitude", *args, "shots=5", "method=magnitude")
    single = _final(tmp_path, "single", *args, "shots=1")
    assert surgeon < kobd < magnitude
    assert surgeon < single
