"""The picture's layout decisions (nika_supervisor/plot.py), found unreadable on the soak's
first plot: a window mostly before the history began, and restart labels written over one
another when restarts come minutes apart in a long window."""

from __future__ import annotations

import itertools
import xml.etree.ElementTree as ET

from nika_supervisor import plot, report

NOW = 1_800_000_000.0


def soak_like(now: float) -> list[dict[str, object]]:
    """30 minutes of history ending now, in a 1-hour window: a restart every 2 minutes."""
    t0 = now - 1800
    recs: list[dict[str, object]] = [{"t": t0, "kind": "daemon.start"},
                                     {"t": t0 + 5, "kind": "phase", "to": "ready"}]
    for i in range(1, 14):
        t = t0 + 120 * i
        recs += [{"t": t, "kind": "restart", "code": "exit_zero_unasked", "cause": "x"},
                 {"t": t, "kind": "phase", "to": "backoff"},
                 {"t": t + 6, "kind": "phase", "to": "ready"}]
    return recs


def test_the_view_starts_where_the_history_does() -> None:
    r = report.build(soak_like(NOW), NOW, 3600)
    assert r.timeline[0].state == report.UNKNOWN
    assert plot.view(r) == (NOW - 1800, NOW)
    full = report.build(soak_like(NOW), NOW, 1200)  # the history covers the whole window
    assert plot.view(full) == (NOW - 1200, NOW)


def test_label_rows_never_overlap_within_a_row() -> None:
    xs = [0.0, 10.0, 20.0, 200.0, 205.0]
    widths = [50.0] * 5
    rows = plot._label_rows(xs, widths, 3)
    assert rows == [0, 1, 2, 0, 1]
    for row in set(rows):
        spans = [(x, x + w) for x, w, r in zip(xs, widths, rows, strict=True) if r == row]
        assert all(a[1] < b[0] for a, b in itertools.pairwise(spans))


def test_svg_of_a_soak_like_history_draws_no_band_before_it_and_spreads_labels() -> None:
    r = report.build(soak_like(NOW), NOW, 3600)
    root = ET.fromstring(plot.svg(r))
    ns = "{http://www.w3.org/2000/svg}"
    texts = [e for e in root.iter(ns + "text") if (e.text or "") == "exit_zero_unasked"]
    assert len(texts) == 13
    ys = {e.get("y") for e in texts}
    assert len(ys) >= 2  # 13 labels ~100 px wide, 84 px apart: they need more than one row
    bands = [e for e in root.iter(ns + "rect") if e.get("class") == "phase"]
    unknown = [b for b in bands if b.get("data-state") == report.UNKNOWN]
    assert unknown and all(float(b.get("width") or 0) <= 0.5 for b in unknown)
    assert "no history before" in "".join(e.text or "" for e in root.iter(ns + "text"))
