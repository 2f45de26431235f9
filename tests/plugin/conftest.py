"""pytester helpers: run an inner pytest with its own TMPDIR so its QEMUs are findable."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
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
