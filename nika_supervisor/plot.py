"""The report's picture: phase bands over time, restarts marked with their causes, and GPU
temperature and memory below.

Two renderers of one layout. SVG is written directly (stdlib only: a text file any browser
shows, a few milliseconds). PNG uses matplotlib, the optional `[report]` extra: about 175 MB
installed with numpy and about 0.4 s to import (docs/BENCHMARKS.md), which a daemon's host
should not need to carry for one picture.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from xml.sax.saxutils import escape

from nika_supervisor.report import DOWN, UNKNOWN, Report

WIDTH, HEIGHT = 1200, 620
LEFT, RIGHT = 80, 30
BAND = (70, 130)  # phase band, y top and bottom
TEMP = (200, 360)
MEM = (420, 580)
COLORS = {
    "ready": "#2e7d32", "unhealthy": "#fdd835", "loading": "#1e88e5", "starting": "#90caf9",
    "backoff": "#fb8c00", "stopping": "#8e24aa", "failed": "#c62828", "stopped": "#757575",
    DOWN: "#212121", UNKNOWN: "#e0e0e0",
}
INSTALL_HINT = ("PNG needs matplotlib: pip install 'nika-supervisor[report]' "
                "(or write an SVG instead: --plot FILE.svg, no extra needed)")


def _ticks(since: float, until: float) -> list[float]:
    span = until - since
    step = next((s for s in (600, 1800, 3600, 3 * 3600, 6 * 3600, 12 * 3600, 86400)
                 if span / s <= 10), 7 * 86400)
    first = (since // step + 1) * step
    return [first + i * step for i in range(int((until - first) // step) + 1)]


def _tick_label(t: float, span: float) -> str:
    d = datetime.fromtimestamp(t, UTC)
    return d.strftime("%H:%M") if span <= 86400 and d.hour + d.minute else d.strftime(
        "%m-%d %H:%M")


def view(r: Report) -> tuple[float, float]:
    """The time span drawn: the report's window, less a leading stretch that no history
    covers (a 48-hour report of a daemon installed two hours ago draws those two hours)."""
    segs = r.timeline
    if len(segs) > 1 and segs[0].state == UNKNOWN:
        return segs[0].end, r.until
    return r.since, r.until


def _subtitle(r: Report, since: float) -> str:
    if since <= r.since:
        return ""
    return f" (no history before {_tick_label(since, r.until - since)} UTC)"


def _label_rows(xs: Sequence[float], widths: Sequence[float], rows: int) -> list[int]:
    """A row for each label at xs (pixels, in order), the first whose last label ends before
    it starts; all rows taken: the row that frees up first."""
    ends = [float("-inf")] * rows
    out = []
    for x0, w in zip(xs, widths, strict=True):
        row = next((i for i, e in enumerate(ends) if e < x0), min(range(rows),
                                                                 key=ends.__getitem__))
        ends[row] = x0 + w + 4
        out.append(row)
    return out


def svg(r: Report, title: str = "nika-vllm") -> str:
    since, until = view(r)
    span = max(until - since, 1.0)
    plot_w = WIDTH - LEFT - RIGHT

    def x(t: float) -> float:
        return LEFT + plot_w * (min(max(t, since), until) - since) / span

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
           f'viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">',
           f'<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>']
    avail = "" if r.availability is None else f": {100 * r.availability:.2f} % ready"
    out.append(f'<text x="{LEFT}" y="24" font-size="16" font-weight="bold">'
               f'{escape(title)}{avail}, {len(r.outages)} outage(s), '
               f'{len(r.restarts)} restart(s){escape(_subtitle(r, since))}</text>')
    # phase bands
    for s in r.timeline:
        x0, x1 = x(s.start), x(s.end)
        out.append(f'<rect class="phase" data-state="{escape(s.state)}" x="{x0:.1f}" '
                   f'y="{BAND[0]}" width="{max(x1 - x0, 0.5):.1f}" height="{BAND[1] - BAND[0]}" '
                   f'fill="{COLORS.get(s.state, "#bdbdbd")}"><title>{escape(s.state)}</title>'
                   f'</rect>')
    # restarts: a mark through the band, the cause above it (staggered so neighbours differ)
    rows = _label_rows([x(t) for t, _, _ in r.restarts],
                       [6.0 * len(code) for _, code, _ in r.restarts], 3)
    for (t, code, cause), row in zip(r.restarts, rows, strict=True):
        xt = x(t)
        ly = BAND[0] - 6 - 11 * row
        out.append(f'<line class="restart" x1="{xt:.1f}" x2="{xt:.1f}" y1="{ly + 2}" '
                   f'y2="{BAND[1]}" stroke="#c62828" stroke-width="1.5"/>')
        out.append(f'<text x="{xt + 2:.1f}" y="{ly}" fill="#c62828" font-size="10">'
                   f'{escape(code)}<title>{escape(cause)}</title></text>')
    for t, _code, why in r.give_ups:
        out.append(f'<text x="{x(t):.1f}" y="{BAND[1] + 14}" fill="#c62828" '
                   f'font-size="10">gave up<title>{escape(why)}</title></text>')
    # legend
    lx = LEFT
    for state in [s for s in COLORS if any(seg.state == s and seg.end > since
                                           for seg in r.timeline)]:
        out.append(f'<rect x="{lx}" y="{BAND[1] + 22}" width="10" height="10" '
                   f'fill="{COLORS[state]}"/><text x="{lx + 14}" y="{BAND[1] + 31}">'
                   f'{state}</text>')
        lx += 24 + 7 * len(state)
    temps = [(t, v) for t, v, _ in r.gpu_samples if v is not None]
    mems = [(t, v / 1024**3) for t, _, v in r.gpu_samples if v is not None]
    out += _chart(temps, TEMP, x, "GPU temperature (C)", "#e65100")
    out += _chart(mems, MEM, x, "GPU memory used (GiB)", "#1565c0")
    for t in _ticks(since, until):
        xt = x(t)
        out.append(f'<line x1="{xt:.1f}" x2="{xt:.1f}" y1="{MEM[1]}" y2="{MEM[1] + 5}" '
                   f'stroke="black"/><text x="{xt:.1f}" y="{MEM[1] + 18}" '
                   f'text-anchor="middle">{_tick_label(t, span)}</text>')
    out.append(f'<text x="{WIDTH - RIGHT}" y="{HEIGHT - 6}" text-anchor="end" '
               f'font-size="10">UTC</text></svg>')
    return "\n".join(out) + "\n"


def _chart(points: Sequence[tuple[float, float]], box: tuple[int, int],
           x: Callable[[float], float],
           label: str, color: str) -> list[str]:
    top, bottom = box
    out = [f'<text x="{LEFT}" y="{top - 8}" font-weight="bold">{escape(label)}</text>',
           f'<rect x="{LEFT}" y="{top}" width="{WIDTH - LEFT - RIGHT}" '
           f'height="{bottom - top}" fill="none" stroke="#9e9e9e"/>']
    if not points:
        out.append(f'<text x="{LEFT + 10}" y="{(top + bottom) // 2}" fill="#757575">'
                   f'no samples</text>')
        return out
    lo, hi = min(v for _, v in points), max(v for _, v in points)
    if hi - lo < 1e-9:
        lo, hi = lo - 1, hi + 1
    pad = (hi - lo) * 0.1
    lo, hi = lo - pad, hi + pad

    def y(v: float) -> float:
        return bottom - (bottom - top) * (v - lo) / (hi - lo)

    path = " ".join(f"{x(t):.1f},{y(v):.1f}" for t, v in points)
    out.append(f'<polyline class="series" points="{path}" fill="none" stroke="{color}" '
               f'stroke-width="1.5"/>')
    for v in (lo + pad, hi - pad):
        out.append(f'<text x="{LEFT - 6}" y="{y(v) + 4:.1f}" text-anchor="end">{v:.1f}</text>')
    return out


def png(r: Report, path: str, title: str = "nika-vllm") -> None:
    """The same picture through matplotlib (the `[report]` extra); ImportError without it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    dpi = 100
    fig, (ax_band, ax_temp, ax_mem) = plt.subplots(
        3, 1, figsize=(WIDTH / dpi, HEIGHT / dpi), dpi=dpi, sharex=True,
        gridspec_kw={"height_ratios": [1, 2, 2]})
    since, until = view(r)

    def d(t: float) -> datetime:
        return datetime.fromtimestamp(t, UTC)

    for s in r.timeline:
        if s.end <= since:
            continue
        ax_band.axvspan(d(max(s.start, since)), d(s.end), color=COLORS.get(s.state, "#bdbdbd"),
                        label=s.state, linewidth=0)
    # restart marks, their cause codes above the band in up to three rows that do not overlap
    left, right = 0.07, 0.98
    px = WIDTH * (right - left) / max(until - since, 1.0)
    rows = _label_rows([(t - since) * px for t, _, _ in r.restarts],
                       [5.2 * len(code) for _, code, _ in r.restarts], 3)
    for (t, code, _cause), row in zip(r.restarts, rows, strict=True):
        ax_band.axvline(d(t), color="#c62828", linewidth=1)
        ax_band.text(d(t), 1.04 + 0.22 * row, code, color="#c62828", fontsize=7,
                     transform=ax_band.get_xaxis_transform())
    for t, _code, _why in r.give_ups:
        ax_band.text(d(t), -0.3, "gave up", color="#c62828", fontsize=7,
                     transform=ax_band.get_xaxis_transform())
    handles, labels = ax_band.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    ax_band.legend(unique.values(), unique.keys(), loc="upper left", ncol=9, fontsize=7,
                   bbox_to_anchor=(0, -0.05), frameon=False)
    ax_band.set_yticks([])
    avail = "" if r.availability is None else f": {100 * r.availability:.2f} % ready"
    ax_band.set_title(f"{title}{avail}, {len(r.outages)} outage(s), "
                      f"{len(r.restarts)} restart(s){_subtitle(r, since)}", loc="left", pad=40)
    temps = [(d(t), v) for t, v, _ in r.gpu_samples if v is not None]
    mems = [(d(t), v / 1024**3) for t, _, v in r.gpu_samples if v is not None]
    for ax, pts, label, color in ((ax_temp, temps, "GPU temperature (C)", "#e65100"),
                                  (ax_mem, mems, "GPU memory used (GiB)", "#1565c0")):
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], color=color, linewidth=1)
            ax.grid(alpha=0.3)
        else:  # gpu.nvml off, or no GPU: say so rather than draw an empty 0..1 axis
            ax.set_yticks([])
            ax.text(0.5, 0.5, "no GPU samples in this window", transform=ax.transAxes,
                    ha="center", va="center", color="#757575", fontsize=10)
        ax.set_ylabel(label, fontsize=8)
    ax_mem.set_xlim(d(since), d(until))
    span = until - since  # ticks: at most 10, on round minutes or hours
    step = next((m for m in (1, 2, 5, 10, 15, 30, 60, 120, 180, 360, 720)
                 if span / 60 / m <= 10), None)
    if step is None:
        ax_mem.xaxis.set_major_locator(mdates.DayLocator(tz=UTC))  # type: ignore[no-untyped-call]
    elif step < 60:
        ax_mem.xaxis.set_major_locator(mdates.MinuteLocator(range(0, 60, step), tz=UTC))  # type: ignore[no-untyped-call]
    else:
        ax_mem.xaxis.set_major_locator(mdates.HourLocator(range(0, 24, step // 60), tz=UTC))  # type: ignore[no-untyped-call]
    fmt = "%H:%M" if span <= 86400 else "%m-%d %H:%M"
    ax_mem.xaxis.set_major_formatter(
        mdates.DateFormatter(fmt, tz=UTC))  # type: ignore[no-untyped-call]
    ax_mem.set_xlabel(f"UTC, {d(since):%Y-%m-%d %H:%M} to {d(until):%Y-%m-%d %H:%M}")
    fig.subplots_adjust(left=left, right=right, top=0.86, bottom=0.08, hspace=0.35)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
