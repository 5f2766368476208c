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
    "ready": "#2e7d32", "unhealthy": "#f9a825", "loading": "#1e88e5", "starting": "#90caf9",
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


def svg(r: Report, title: str = "nika-vllm") -> str:
    span = max(r.until - r.since, 1.0)
    plot_w = WIDTH - LEFT - RIGHT

    def x(t: float) -> float:
        return LEFT + plot_w * (min(max(t, r.since), r.until) - r.since) / span

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
           f'viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">',
           f'<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>']
    avail = "" if r.availability is None else f": {100 * r.availability:.2f} % ready"
    out.append(f'<text x="{LEFT}" y="24" font-size="16" font-weight="bold">'
               f'{escape(title)}{avail}, {len(r.outages)} outage(s), '
               f'{len(r.restarts)} restart(s)</text>')
    # phase bands
    for s in r.timeline:
        x0, x1 = x(s.start), x(s.end)
        out.append(f'<rect class="phase" data-state="{escape(s.state)}" x="{x0:.1f}" '
                   f'y="{BAND[0]}" width="{max(x1 - x0, 0.5):.1f}" height="{BAND[1] - BAND[0]}" '
                   f'fill="{COLORS.get(s.state, "#bdbdbd")}"><title>{escape(s.state)}</title>'
                   f'</rect>')
    # restarts: a mark through the band, the cause above it (staggered so neighbours differ)
    for i, (t, code, cause) in enumerate(r.restarts):
        xt = x(t)
        ly = BAND[0] - 8 - 12 * (i % 2)
        out.append(f'<line class="restart" x1="{xt:.1f}" x2="{xt:.1f}" y1="{ly + 2}" '
                   f'y2="{BAND[1]}" stroke="#c62828" stroke-width="1.5"/>')
        out.append(f'<text x="{xt + 2:.1f}" y="{ly}" fill="#c62828" font-size="10">'
                   f'{escape(code)}<title>{escape(cause)}</title></text>')
    for t, _code, why in r.give_ups:
        out.append(f'<text x="{x(t):.1f}" y="{BAND[1] + 14}" fill="#c62828" '
                   f'font-size="10">gave up<title>{escape(why)}</title></text>')
    # legend
    lx = LEFT
    for state in [s for s in COLORS if any(seg.state == s for seg in r.timeline)]:
        out.append(f'<rect x="{lx}" y="{BAND[1] + 22}" width="10" height="10" '
                   f'fill="{COLORS[state]}"/><text x="{lx + 14}" y="{BAND[1] + 31}">'
                   f'{state}</text>')
        lx += 24 + 7 * len(state)
    temps = [(t, v) for t, v, _ in r.gpu_samples if v is not None]
    mems = [(t, v / 1024**3) for t, _, v in r.gpu_samples if v is not None]
    out += _chart(temps, TEMP, x, "GPU temperature (C)", "#e65100")
    out += _chart(mems, MEM, x, "GPU memory used (GiB)", "#1565c0")
    for t in _ticks(r.since, r.until):
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
    import matplotlib.pyplot as plt

    dpi = 100
    fig, (ax_band, ax_temp, ax_mem) = plt.subplots(
        3, 1, figsize=(WIDTH / dpi, HEIGHT / dpi), dpi=dpi, sharex=True,
        gridspec_kw={"height_ratios": [1, 2, 2]})

    def to_h(t: float) -> float:  # hours before the end
        return (t - r.until) / 3600.0

    for s in r.timeline:
        ax_band.axvspan(to_h(s.start), to_h(s.end), color=COLORS.get(s.state, "#bdbdbd"),
                        label=s.state)
    for i, (t, code, _cause) in enumerate(r.restarts):
        ax_band.axvline(to_h(t), color="#c62828", linewidth=1)
        ax_band.text(to_h(t), 1.02 + 0.25 * (i % 2), code, color="#c62828", fontsize=7,
                     transform=ax_band.get_xaxis_transform())
    for t, _code, _why in r.give_ups:
        ax_band.text(to_h(t), -0.3, "gave up", color="#c62828", fontsize=7,
                     transform=ax_band.get_xaxis_transform())
    handles, labels = ax_band.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    ax_band.legend(unique.values(), unique.keys(), loc="upper left", ncol=6, fontsize=7,
                   bbox_to_anchor=(0, -0.05))
    ax_band.set_yticks([])
    avail = "" if r.availability is None else f": {100 * r.availability:.2f} % ready"
    ax_band.set_title(f"{title}{avail}, {len(r.outages)} outage(s), "
                      f"{len(r.restarts)} restart(s)", loc="left", pad=28)
    temps = [(to_h(t), v) for t, v, _ in r.gpu_samples if v is not None]
    mems = [(to_h(t), v / 1024**3) for t, _, v in r.gpu_samples if v is not None]
    for ax, pts, label, color in ((ax_temp, temps, "GPU temperature (C)", "#e65100"),
                                  (ax_mem, mems, "GPU memory used (GiB)", "#1565c0")):
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], color=color, linewidth=1)
        ax.set_ylabel(label, fontsize=8)
        ax.grid(alpha=0.3)
    ax_mem.set_xlim(to_h(r.since), 0)
    ax_mem.set_xlabel("hours before " + datetime.fromtimestamp(r.until, UTC)
                      .strftime("%Y-%m-%d %H:%M UTC"))
    fig.subplots_adjust(left=0.07, right=0.98, top=0.9, bottom=0.08, hspace=0.35)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
