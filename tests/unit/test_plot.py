"""Chart: panel building, tick choice, well-formed SVG, PNG via rsvg-convert."""

from __future__ import annotations

import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from pytest_virtio.errors import ConfigError
from pytest_virtio.results.finish import judge_relative
from pytest_virtio.results.perf import Status
from pytest_virtio.results.plot import (
    EMULATED_COLOURS,
    VERDICT_FILLS,
    VIRTIO_COLOURS,
    VerdictLine,
    build_panels,
    is_virtio,
    nice_ticks,
    render_svg,
    write_chart,
)
from pytest_virtio.results.records import Record, RelativeCheck, SessionResults

SVG = "{http://www.w3.org/2000/svg}"


def rec(device: str, workload: str, iops: float, bw: float = 0.0, accel: str = "tcg") -> Record:
    return Record(f"test_{workload}[{device}]", device, workload, accel, "m", iops, bw, 1e6,
                  sequential=not workload.startswith("rand"))


RECORDS = [
    rec("virtio-blk", "randread", 16_200),
    rec("ide", "randread", 5_400),
    rec("ide", "randread", 5_600),  # repeat: the median, with the spread as error bar
    rec("vhost-user-blk", "randwrite", 15_800),
    rec("virtio-blk", "read", 420, 420 * 1024**2),
    rec("ide <&>", "read", 95, 95 * 1024**2),
]


def test_classification() -> None:
    assert is_virtio("virtio-blk") and is_virtio("vhost-user-blk") and not is_virtio("ide")


def test_panels_split_random_and_sequential() -> None:
    random, sequential, latency = build_panels(RECORDS)
    assert latency.title.startswith("Random I/O — p99") and latency.y_label == "p99 latency (ms)"
    assert random.y_label == "IOPS"
    assert [g for g, _ in random.groups] == ["randread", "randwrite"]
    bars = dict(random.groups)["randread"]
    assert [(b.device, b.value, b.label) for b in bars] == [
        ("virtio-blk", 16_200, "16.2k"),
        ("ide", 5_500, "5.5k"),
    ]
    assert (bars[1].low, bars[1].high) == (5_400, 5_600) and bars[0].low is None
    assert sequential.y_label == "bandwidth (MiB/s)"
    [(group, seq_bars)] = sequential.groups
    assert group == "read"
    assert [b.value for b in seq_bars] == [420, 95]


def test_mixed_accelerators_split_groups() -> None:
    [panel, _p99] = build_panels([rec("ide", "randread", 1),
                                  rec("ide", "randread", 3, accel="kvm")])
    assert [g for g, _ in panel.groups] == ["randread (kvm)", "randread (tcg)"]


def test_mechanism_panels_error_bars_and_verdicts() -> None:
    counted = [
        Record("t[ide]", "ide", "randread", "tcg", "m", 2000, 0, traps_per_io=26.0,
               irqs_per_io=1.0),
        Record("t[vb]", "virtio-blk", "randread", "tcg", "m", 3000, 0, traps_per_io=0.4),
        Record("t[vb]", "virtio-blk", "randread", "tcg", "m", 5000, 0, traps_per_io=0.6),
    ]
    panels = {p.title.split(" (")[0]: p for p in build_panels(counted)}
    traps = dict(panels["Device traps per I/O"].groups)["randread"]
    assert [(b.device, b.value) for b in traps] == [("virtio-blk", 0.5), ("ide", 26.0)]
    [irq] = dict(panels["Interrupts per I/O"].groups)["randread"]  # only IDE counted them
    assert irq.device == "ide"
    verdict = "ok           virtio-blk vs ide (randread, traps_per_io, tcg): 52.00x, required 10x"
    root = ET.fromstring(render_svg(counted, verdicts=[VerdictLine(Status.OK, verdict)]))
    texts = [t.text for t in root.iter(f"{SVG}text")]
    assert verdict in texts
    # The spread is drawn: an error bar from 3,000 to 5,000 IOPS with two caps.
    lines = list(root.iter(f"{SVG}line"))
    assert sum(1 for ln in lines if ln.get("stroke") == "#222") >= 3


def _verdict_fills(svg: str, lines: list[VerdictLine] | tuple[VerdictLine, ...]
                   ) -> dict[str, str | None]:
    """The colours the chart drew ``lines`` in (by their text)."""
    texts = {line.text for line in lines}
    return {t.text: t.get("fill") for t in ET.fromstring(svg).iter(f"{SVG}text")
            if t.text in texts}


def test_chart_colours_verdicts_by_the_judgement_not_by_their_wording() -> None:
    """The chart's colour is the check's judged status: a line that does not start with
    the summary's word for it (say, a reworded summary) is coloured all the same."""
    counted = [Record("t[vb]", "virtio-blk", "randread", "tcg", "m", 3000, 0, group="t")]
    lines = [VerdictLine(Status.FAILED, "virtio-blk vs ide: 0.50x, required 2x (missed)"),
             VerdictLine(Status.INCONCLUSIVE, "ok? virtio-blk vs ahci: spreads overlap"),
             VerdictLine(Status.OK, "FAILED-looking text, virtio-blk vs nvme: 3.00x")]
    fills = _verdict_fills(render_svg(counted, verdicts=lines), lines)
    assert fills == {line.text: VERDICT_FILLS[line.status] for line in lines}
    assert len(set(fills.values())) == 3


def test_session_judgement_hands_the_chart_one_typed_verdict_per_check() -> None:
    """judge_relative's verdicts are the outcomes perf judged, with the lines the summary
    prints: the chart no longer picks them out of the printed text."""
    records = [Record(f"t[{d}]", d, "randread", "tcg", "m", iops, 0, group="t")
               for d, iops in (("ide", 1000), ("virtio-blk", 3000), ("ahci", 2000))]
    checks = [RelativeCheck("t[virtio-blk]", "t", "virtio-blk", "randread", "tcg", ref, by, "iops",
                            "m") for ref, by in (("ide", 2.0), ("ahci", 2.0))]
    judgement = judge_relative(SessionResults(records, checks))
    assert [v.status for v in judgement.verdicts] == [Status.OK, Status.FAILED]
    assert [v.text for v in judgement.verdicts] == [
        line for line in judgement.lines if line.startswith(("ok ", "FAILED "))]
    fills = _verdict_fills(render_svg(records, verdicts=judgement.verdicts), judgement.verdicts)
    assert list(fills.values()) == [VERDICT_FILLS[Status.OK], VERDICT_FILLS[Status.FAILED]]


@pytest.mark.parametrize(
    ("peak", "expected"),
    [
        (18_100, [0, 5000, 10000, 15000, 20000]),
        (400, [0, 100, 200, 300, 400]),
        (0.3, [0, 0.1, 0.2, 0.3]),
        (0, [0, 1]),
    ],
)
def test_nice_ticks(peak: float, expected: list[float]) -> None:
    assert nice_ticks(peak) == pytest.approx(expected)


def test_svg_is_wellformed_and_readable() -> None:
    svg = render_svg(RECORDS)
    root = ET.fromstring(svg)
    texts = [t.text for t in root.iter(f"{SVG}text")]
    for needed in [
        "IOPS",
        "bandwidth (MiB/s)",
        "workload",
        "16.2k",
        "5.5k",
        "420",
        "device",
        "paravirtual (virtio)",
        "emulated",
        "ide <&>",
        "randread",
        "read",
    ]:
        assert needed in texts
    assert any(t and t.startswith("Random I/O") for t in texts)
    fills = {r.get("fill") for r in root.iter(f"{SVG}rect")}
    assert VIRTIO_COLOURS[0] in fills and EMULATED_COLOURS[0] in fills
    tooltips = [t.text for t in root.iter(f"{SVG}title")]
    assert "virtio-blk: 16.2k" in tooltips


def test_bar_heights_are_proportional() -> None:
    root = ET.fromstring(
        render_svg([rec("virtio-blk", "randread", 20_000), rec("ide", "randread", 5_000)])
    )
    heights = {
        r.findtext(f"{SVG}title"): float(r.get("height", 0))
        for r in root.iter(f"{SVG}rect")
        if r.find(f"{SVG}title") is not None
    }
    assert heights["virtio-blk: 20k"] == pytest.approx(4 * heights["ide: 5k"], rel=0.01)


def test_write_svg_and_errors(tmp_path: Path) -> None:
    target = tmp_path / "out" / "chart.svg"
    write_chart(RECORDS, target)
    assert target.read_text().startswith("<svg")
    with pytest.raises(ConfigError, match=r"'\.pdf'"):
        write_chart(RECORDS, tmp_path / "chart.pdf")
    with pytest.raises(ConfigError, match="no I/O results"):
        write_chart([], tmp_path / "empty.svg")


@pytest.mark.skipif(shutil.which("rsvg-convert") is None, reason="librsvg2-bin not installed")
def test_write_png(tmp_path: Path) -> None:
    target = tmp_path / "chart.png"
    write_chart(RECORDS, target)
    assert target.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_png_without_rsvg_names_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pytest_virtio.errors import MissingToolError

    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(MissingToolError, match="librsvg2-bin"):
        write_chart(RECORDS, tmp_path / "chart.png")
