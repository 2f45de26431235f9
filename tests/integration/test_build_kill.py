"""An image build killed by SIGKILL mid-way leaves no process, no mount, and prune cleans it.

A real mmdebstrap (root mode, from the Debian mirror, in a cache of its own) is
killed, together with the Python process that runs the build, at the moment its
``proc``/``sys``/``dev`` mounts are up inside the rootfs: the most a kill can
leave behind.  A small recipe (variant essential), and killed long before the
end: tens of seconds.  Boots nothing, so it needs no QEMU lock.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pytest_virtio import procs
from pytest_virtio.images.mounts import detach_mounts_under, mounted_anywhere, mounts_under
from pytest_virtio.interrupts import descendants

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="an image build needs root")

#: pytest building an image: the real builder, a recipe small enough to be quick.
BUILD = """
import sys
from pathlib import Path
from pytest_virtio.images.builder import ensure_image
from pytest_virtio.images.recipe import Recipe
recipe = Recipe(name="killed", suite="bookworm", variant="essential",
                packages=("busybox-static",), path_exclude=(), rootfs_size="256M", files=())
ensure_image(recipe, Path(sys.argv[1]), progress=lambda m: print(m, flush=True))
"""


def test_a_killed_build_leaves_nothing_running_or_mounted_and_prune_cleans_it(
        tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    log = tmp_path / "build.log"
    with log.open("w") as out:
        build = subprocess.Popen([sys.executable, "-c", BUILD, str(cache)], stdout=out,
                                 stderr=subprocess.STDOUT)
    try:
        tree = _wait_for_mounts(build, cache, log, timeout=600)
        build.send_signal(signal.SIGKILL)
        build.wait()

        assert procs.wait_gone(tree, 10.0) == [], (
            f"build processes outlived the killed build: {_commands(tree)}")
        assert mounted_anywhere(cache) == {}
        [half_built] = (cache / "images").glob(".build-*")

        pruned = subprocess.run(
            [sys.executable, "-m", "pytest_virtio.images", "prune", "--cache-dir", str(cache)],
            capture_output=True, text=True, timeout=120)
        assert pruned.returncode == 0, pruned.stderr
        assert f"removed {half_built}" in pruned.stdout
        assert not half_built.exists() and mounts_under(cache) == []
    finally:
        build.kill()
        build.wait()
        _reap(cache)


def _wait_for_mounts(build: subprocess.Popen[bytes], cache: Path, log: Path,
                     timeout: float) -> list[int]:
    """Wait until a process of the build sees a mount under ``cache`` (whatever its mount
    namespace); the build's processes at that moment."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert build.poll() is None, f"the build ended before it mounted:\n{log.read_text()}"
        tree = descendants(build.pid)
        for pid in tree:
            with contextlib.suppress(OSError):
                if mounts_under(cache, Path(f"/proc/{pid}/mountinfo")):
                    return tree
        time.sleep(0.1)
    raise AssertionError(f"no mount under {cache} within {timeout}s:\n{log.read_text()}")


def _commands(pids: list[int]) -> list[str]:
    names = []
    for pid in pids:
        with contextlib.suppress(OSError):
            names.append(f"{pid} {Path(f'/proc/{pid}/comm').read_text().strip()}")
    return names


def _reap(cache: Path) -> None:
    """Whatever the build left (the test failed): kill it, then detach its mounts."""
    for _ in range(50):
        left = [pid for pid in _pids() if _uses(pid, cache)]
        if not left:
            break
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        procs.wait_gone(left, 5.0)
    detach_mounts_under(cache)


def _pids() -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]


def _uses(pid: int, cache: Path) -> bool:
    """Does ``pid`` name the cache on its command line or run chrooted inside it?"""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        root = os.readlink(f"/proc/{pid}/root")
    except OSError:
        return False
    return os.fsencode(cache) in cmdline or root.startswith(str(cache))
