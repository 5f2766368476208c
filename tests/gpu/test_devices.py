"""Which GPUs are watched: gpu.devices, else CUDA_VISIBLE_DEVICES, else all."""

from __future__ import annotations

from nika_supervisor.gpu.devices import uuid_resolver, watched_devices

UUIDS = {0: "GPU-8932f937-d72c-4106-c12f-20bd9faed9f6", 1: "GPU-11111111-2222"}
R = uuid_resolver(UUIDS)


def test_unset_means_all_and_empty_means_none() -> None:
    """Unset CUDA_VISIBLE_DEVICES watches every GPU; an empty one watches none."""
    assert watched_devices(None, {}, 2, R) == ((0, 1), None)
    assert watched_devices(None, {"CUDA_VISIBLE_DEVICES": ""}, 2, R) == ((), None)


def test_indexes_and_uuid_prefixes_are_resolved() -> None:
    """Indexes and (abbreviated) UUIDs both name GPUs, as CUDA accepts them."""
    env = {"CUDA_VISIBLE_DEVICES": "1,GPU-8932f937"}
    assert watched_devices(None, env, 2, R) == ((1, 0), None)


def test_an_invalid_entry_ends_the_list_with_a_problem() -> None:
    """CUDA ignores everything from the first invalid entry on; the monitor says so."""
    watched, problem = watched_devices(None, {"CUDA_VISIBLE_DEVICES": "0,7,1"}, 2, R)
    assert watched == (0,)
    assert problem is not None and "'7'" in problem


def test_configured_devices_win_and_missing_ones_are_reported() -> None:
    """gpu.devices overrides the environment; indexes NVML lacks are a problem."""
    env = {"CUDA_VISIBLE_DEVICES": "1"}
    assert watched_devices((0,), env, 2, R) == ((0,), None)
    watched, problem = watched_devices((0, 3), env, 2, R)
    assert watched == (0,) and problem is not None and "GPU 3" in problem


def test_mig_entries_fall_back_to_all_gpus() -> None:
    """A MIG slice is not mapped to its parent here, so all GPUs are watched."""
    assert watched_devices(None, {"CUDA_VISIBLE_DEVICES": "MIG-abc/1/0"}, 2, R) == ((0, 1), None)
