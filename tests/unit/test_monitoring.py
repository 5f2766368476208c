"""monitoring/: the alert rules pass `promtool check rules` and their own `promtool test rules`
(which fails when a rule is changed), and the rules and the Grafana dashboard only use series
that nika-supervisor's exposition (or vLLM's real /metrics) actually has, in valid PromQL."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import yaml
from helpers import promtool
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from test_exposition import busy_snapshot

from nika_supervisor.exposition import Snapshot, SnapshotCollector

ROOT = Path(__file__).resolve().parents[2]
MON = ROOT / "monitoring"
VLLM_METRICS = ROOT / "tests" / "data" / "vllm_metrics.txt"
SUFFIXES = ("_bucket", "_count", "_sum")


def exposed_names() -> set[str]:
    """Every sample name the exposition can produce (busy, loading, gate on, vLLM appended)."""
    names: set[str] = {"nika_vllm_metrics_up"}
    for snap in (busy_snapshot(), Snapshot(phase="loading", load_shards=(1, 2),
                                           loading_for_s=3.0, gpu_fatal=True)):
        reg = CollectorRegistry(auto_describe=False)
        reg.register(SnapshotCollector(lambda s=snap: s))
        for fam in text_string_to_metric_families(generate_latest(reg).decode()):
            names.update(s.name for s in fam.samples)
    for fam in text_string_to_metric_families(VLLM_METRICS.read_text()):
        names.update(s.name for s in fam.samples)
    return names


def referenced(expr: str) -> set[str]:
    return set(re.findall(r"\b((?:nika_|vllm:)[A-Za-z0-9_:]+)", expr))


def rules() -> list[dict[str, object]]:
    doc = yaml.safe_load((MON / "nika-alerts.yml").read_text())
    return [r for g in doc["groups"] for r in g["rules"]]


def dashboard_exprs() -> list[str]:
    dash = json.loads((MON / "grafana-dashboard.json").read_text())
    return [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]


def test_rules_pass_promtool_check() -> None:
    r = promtool.run("check", "rules", str(MON / "nika-alerts.yml"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS: 6 rules found" in r.stdout


def test_rules_pass_their_unit_tests_and_the_tests_have_teeth(tmp_path: Path) -> None:
    """`promtool test rules` passes; with NikaNotReady's `for: 5m` made 10m it fails."""
    r = promtool.run("test", "rules", "nika-alerts.test.yml", cwd=MON)
    assert r.returncode == 0, r.stdout + r.stderr
    shutil.copy(MON / "nika-alerts.test.yml", tmp_path)
    text = (MON / "nika-alerts.yml").read_text()
    assert text.count("for: 5m") == 2
    (tmp_path / "nika-alerts.yml").write_text(text.replace("for: 5m", "for: 10m", 1))
    broken = promtool.run("test", "rules", "nika-alerts.test.yml", cwd=tmp_path)
    assert broken.returncode != 0 and "NikaNotReady" in broken.stdout + broken.stderr


def test_the_issue_alerts_exist() -> None:
    """Not ready 5 m, a restart loop, GPU hot, a fatal GPU fault, a give-up (and the daemon
    gone), each with a severity and a summary."""
    by_name = {r["alert"]: r for r in rules()}
    assert set(by_name) == {"NikaNotReady", "NikaSupervisorDown", "NikaRestartLoop",
                            "NikaGpuHot", "NikaGpuFatal", "NikaGaveUp"}
    assert by_name["NikaNotReady"]["for"] == "5m"
    for r in by_name.values():
        assert r["labels"]["severity"] in ("warning", "critical")  # type: ignore[index]
        assert r["annotations"]["summary"]  # type: ignore[index]


def test_rules_and_dashboard_only_use_exposed_series() -> None:
    names = exposed_names()
    used = set()
    for expr in [str(r["expr"]) for r in rules()] + dashboard_exprs():
        used |= referenced(expr)
    missing = sorted(n for n in used if n not in names and n + "_total" not in names)
    assert not missing, f"not in the exposition: {missing}"
    nika_families = {n for n in names if n.startswith("nika_")}
    shown = {n for n in used if n.startswith("nika_")}
    unshown = sorted(n for n in nika_families
                     if n not in shown and not n.endswith(SUFFIXES)
                     and n.removesuffix("_total") not in shown
                     and not n.endswith("_created"))
    # Everything exposed is on the dashboard, except metadata and the load-progress gauge of
    # the current load, which STATUS already shows.
    assert unshown == ["nika_build_info", "nika_last_give_up_timestamp_seconds",
                       "nika_loading_elapsed_seconds", "nika_vllm_metrics_up"], unshown


def test_dashboard_is_importable_and_its_queries_are_valid_promql(tmp_path: Path) -> None:
    """Grafana's import format (an input for the datasource, unique panel ids, a 24-column
    grid), and every query parses: promtool checks them as recording rules, with Grafana's
    variables filled in."""
    dash = json.loads((MON / "grafana-dashboard.json").read_text())
    assert dash["uid"] == "nika-vllm" and dash["__inputs"][0]["name"] == "DS_PROMETHEUS"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in dash["panels"]:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
    exprs = dashboard_exprs()
    assert len(exprs) >= 20
    filled = [e.replace("$__rate_interval", "5m").replace("$__range", "1h")
              .replace("$instance", ".*") for e in exprs]
    rules_file = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{i}", "expr": e} for i, e in enumerate(filled)]}]}
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump(rules_file))
    r = promtool.run("check", "rules", str(path))
    assert r.returncode == 0, r.stdout + r.stderr
