"""The failure-class table: every Xid and NVML error named in issue 5 maps to its policy."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from nika_supervisor.gpu import nvml as n
from nika_supervisor.gpu.classes import (
    CONDITIONS,
    NVML_FATAL,
    POLICY,
    XID_TABLE,
    FailureClass,
    condition,
    nvml_fatal_finding,
    xid_finding,
)

DOCS = Path(__file__).resolve().parents[2] / "docs"


@pytest.mark.parametrize("xid", [13, 31, 43, 45, 68])
def test_application_xids_restart_vllm(xid: int) -> None:
    """The application Xids that NVIDIA's device plugin ignores restart vLLM, not the host."""
    f = xid_finding(xid, 0)
    assert (f.klass, f.code, f.device) == (FailureClass.RESTART, f"xid.{xid}", 0)


@pytest.mark.parametrize("xid", [79, 64, 95, 109, 119, 120, 140, 156])
def test_reset_required_xids_are_fatal_with_a_reset_hint(xid: int) -> None:
    """GPU-lost and reset-required Xids are fatal and tell the operator to reset or reboot."""
    f = xid_finding(xid, 1)
    assert f.klass is FailureClass.FATAL
    assert "GPU needs reset/reboot" in f.hint
    assert f.reason.startswith(f"GPU 1: Xid {xid}: ")


def test_unknown_xid_is_a_warning_naming_the_number() -> None:
    """An Xid missing from the table is reported, not acted on: crash checks still apply."""
    f = xid_finding(4242, None)
    assert (f.klass, f.code) == (FailureClass.WARN, "xid.4242")
    assert "Xid 4242" in f.reason


@pytest.mark.parametrize(("code", "name", "fix"), [
    (n.ERROR_GPU_IS_LOST, "nvml.gpu_lost", "GPU needs reset/reboot"),
    (n.ERROR_RESET_REQUIRED, "nvml.reset_required", "GPU needs reset/reboot"),
    (n.ERROR_LIB_RM_VERSION_MISMATCH, "nvml.version_mismatch", "driver upgraded: reboot"),
])
def test_nvml_errors_no_reinit_can_clear_are_fatal(code: int, name: str, fix: str) -> None:
    """GPU lost, reset required and a driver/library mismatch are fatal, with the fix."""
    f = nvml_fatal_finding(code, 0)
    assert f is not None
    assert (f.klass, f.code) == (FailureClass.FATAL, name)
    assert fix in f.hint


@pytest.mark.parametrize("code", [n.ERROR_UNKNOWN, n.ERROR_TIMEOUT, n.ERROR_NOT_SUPPORTED,
                                  n.ERROR_IRQ_ISSUE])
def test_other_nvml_errors_are_not_fatal(code: int) -> None:
    """Runtime NVML errors a re-init may clear, and NOT_SUPPORTED, are never fatal by code."""
    assert nvml_fatal_finding(code, 0) is None


def test_every_class_has_a_documented_policy() -> None:
    """Each failure class carries its policy text, and fatal names exit code 80."""
    assert set(POLICY) == set(FailureClass)
    assert "80" in POLICY[FailureClass.FATAL]


def test_required_vs_optional_unavailability() -> None:
    """NVML unavailable is fatal under nvml: required and a warning under optional."""
    req = condition("nvml.unavailable", error="NVML_ERROR_DRIVER_NOT_LOADED")
    opt = condition("nvml.unavailable.optional", error="NVML_ERROR_DRIVER_NOT_LOADED")
    assert (req.klass, req.code) == (FailureClass.FATAL, "nvml.unavailable")
    assert (opt.klass, opt.code) == (FailureClass.WARN, "nvml.unavailable")
    assert "HTTP checks only" in opt.reason


def test_the_readme_lists_every_code() -> None:
    """README.md's GPU section documents every finding code the table can produce."""
    readme = (DOCS.parent / "README.md").read_text()
    text = readme[readme.index("## GPU health"):readme.index("## Deep liveness")]
    codes = {c.removesuffix(".optional") for c in CONDITIONS}
    codes |= {name for name, _ in NVML_FATAL.values()}
    missing = sorted(c for c in codes if f"`{c}`" not in text)
    assert not missing, f"undocumented codes: {missing}"
    documented_xids = {int(x) for x in re.findall(r"\b(\d{2,3})\b", text)}
    assert set(XID_TABLE) <= documented_xids, sorted(set(XID_TABLE) - documented_xids)
