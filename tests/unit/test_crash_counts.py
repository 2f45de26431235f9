"""Crash-state counts travel from a worker to the summary and the JSON unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pytest_virtio.errors import ConfigError
from pytest_virtio.results.crash import CrashCount, crash_lines
from pytest_virtio.results.finish import summary_lines
from pytest_virtio.results.records import SessionResults, load_session, write_json

PASSED = CrashCount("t.py::test_ok", "data", 0, 14, 14, 0, 31.5)
FAILED = CrashCount("t.py::test_bad", "data", 3, 7, 2, 1, 9.25,
                    first_failure="state 1 (flush-boundary: power cut after request 9 ...)",
                    kept_image="/a/state-001.img", reproducer="/a/reproduce.sh")


def test_a_count_survives_a_worker_to_controller_trip() -> None:
    worker = SessionResults(crash=[PASSED, FAILED])
    controller = SessionResults()
    controller.merge_dict(json.loads(json.dumps(worker.to_dict())))
    assert controller.crash == [PASSED, FAILED]


def test_the_json_file_holds_the_counts_and_reads_back(tmp_path: Path) -> None:
    path = tmp_path / "results.json"
    write_json([], path, crash=[FAILED])
    data = json.loads(path.read_text())
    assert data["crash"] == [FAILED.to_dict()]
    assert load_session(path).crash == [FAILED]


@pytest.mark.parametrize(("field", "value"), [("checked", "2"), ("failed", None),
                                              ("seed", True), ("kept_image", 3)])
def test_a_malformed_count_is_an_error_naming_the_field(field: str, value: object) -> None:
    data = {**FAILED.to_dict(), field: value}
    with pytest.raises(ConfigError, match=f"field '{field}'"):
        CrashCount.from_dict(data)


def test_the_summary_totals_then_names_the_first_failure_and_its_reproducer() -> None:
    lines = summary_lines(SessionResults(crash=[PASSED, FAILED]), [])
    assert lines[0] == "crash states: 21 generated, 16 checked, 1 failed in 2 check(s)"
    text = "\n".join(lines)
    assert "t.py::test_bad disk 'data': 7 generated, 2 checked, 1 failed (seed 3, 9.2s)" in text
    assert "first failure: state 1 (flush-boundary" in text
    assert "reproduce: /a/reproduce.sh" in text
    assert text.index("test_bad") < text.index("test_ok")  # sorted: -n 2 prints as -n 0


def test_no_checks_no_section() -> None:
    assert crash_lines([]) == []
