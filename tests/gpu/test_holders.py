"""GPU holders on this machine's real /proc: stand-in device files held by real processes."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from gpuhelp import Holders, Rig
from helpers.fake_nvml import FakeDevice, GiB

from nika_supervisor.gpu.holders import scan_device_fds

KEY = "NIKA_SUPERVISOR_INSTANCE"


@pytest.fixture
def dev_dir(tmp_path: Path) -> Path:
    """A folder with stand-ins for /dev/nvidia0 and /dev/nvidiactl."""
    for name in ("nvidia0", "nvidiactl"):
        (tmp_path / name).write_bytes(b"")
    return tmp_path


def rig_with(rig_factory: Callable[..., Rig], dev_dir: Path, procs: list[tuple[int, int | None]],
             **cfg: object) -> Rig:
    r = rig_factory([FakeDevice(processes=procs)], **cfg)
    r.mon.device_glob = str(dev_dir / "nvidia*")
    r.mon.start()
    return r


def test_proc_scan_finds_processes_holding_a_device_file(holders: Holders, dev_dir: Path) -> None:
    """The fuser-like scan lists a real process that holds the file open, and only it."""
    p = holders.spawn(dev_dir / "nvidia0")
    idle = holders.spawn(None)
    found = scan_device_fds(str(dev_dir / "nvidia*"))
    assert found.get(p.pid) == (str(dev_dir / "nvidia0"),)
    assert idle.pid not in found


def test_no_device_files_means_an_empty_scan(tmp_path: Path) -> None:
    """A host without /dev/nvidia* files has no holders (and the scan costs nothing)."""
    assert scan_device_fds(str(tmp_path / "nvidia*")) == {}


def test_marked_orphan_is_stale_and_foreign_compute_process_refuses_the_start(
        rig_factory: Callable[..., Rig], holders: Holders, dev_dir: Path) -> None:
    """A marked orphan is stale; a foreign NVML compute process blocks, named with its memory."""
    marker = f"test-{uuid.uuid4().hex}"
    orphan = holders.spawn(dev_dir / "nvidia0", env={KEY: marker})
    foreign = holders.spawn(dev_dir / "nvidia0")
    bystander = holders.spawn(dev_dir / "nvidiactl")  # e.g. nvidia-persistenced
    r = rig_with(rig_factory, dev_dir, [(orphan.pid, 5 * GiB), (foreign.pid, 10 * GiB)])
    pf = r.mon.preflight(KEY, marker)
    assert [(h.pid, h.source, h.used_bytes) for h in pf.stale] == [(orphan.pid, "nvml", 5 * GiB)]
    got = {h.pid: (h.source, h.used_bytes) for h in pf.foreign}
    assert got[foreign.pid] == ("nvml", 10 * GiB)
    assert got[bystander.pid] == ("procfs", None)
    assert orphan.pid not in got
    assert pf.nvml is True
    assert pf.refuse_reason is not None
    assert f"pid {foreign.pid} (python" in pf.refuse_reason and "10.0GiB" in pf.refuse_reason
    assert str(bystander.pid) not in pf.refuse_reason


def test_report_policy_lists_foreign_holders_without_refusing(
        rig_factory: Callable[..., Rig], holders: Holders, dev_dir: Path) -> None:
    """gpu.stale_holders: report never refuses, but still lists who holds the GPU."""
    foreign = holders.spawn(dev_dir / "nvidia0")
    r = rig_with(rig_factory, dev_dir, [(foreign.pid, 10 * GiB)], stale_holders="report")
    pf = r.mon.preflight(KEY, "nobody-has-this")
    assert pf.refuse_reason is None
    assert [h.pid for h in pf.foreign if h.source == "nvml"] == [foreign.pid]


def test_device_file_holders_alone_never_refuse(rig_factory: Callable[..., Rig],
                                                holders: Holders, dev_dir: Path) -> None:
    """Holding /dev/nvidia* without a CUDA context (persistenced, Xorg) is reported only."""
    p = holders.spawn(dev_dir / "nvidia0")
    r = rig_with(rig_factory, dev_dir, [])
    pf = r.mon.preflight(KEY, "nobody-has-this")
    assert [(h.pid, h.source) for h in pf.foreign if h.pid == p.pid] == [(p.pid, "procfs")]
    assert pf.refuse_reason is None


def test_marked_process_holding_no_gpu_is_still_stale(rig_factory: Callable[..., Rig],
                                                      holders: Holders, dev_dir: Path) -> None:
    """An orphaned API server with no GPU file open is stale too (found by its environment)."""
    marker = f"test-{uuid.uuid4().hex}"
    p = holders.spawn(None, env={KEY: marker})
    r = rig_with(rig_factory, dev_dir, [])
    pf = r.mon.preflight(KEY, marker)
    assert [(h.pid, h.source, h.used_bytes) for h in pf.stale] == [(p.pid, "procfs", None)]


def test_own_group_and_own_pid_are_never_holders(rig_factory: Callable[..., Rig],
                                                 holders: Holders, dev_dir: Path) -> None:
    """Our own vLLM group (own_pgid) and the daemon itself are neither stale nor foreign."""
    marker = f"test-{uuid.uuid4().hex}"
    mine = holders.spawn(dev_dir / "nvidia0", env={KEY: marker})  # its own session: pgid == pid
    r = rig_with(rig_factory, dev_dir, [(mine.pid, 10 * GiB)])
    with open(dev_dir / "nvidia0", "rb"):  # the daemon holds the device too (NVML does)
        pf = r.mon.preflight(KEY, marker, own_pgid=os.getpgid(mine.pid))
    assert pf.stale == []
    assert all(h.pid not in (mine.pid, os.getpid()) for h in pf.foreign)
    assert pf.refuse_reason is None


def test_with_nvml_off_the_proc_scan_and_marker_still_work(rig_factory: Callable[..., Rig],
                                                           holders: Holders, dev_dir: Path) -> None:
    """nvml: off still finds stale orphans and device-file holders, from /proc alone."""
    marker = f"test-{uuid.uuid4().hex}"
    orphan = holders.spawn(dev_dir / "nvidia0", env={KEY: marker})
    other = holders.spawn(dev_dir / "nvidia0")
    r = rig_with(rig_factory, dev_dir, [(other.pid, GiB)], nvml="off")
    pf = r.mon.preflight(KEY, marker)
    assert pf.nvml is False
    assert [(h.pid, h.source) for h in pf.stale] == [(orphan.pid, "procfs")]
    assert (other.pid, "procfs") in [(h.pid, h.source) for h in pf.foreign]
    assert pf.refuse_reason is None
