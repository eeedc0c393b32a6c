import pytest

from surgeon.schedule import SCHEDULES, shot_targets


def test_linear_kept_fraction_falls_by_equal_steps():
    alpha, T = 0.5, 40
    targets = shot_targets(1 - alpha, T, "linear")
    kept = [1 - s for s in targets]
    for t, a in enumerate(kept, start=1):
        assert a == pytest.approx(1 - t * (1 - alpha) / T, abs=1e-15)
    # Paper: the 90/80/70/60/50% sizes are shots 8/16/24/32/40 of one 40-shot run to 50%.
    assert [kept[t - 1] for t in (8, 16, 24, 32, 40)] == pytest.approx([0.9, 0.8, 0.7, 0.6, 0.5], abs=1e-15)


def test_exponential_kept_fraction_is_geometric():
    alpha, T = 0.3, 7
    kept = [1 - s for s in shot_targets(1 - alpha, T, "exponential")]
    ratios = [b / a for a, b in zip([1.0] + kept, kept)]
    for r in ratios:
        assert r == pytest.approx(alpha ** (1 / T), rel=1e-12)
    assert kept[-1] == pytest.approx(alpha, rel=1e-15)


def test_cubic_values():
    # s_t = s (1 - (1 - t/T)^3) with s = 1/2, T = 4, written out as exact fractions.
    expected = [0.5 * (64 - 27) / 64, 0.5 * (64 - 8) / 64, 0.5 * (64 - 1) / 64, 0.5]
    assert shot_targets(0.5, 4, "cubic") == pytest.approx(expected, abs=1e-15)


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("target", [0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0])
@pytest.mark.parametrize("shots", [1, 3, 40])
def test_increasing_and_ends_exactly_at_target(schedule, target, shots):
    targets = shot_targets(target, shots, schedule)
    assert len(targets) == shots
    assert targets[-1] == target
    assert all(0.0 <= s <= target for s in targets)
    assert all(a <= b for a, b in zip(targets, targets[1:]))


def test_errors_name_the_bad_setting():
    with pytest.raises(ValueError, match="schedule"):
        shot_targets(0.5, 4, "quadratic")
    for shots in (0, -2, 2.5, True):
        with pytest.raises(ValueError, match="shots"):
            shot_targets(0.5, shots)
    with pytest.raises(ValueError, match="target"):
        shot_targets(1.5, 4)
