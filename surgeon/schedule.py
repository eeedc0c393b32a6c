"""Multi-shot schedule: the sparsity target s_t of every shot (docs/algorithm.md section 5)."""
from __future__ import annotations

SCHEDULES = ("linear", "exponential", "cubic")


def shot_targets(target: float, shots: int, schedule: str = "linear") -> list[float]:
    """Targets s_1..s_T of section 5, step 1: linear, exponential (alpha_t = alpha^(t/T)) or cubic."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule '{schedule}' is not known; valid values: {list(SCHEDULES)}")
    if isinstance(shots, bool) or not isinstance(shots, int) or shots < 1:
        raise ValueError(f"shots must be a positive integer, got {shots!r}")
    if not 0.0 <= target <= 1.0:
        raise ValueError(f"target must be a fraction in [0, 1], got {target!r}")
    alpha = 1.0 - target
    fractions = [t / shots for t in range(1, shots + 1)]
    if schedule == "linear":
        targets = [target * f for f in fractions]
    elif schedule == "exponential":
        targets = [1.0 - alpha**f for f in fractions]
    else:
        targets = [target * (1.0 - (1.0 - f) ** 3) for f in fractions]
    # 1 - (1 - s) need not round-trip in floating point; the last shot must hit the target exactly.
    targets[-1] = float(target)
    return targets
