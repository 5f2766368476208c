"""scripts/install.sh inside the namespace: venv, user, config, unit, daemon-reload; safe to
run again; and `systemctl enable --now nika-vllm` works afterwards."""

from __future__ import annotations

import json
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from nika_helpers import (
    CONFIG,
    PREFIX,
    SHIPPED_UNIT,
    UNIT,
    install,
    mark,
    reset,
    standin_config,
    unit_journal,
    wait_active,
    write_config,
)
from systemd_harness import REPO, Namespace

pytestmark = pytest.mark.systemd


@pytest.fixture
def ns(nika_ns: Namespace) -> Iterator[Namespace]:
    reset(nika_ns)
    yield nika_ns
    nika_ns.systemctl("disable", "--now", UNIT, check=False)
    reset(nika_ns)


def test_install_puts_everything_in_place(ns: Namespace) -> None:
    """One run installs the venv, the user (system, no login, in group video), the shipped
    config (root:nika 0640) and the unit byte for byte, and reloads systemd."""
    passwd = ns.run(["getent", "passwd", "nika"]).stdout.strip().split(":")
    assert passwd[5] == "/var/lib/nika-vllm" and passwd[6].endswith("nologin"), passwd
    assert int(passwd[2]) < 1000, "not a system user"
    groups = ns.run(["id", "-nG", "nika"]).stdout.split()
    assert "video" in groups, groups

    text, mode, uid, gid = ns.notes["installed config"]
    assert text == (REPO / "etc" / "nika-vllm.yaml").read_bytes()
    assert (mode, uid, gid) == (0o640, 0, int(passwd[3])), (oct(mode), uid, gid)

    assert ns.path(f"/etc/systemd/system/{UNIT}").read_bytes() == SHIPPED_UNIT.read_bytes()
    loaded = ns.show(UNIT, "LoadState", "FragmentPath", "NeedDaemonReload")
    assert loaded == {"LoadState": "loaded", "FragmentPath": f"/etc/systemd/system/{UNIT}",
                      "NeedDaemonReload": "no"}, loaded
    example = f"{PREFIX}/share/nika-vllm.yaml.example"
    ns.run([f"{PREFIX}/bin/nika-supervisor", "check", "--config", example])
    assert ns.path(f"{PREFIX}/README.md").exists()  # the unit's Documentation=
    assert "Reloading" in ns.journal("-u", "init.scope", "-o", "cat") or \
        "Reloading." in ns.journal("-o", "cat")


def test_running_it_again_keeps_an_edited_config(ns: Namespace, tmp_path: Path) -> None:
    """A second run upgrades the package and the unit but leaves an edited
    /etc/nika/nika-vllm.yaml exactly as it was, and says so."""
    write_config(ns, standin_config())
    edited = ns.path(CONFIG).read_bytes()
    uid = ns.run(["id", "-u", "nika"]).stdout
    out = install(ns, tmp_path / "reinstall.log")
    assert "kept the existing /etc/nika/nika-vllm.yaml" in out, out
    assert ns.path(CONFIG).read_bytes() == edited
    assert ns.run(["id", "-u", "nika"]).stdout == uid
    assert ns.path(f"/etc/systemd/system/{UNIT}").read_bytes() == SHIPPED_UNIT.read_bytes()


def test_enable_now_starts_the_model(ns: Namespace) -> None:
    """After install, `systemctl enable --now nika-vllm` enables the unit for boot
    (multi-user.target) and returns with the model answering."""
    cfg = standin_config()
    write_config(ns, cfg)
    c = mark()
    ns.systemctl("enable", "--now", UNIT, timeout=120)
    wait_active(ns, 5)
    assert ns.systemctl("is-enabled", UNIT).stdout.strip() == "enabled"
    wants = ns.path(f"/etc/systemd/system/multi-user.target.wants/{UNIT}")
    assert wants.is_symlink()
    port = cfg["vllm"]["port"]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5) as r:
        assert [m["id"] for m in json.loads(r.read())["data"]] == ["nika"]
    assert "vllm.ready" in unit_journal(ns, c)


def test_prefix_option_points_the_unit_at_that_venv(ns: Namespace, tmp_path: Path) -> None:
    """`--prefix DIR` installs the venv there and the unit's ExecStart= follows it; running
    the default install again restores the shipped unit byte for byte."""
    try:
        install(ns, tmp_path / "prefix.log", "--prefix", "/opt/nika-alt")
        unit = ns.path(f"/etc/systemd/system/{UNIT}").read_text()
        assert "ExecStart=/opt/nika-alt/bin/nika-supervisor run --config " \
            "/etc/nika/nika-vllm.yaml\n" in unit
        assert "/opt/nika-supervisor" not in unit
        assert unit == SHIPPED_UNIT.read_text().replace("/opt/nika-supervisor/", "/opt/nika-alt/")
        ns.run(["/opt/nika-alt/bin/nika-supervisor", "--help"])
        verify = ns.run(["systemd-analyze", "verify", f"/etc/systemd/system/{UNIT}"],
                        check=False)
        assert (verify.returncode, verify.stderr) == (0, ""), verify
    finally:
        install(ns, tmp_path / "restore.log")
    assert ns.path(f"/etc/systemd/system/{UNIT}").read_bytes() == SHIPPED_UNIT.read_bytes()


def test_unknown_option_changes_nothing() -> None:
    """An unknown option stops install.sh before it touches anything (run on the host: it
    must exit at argument parsing)."""
    watched = [Path("/etc/nika"), Path(PREFIX), Path(f"/etc/systemd/system/{UNIT}")]
    before = [p.exists() for p in watched]
    res = subprocess.run(["bash", str(REPO / "scripts" / "install.sh"), "--no-such-option"],
                         capture_output=True, text=True, check=False, timeout=30)
    assert res.returncode == 1 and "unknown option --no-such-option" in res.stderr, res
    assert [p.exists() for p in watched] == before


def test_render_group_is_used_where_it_exists(ns: Namespace, tmp_path: Path) -> None:
    """Where a `render` group exists, install.sh adds nika to it, and the running daemon has
    it among its groups although the unit only names `video`."""
    ns.run(["groupadd", "-f", "--system", "render"])
    gid = ns.run(["getent", "group", "render"]).stdout.split(":")[2]
    install(ns, tmp_path / "render.log")
    assert "render" in ns.run(["id", "-nG", "nika"]).stdout.split()
    write_config(ns, standin_config())
    ns.systemctl("start", UNIT, timeout=120)
    main = ns.host_pid(int(wait_active(ns, 5)))
    status = Path(f"/proc/{main}/status").read_text()
    groups = next(ln for ln in status.splitlines() if ln.startswith("Groups:")).split()[1:]
    assert gid in groups and "44" in groups, groups
