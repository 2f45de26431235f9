"""A grouped bar chart of the session's results: devices side by side per workload.

Hand-written SVG, no plotting library (PNG is the same SVG rasterised by
``rsvg-convert``): the plugin must install with one ``pip
install`` and a chart is a few dozen rectangles.  The picture answers the
question the suite exists for, "how much faster is virtio than emulation?":

* one panel for random workloads, in IOPS, and one for sequential workloads, in
  bandwidth, because the two scales are incomparable and people judge random
  I/O by operations and streaming I/O by bytes;
* virtio (and vhost) devices in cool colours, emulated devices in warm ones, so
  the two families separate at a glance; each bar carries its value;
* when the session mixes accelerators, each group is ``workload (accel)``, since
  a TCG number next to a KVM number would mislead.

The drawing is built as a list of primitives first, which the SVG writer
serialises; that keeps layout testable without parsing SVG.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from html import escape
from pathlib import Path

from pytest_virtio.errors import ConfigError, MissingToolError
from pytest_virtio.results.metrics import Spread, spread
from pytest_virtio.results.perf import Status
from pytest_virtio.results.records import Record
from pytest_virtio.units import format_count

__all__ = [
    "Bar",
    "Panel",
    "VerdictLine",
    "build_panels",
    "is_network",
    "is_virtio",
    "render_svg",
    "write_chart",
]

VIRTIO_COLOURS = ("#1f5fa8", "#2a9d8f", "#5e60ce", "#48cae4", "#3d5a80")
EMULATED_COLOURS = ("#e76f51", "#f4a261", "#c1121f", "#9c6644", "#e9c46a", "#b5838d", "#6d6875")

FONT = "DejaVu Sans, Helvetica, Arial, sans-serif"
PANEL_HEIGHT = 300
MARGIN_LEFT = 90
MARGIN_RIGHT = 210  # legend column
TITLE_HEIGHT = 56
PANEL_GAP = 70
BAR_WIDTH = 34
BAR_GAP = 4
GROUP_GAP = 36
MIN_PLOT_WIDTH = 300.0
TITLE_CHAR_WIDTH = 8.6  # a 15 px bold character
HEADROOM = 1.08
_BIT_UNITS = (("bit/s", 1), ("kbit/s", 10**3), ("Mbit/s", 10**6), ("Gbit/s", 10**9))
_BW_UNITS = (("B/s", 1), ("KiB/s", 1 << 10), ("MiB/s", 1 << 20), ("GiB/s", 1 << 30))
_TIME_UNITS = (("ns", 1), ("µs", 1e3), ("ms", 1e6), ("s", 1e9))


def is_virtio(device: str) -> bool:
    """Paravirtual devices: ``virtio-*`` and ``vhost-*`` (vhost-user-blk is virtio too)."""
    return device.lower().startswith(("virtio", "vhost"))


def is_network(record: Record) -> bool:
    """Network transfers (iperf3) get their own panel, in bits per second."""
    return record.kind == "net"


@dataclass(frozen=True)
class Bar:
    device: str
    value: float  # already in the panel's unit (the median of the samples)
    label: str
    low: float | None = None  # the spread of the samples, when there were several
    high: float | None = None


@dataclass(frozen=True)
class Panel:
    """One chart panel: groups of bars sharing a y axis."""

    title: str
    y_label: str
    groups: tuple[tuple[str, tuple[Bar, ...]], ...]


def _group_name(record: Record, mixed: bool | str) -> str:
    """``workload``, or ``workload (accel)`` / ``workload (accel, machine)`` when the
    records mix them: numbers of another accelerator or host are never side by side."""
    if mixed == "machine":
        return f"{record.workload} ({record.accel}, {record.machine})"
    return f"{record.workload} ({record.accel})" if mixed else record.workload


def _spreads(records: Iterable[Record], metric: str, mixed: bool | str
             ) -> dict[str, dict[str, Spread]]:
    """group → device → spread of ``metric`` over every sample (rounds, repeats)."""
    values: dict[str, dict[str, list[float | None]]] = {}
    for record in records:
        devs = values.setdefault(_group_name(record, mixed), {})
        devs.setdefault(record.device, []).append(record.value(metric))
    out: dict[str, dict[str, Spread]] = {}
    for group, devs in values.items():
        got = {d: s for d, v in devs.items() if (s := spread(v)) is not None}
        if got:
            out[group] = got
    return out


def _compact_count(value: float) -> str:
    """Bar labels must fit above a narrow bar: 15,234 → '15.2k', 6,100 → '6.1k'."""
    if value >= 1e6:
        return f"{value / 1e6:.3g}M"
    if value >= 1e3:
        return f"{value / 1e3:.3g}k"
    return format_count(value)


def _device_order(devices: Iterable[str]) -> list[str]:
    """Virtio devices first, then emulated; alphabetical within each family."""
    return sorted(set(devices), key=lambda d: (not is_virtio(d), d))


def _panel(records: Sequence[Record], metric: str, title: str, y_label: str,
           mixed: bool | str,
           units: Sequence[tuple[str, float]] = (("", 1.0),), factor: float = 1.0,
           label: Callable[[float], str] = lambda v: f"{v:.3g}") -> Panel | None:
    """A panel of ``metric``'s medians (times ``factor``), scaled to the best-fitting unit;
    bars carry the samples' min..max as error bars."""
    spreads = _spreads(records, metric, mixed)
    if not spreads:
        return None
    peak = max(s.high for devs in spreads.values() for s in devs.values()) * factor
    unit, scale = next(((u, k) for u, k in reversed(units) if peak >= k), units[0])
    k = factor / scale
    groups = tuple(
        (g, tuple(Bar(d, s.median * k, label(s.median * k),
                      *((s.low * k, s.high * k) if s.n > 1 else (None, None)))
                  for d in _device_order(spreads[g]) for s in (spreads[g][d],)))
        for g in sorted(spreads)
    )
    return Panel(title, y_label.format(unit=unit), groups)


def build_panels(records: Sequence[Record]) -> list[Panel]:
    """The panels to draw: IOPS for random workloads, bandwidth for sequential ones,
    network throughput, p99 latency of random I/O, then the mechanism: traps and
    interrupts per I/O (counted, so they hold on a loaded host)."""
    mixed: bool | str = ("machine" if len({r.machine for r in records}) > 1
                         else len({r.accel for r in records}) > 1)
    network = [r for r in records if is_network(r)]
    storage = [r for r in records if not is_network(r)]
    random = [r for r in storage if not r.sequential]
    sequential = [r for r in storage if r.sequential]
    candidates = [
        _panel(random, "iops", "Random I/O — IOPS (higher is better)", "IOPS", mixed,
               label=_compact_count),
        _panel(sequential, "bw", "Sequential I/O — bandwidth (higher is better)",
               "bandwidth ({unit})", mixed, _BW_UNITS),
        _panel(network, "bw", "Network — TCP throughput (higher is better)",
               "throughput ({unit})", mixed, _BIT_UNITS, factor=8),
        _panel(random, "lat_p99", "Random I/O — p99 latency (lower is better)",
               "p99 latency ({unit})", mixed, _TIME_UNITS),
        _panel(records, "traps_per_io", "Device traps per I/O (lower is better)",
               "traps per I/O (VM exits under KVM)", mixed),
        _panel(records, "irqs_per_io", "Interrupts per I/O (lower is better)",
               "interrupts per I/O", mixed),
    ]
    return [p for p in candidates if p is not None]


def nice_ticks(peak: float, target: int = 5) -> list[float]:
    """Round axis ticks (1, 2, 2.5 or 5 times 10^k) from 0 to at least ``peak``."""
    if peak <= 0:
        return [0.0, 1.0]
    raw = peak / target
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    count = math.ceil(peak / step - 1e-9)
    return [round(i * step, 10) for i in range(count + 1)]


def _tick_label(value: float) -> str:
    if value >= 1e6:
        return f"{value / 1e6:g}M"
    if value >= 1e3:
        return f"{value / 1e3:g}k"
    return f"{value:g}"


class _Svg:
    """A tiny SVG builder: just what the chart needs, escaping every text."""

    def __init__(self) -> None:
        self.parts: list[str] = []

    def rect(self, x: float, y: float, w: float, h: float, fill: str, tooltip: str = "") -> None:
        head = f'<rect x="{x:.1f}" y="{y:.1f}" width="{w:.1f}" height="{h:.1f}" fill="{fill}"'
        if tooltip:
            self.parts.append(f"{head}><title>{escape(tooltip)}</title></rect>")
        else:
            self.parts.append(f"{head}/>")

    def line(self, x1: float, y1: float, x2: float, y2: float, stroke: str, width: float) -> None:
        self.parts.append(
            f'<line x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" '
            f'stroke="{stroke}" stroke-width="{width}"/>'
        )

    def text(
        self,
        x: float,
        y: float,
        content: str,
        *,
        size: int = 12,
        anchor: str = "middle",
        weight: str = "normal",
        fill: str = "#222",
        rotate: int = 0,
    ) -> None:
        transform = f' transform="rotate({rotate} {x:.1f} {y:.1f})"' if rotate else ""
        self.parts.append(
            f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}" '
            f'font-weight="{weight}" fill="{fill}"{transform}>{escape(content)}</text>'
        )


def _colours(devices: Sequence[str]) -> dict[str, str]:
    """Stable colours: virtio devices from the cool palette, emulated from the warm one."""
    result: dict[str, str] = {}
    virtio = [d for d in devices if is_virtio(d)]
    emulated = [d for d in devices if not is_virtio(d)]
    for family, palette in ((virtio, VIRTIO_COLOURS), (emulated, EMULATED_COLOURS)):
        for index, device in enumerate(family):
            result[device] = palette[index % len(palette)]
    return result


LABEL_CHAR_WIDTH = 7.5  # a 13 px sans-serif character, generously


def _group_width(name: str, bars: Sequence[Bar]) -> float:
    """As wide as its own bars (a sparse group leaves no hole), but never narrower than
    its label: two 2-bar network groups would otherwise print their names over each other."""
    span = len(bars) * (BAR_WIDTH + BAR_GAP) - BAR_GAP
    return max(span, len(name) * LABEL_CHAR_WIDTH)


def _bars_width(panel: Panel) -> float:
    widths = sum(_group_width(name, bars) for name, bars in panel.groups)
    return widths + (len(panel.groups) + 1) * GROUP_GAP


def _panel_width(panel: Panel) -> float:
    """As wide as its bars or its title, whichever is wider (no empty plot area)."""
    return max(_bars_width(panel), len(panel.title) * TITLE_CHAR_WIDTH, MIN_PLOT_WIDTH)


def _draw_panel(
    svg: _Svg, panel: Panel, top: float, plot_width: float, colours: dict[str, str]
) -> None:
    left, bottom = MARGIN_LEFT, top + PANEL_HEIGHT
    peak = max((max(b.value, b.high or 0.0) for _, bars in panel.groups for b in bars),
               default=0.0)
    ticks = nice_ticks(peak * HEADROOM)  # room for the value label above the tallest bar
    y_max = ticks[-1] or 1.0

    def y_of(value: float) -> float:
        return bottom - value / y_max * PANEL_HEIGHT

    svg.text(left, top - 14, panel.title, size=15, anchor="start", weight="bold")
    for tick in ticks:
        y = y_of(tick)
        svg.line(left, y, left + plot_width, y, "#e3e3e3", 1)
        svg.text(left - 8, y + 4, _tick_label(tick), size=11, anchor="end", fill="#555")
    svg.line(left, top, left, bottom, "#444", 1.2)
    svg.line(left, bottom, left + plot_width, bottom, "#444", 1.2)
    svg.text(left - 62, top + PANEL_HEIGHT / 2, panel.y_label, size=13, rotate=-90)
    svg.text(left + plot_width / 2, bottom + 44, "workload", size=13)

    start: float = left + GROUP_GAP + (plot_width - _bars_width(panel)) / 2  # centred
    for group, bars in panel.groups:
        width = _group_width(group, bars)
        span = len(bars) * (BAR_WIDTH + BAR_GAP) - BAR_GAP
        x = start + (width - span) / 2
        for bar in bars:
            y = y_of(bar.value)
            tip = f"{bar.device}: {bar.label}"
            if bar.low is not None and bar.high is not None:
                tip += f" (median; samples {bar.low:.3g}..{bar.high:.3g})"
            svg.rect(x, y, BAR_WIDTH, bottom - y, colours[bar.device], tip)
            label_y = y
            if bar.low is not None and bar.high is not None:
                mid, hi = x + BAR_WIDTH / 2, y_of(bar.high)
                svg.line(mid, y_of(bar.low), mid, hi, "#222", 1.3)
                for end in (bar.low, bar.high):
                    svg.line(mid - 6, y_of(end), mid + 6, y_of(end), "#222", 1.3)
                label_y = min(y, hi)
            svg.text(x + BAR_WIDTH / 2, label_y - 5, bar.label, size=11)
            x += BAR_WIDTH + BAR_GAP
        svg.text(start + width / 2, bottom + 20, group, size=13)
        start += width + GROUP_GAP


def _draw_legend(
    svg: _Svg, devices: Sequence[str], colours: dict[str, str], x: float, y: float
) -> None:
    svg.text(x, y, "device", size=13, anchor="start", weight="bold")
    row = y + 10
    for family, title in ((True, "paravirtual (virtio)"), (False, "emulated")):
        members = [d for d in devices if is_virtio(d) == family]
        if not members:
            continue
        row += 20
        svg.text(x, row, title, size=12, anchor="start", fill="#555")
        for device in members:
            row += 22
            svg.rect(x, row - 12, 16, 16, colours[device])
            svg.text(x + 24, row + 1, device, size=12, anchor="start")
        row += 6


VERDICT_LINE = 18


@dataclass(frozen=True)
class VerdictLine:
    """One relative check under the chart: its judged status (which picks the colour)
    and its line (verdict, measured and required ratio) as the summary prints it."""

    status: Status
    text: str


VERDICT_FILLS = {Status.FAILED: "#c1121f", Status.INCONCLUSIVE: "#9c6644", Status.OK: "#1b7f3b"}


def render_svg(records: Sequence[Record], title: str = "pytest-virtio: I/O by device",
               verdicts: Sequence[VerdictLine] = ()) -> str:
    """The whole chart as an SVG document; ``verdicts`` are the relative checks,
    listed under the panels in their status's colour."""
    if not records:
        raise ConfigError("no I/O results to chart (did any test run a workload?)")
    panels = build_panels(records)
    devices = _device_order(r.device for r in records)
    colours = _colours(devices)
    plot_width = max(_panel_width(p) for p in panels)
    longest = max((len(v.text) for v in verdicts), default=0) * 6.6
    width = max(MARGIN_LEFT + plot_width + MARGIN_RIGHT, MARGIN_LEFT + longest + 20)
    verdict_height = (len(verdicts) + 2) * VERDICT_LINE if verdicts else 0
    height = (TITLE_HEIGHT + len(panels) * (PANEL_HEIGHT + PANEL_GAP + 30) + 10
              + verdict_height)
    accels = ", ".join(sorted({r.accel for r in records}))

    svg = _Svg()
    svg.rect(0, 0, width, height, "#ffffff")
    svg.text(width / 2, 28, title, size=18, weight="bold")
    svg.text(width / 2, 46, f"accelerator: {accels}", size=12, fill="#555")
    top = TITLE_HEIGHT + PANEL_GAP - 20
    for panel in panels:
        _draw_panel(svg, panel, top, _panel_width(panel), colours)
        top += PANEL_HEIGHT + PANEL_GAP + 30
    _draw_legend(svg, devices, colours, MARGIN_LEFT + plot_width + 30, TITLE_HEIGHT + 40)
    if verdicts:
        svg.text(MARGIN_LEFT, top, "Relative checks (verdict, measured vs required ratio)",
                 size=15, anchor="start", weight="bold")
        for index, verdict in enumerate(verdicts, start=1):
            svg.text(MARGIN_LEFT, top + index * VERDICT_LINE + 4, verdict.text, size=12,
                     anchor="start", fill=VERDICT_FILLS[verdict.status])
    body = "\n  ".join(svg.parts)
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
        f'viewBox="0 0 {width:.0f} {height:.0f}" font-family="{FONT}">\n  {body}\n</svg>\n'
    )


def svg_to_png(svg: str, target: Path) -> None:
    """Rasterise with ``rsvg-convert`` (Debian librsvg2-bin): text needs a real renderer.

    Shipping a font rasteriser in a test plugin is not worth it; a host that
    wants PNG installs one small package, and the error says which.
    """
    tool = shutil.which("rsvg-convert")
    if tool is None:
        raise MissingToolError(
            "rsvg-convert", "librsvg2-bin", "needed for a .png chart; .svg works"
        )
    done = subprocess.run(
        [tool, "--format=png", f"--output={target}"],
        input=svg.encode(),
        capture_output=True,
        timeout=60,
        check=False,
    )
    if done.returncode != 0:
        raise ConfigError(f"rsvg-convert failed for {target}: {done.stderr.decode().strip()}")


def write_chart(records: Sequence[Record], path: str | os.PathLike[str],
                verdicts: Sequence[VerdictLine] = ()) -> None:
    """Write the chart to ``path``; the suffix picks the format: ``.svg`` or ``.png``."""
    target = Path(path)
    suffix = target.suffix.lower()
    if suffix not in (".svg", ".png"):
        raise ConfigError(
            f"chart path {os.fspath(path)!r}: unsupported suffix {suffix!r}; use .svg or .png"
        )
    svg = render_svg(records, verdicts=verdicts)
    target.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".png":
        svg_to_png(svg, target)
    else:
        target.write_text(svg, encoding="utf-8")
