"""A first-run image build says what it is doing: steps, heartbeats, waits for another builder."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from filelock import FileLock

from pytest_virtio.images import builder


def test_a_quiet_build_step_says_it_is_still_running(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(builder, "HEARTBEAT", 0.1)
    said: list[str] = []
    builder._run(["sh", "-c", "sleep 0.45; echo 'I: configuring'; echo n$((1))oise"], said.append,
                 "step 1/3 mmdebstrap", tmp_path / "tmp")
    assert said[0].startswith("step 1/3 mmdebstrap: sh -c")
    beats = [m for m in said if "still running" in m]
    assert len(beats) >= 2, said
    assert said[-1] == "step 1/3 mmdebstrap: I: configuring"
    assert not any("noise" in m for m in said)


def test_a_failed_step_raises_with_its_tail(tmp_path: Path) -> None:
    with pytest.raises(builder.ImageError, match=r"(?s)mke2fs failed \(exit 3\).*why-it-failed"):
        builder._run(["sh", "-c", "echo why-it-failed; exit 3"], lambda _m: None, "mke2fs",
                     tmp_path / "tmp")


def test_a_step_keeps_its_temporary_files_in_the_build_directory(tmp_path: Path) -> None:
    """mmdebstrap's gpg home goes under TMPDIR: the host's /tmp is not the build's."""
    scratch = tmp_path / "tmp"
    builder._run(["sh", "-c", 'mktemp -d "$TMPDIR/mmdebstrap.gpghome.XXXX" >"$TMPDIR/made"'],
                 lambda _m: None, "step", scratch)
    made = Path((scratch / "made").read_text().strip())
    assert made.parent == scratch and made.is_dir()


def test_a_waiting_process_names_the_builder(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(builder, "HEARTBEAT", 0.1)
    final = tmp_path / "bookworm-k"
    (tmp_path / f"{builder.BUILD_PREFIX}bookworm-k-4242").mkdir()
    holder = FileLock(builder._lock_path(final), thread_local=False)
    holder.acquire()
    threading.Timer(0.35, holder.release).start()
    said: list[str] = []
    start = time.monotonic()
    with builder._image_lock(final, "bookworm-k", said.append):
        waited = time.monotonic() - start
    assert waited >= 0.3
    assert said and all(m == "waiting for process 4242 to finish building guest image "
                        "bookworm-k" for m in said), said
