"""pytester helpers: run an inner pytest with its own TMPDIR so its QEMUs are findable."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_virtio.images import default_cache_dir

#: Resolved before pytester moves HOME, so inner runs share the real image cache.
REAL_CACHE = str(default_cache_dir())


@pytest.fixture(autouse=True)
def _share_image_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTEST_VIRTIO_CACHE", REAL_CACHE)


def qemus_under(path: Path) -> list[str]:
    """QEMU processes whose command line mentions ``path`` (their run directory)."""
    out = subprocess.run(["pgrep", "-af", f"qemu-system.*{path}"], capture_output=True,
                         text=True).stdout
    return [line for line in out.splitlines() if "pgrep" not in line]


@pytest.fixture
def find_qemus():
    """The :func:`qemus_under` helper, as a fixture (test modules are not a package)."""
    return qemus_under


@pytest.fixture
def inner_tmp(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A private, short TMPDIR for the inner run: its run dirs and sockets live there.

    Short because unix socket paths are limited to 107 bytes.
    """
    tmp = Path(tempfile.mkdtemp(prefix="pvt", dir="/tmp"))
    monkeypatch.setenv("TMPDIR", str(tmp))
    yield tmp
    shutil.rmtree(tmp, ignore_errors=True)


def boot_reproducer(script: Path, run_dir: Path, deadline_s: float = 300) -> str:
    """Run a kept ``reproduce.sh`` with its own run directory until the guest's shell
    says READY on the command channel; kill it then. The QEMU command line it ran."""
    proc = subprocess.Popen([str(script)], env={**os.environ, "PV_RUN": str(run_dir)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        log = run_dir / "command.log"
        deadline = time.monotonic() + deadline_s
        while "PYTEST-VIRTIO-READY" not in (log.read_text(errors="replace")
                                            if log.exists() else ""):
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            assert time.monotonic() < deadline, log.read_text(errors="replace")[-2000:]
            time.sleep(0.5)
        return "\n".join(qemus_under(run_dir))
    finally:
        with contextlib.suppress(ProcessLookupError):  # it may have ended on its own
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)


@pytest.fixture
def run_reproducer():
    """The :func:`boot_reproducer` helper, as a fixture."""
    return boot_reproducer
