"""The residency rule: vLLM must keep at least gpu.min_resident_memory on its GPUs."""

from __future__ import annotations

from nika_supervisor.gpu import FailureClass, check_residency, residency_threshold

GiB = 1024**3


def test_auto_threshold_is_half_of_what_vllm_held_at_ready() -> None:
    """min_resident_memory: auto enforces half of the bytes held right after READY."""
    assert residency_threshold(None, 68 * GiB) == 34 * GiB


def test_auto_without_a_reading_or_with_nothing_held_is_off() -> None:
    """auto cannot derive a floor from an unknown or zero READY reading (NVML off, CPU build)."""
    assert residency_threshold(None, None) is None
    assert residency_threshold(None, 0) is None


def test_explicit_threshold_wins_and_zero_turns_the_rule_off() -> None:
    """A configured size is used as is; 0 switches the rule off."""
    assert residency_threshold(20 * GiB, 68 * GiB) == 20 * GiB
    assert residency_threshold(0, 68 * GiB) is None


def test_below_threshold_is_a_restart_not_resident() -> None:
    """Less than the floor, or nothing at all, is a RESTART "model not resident" finding."""
    for resident in (10 * GiB, 0):
        f = check_residency(34 * GiB, resident)
        assert f is not None
        assert (f.klass, f.code) == (FailureClass.RESTART, "gpu.not_resident")
        assert "model not resident" in f.reason and "34.0GiB" in f.reason


def test_at_or_above_threshold_or_unknown_is_fine() -> None:
    """Enough memory, an unknown reading, or no threshold give no finding."""
    assert check_residency(34 * GiB, 34 * GiB) is None
    assert check_residency(34 * GiB, None) is None
    assert check_residency(None, 0) is None
