"""What a killed image build leaves is removed mounts first, never through a mount.

Real mounts (root, as a build is): a killed build of an older version, or an
mmdebstrap run by hand, leaves ``proc`` and the host's ``/dev/shm`` (bound in)
mounted inside its ``.build-*`` directory.  The mmdebstrap-killed-mid-build case
is tests/integration/test_build_kill.py.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_virtio import procs
from pytest_virtio.errors import ImageError
from pytest_virtio.images import builder
from pytest_virtio.images.mounts import detach_mounts_under, mounts_under, remove_tree
from pytest_virtio.images.recipe import load_recipe

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounts need root, as a build does")


@pytest.fixture
def cache(tmp_path: Path) -> Iterator[Path]:
    """A cache directory; nothing stays mounted under it after the test."""
    yield tmp_path / "cache"
    detach_mounts_under(tmp_path)


def _killed_build(cache: Path, key: str, pid: int, host_shm: Path) -> Path:
    """A ``.build-*`` directory as a killed root-mode mmdebstrap leaves it."""
    root = cache / "images" / f"{builder.BUILD_PREFIX}{key}-{pid}" / "rootfs"
    for sub in ("proc", "dev/shm", "usr/bin"):
        (root / sub).mkdir(parents=True)
    (root / "usr/bin/busybox").write_bytes(b"x" * 4096)
    subprocess.run(["mount", "-t", "proc", "proc", str(root / "proc")], check=True)
    subprocess.run(["mount", "--bind", str(host_shm), str(root / "dev/shm")], check=True)
    return root.parent


def _host_shm(tmp_path: Path) -> Path:
    """Stands in for the host's /dev/shm: a file someone else's, not the cache's."""
    shm = tmp_path / "host-shm"
    shm.mkdir()
    (shm / "someone-elses").write_text("keep me")
    return shm


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_prune_unmounts_a_killed_build_and_never_removes_through_a_mount(
        tmp_path: Path, cache: Path) -> None:
    shm = _host_shm(tmp_path)
    dead = _killed_build(cache, "bookworm-0123456789abcdef", _dead_pid(), shm)
    assert len(mounts_under(dead)) == 2

    removed = builder.prune_images(set(), cache)

    assert [p for p, _ in removed] == [dead]
    assert dict(removed)[dead] >= 4096  # the busybox, not /proc's or the shm's contents
    assert not dead.exists() and mounts_under(cache) == []
    assert (shm / "someone-elses").read_text() == "keep me"


def test_prune_dry_run_counts_nothing_behind_a_mount(tmp_path: Path, cache: Path) -> None:
    shm = _host_shm(tmp_path)
    (shm / "big").write_bytes(b"y" * (1 << 20))
    dead = _killed_build(cache, "bookworm-0123456789abcdef", _dead_pid(), shm)
    [(path, size)] = builder.prune_images(set(), cache, dry_run=True)
    assert path == dead and 4096 <= size < (1 << 20)
    assert len(mounts_under(dead)) == 2  # a dry run touches nothing


def test_prune_leaves_a_build_whose_image_lock_is_held(tmp_path: Path, cache: Path) -> None:
    """Its pid may be reused or gone: the lock the live builder holds decides."""
    dead = _killed_build(cache, "bookworm-0123456789abcdef", _dead_pid(), _host_shm(tmp_path))
    with builder._image_lock(cache / "images" / "bookworm-0123456789abcdef",
                             "bookworm-0123456789abcdef", lambda _m: None):
        assert [p for p, _ in builder.prune_images(set(), cache)] == []
    assert dead.is_dir() and len(mounts_under(dead)) == 2


def test_the_next_build_removes_a_killed_build_first(
        tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Whoever holds the image lock is its only builder: any other ``.build-<key>-*``
    is dead, even one whose pid now names a live process (here pid 1)."""
    recipe = load_recipe("bookworm")
    shm = _host_shm(tmp_path)
    dead = _killed_build(cache, recipe.key(), 1, shm)
    seen: list[tuple[bool, list[Path]]] = []

    def build(_recipe: object, out: Path, _progress: object) -> None:
        seen.append((dead.exists(), mounts_under(cache)))
        (out / "partial").write_text("a build that then failed")
        raise ImageError("the build itself is not what this test is about")

    monkeypatch.setattr(builder, "_build_into", build)
    said: list[str] = []
    with pytest.raises(ImageError, match="not what this test is about"):
        builder.ensure_image(recipe, cache, progress=said.append)

    assert seen == [(False, [])]
    assert (shm / "someone-elses").read_text() == "keep me"
    assert [p.name for p in (cache / "images").iterdir()] == [f"{recipe.key()}.lock"]
    assert any(f"removing {dead}, left by a build that was killed" in m for m in said)


def test_a_build_still_mounting_in_its_own_namespace_is_not_removed(tmp_path: Path) -> None:
    """remove_tree refuses, naming the mount and the fix, while another mount
    namespace (a build still running in its own) has something mounted there."""
    victim = tmp_path / ".build-k-1"
    (victim / "proc").mkdir(parents=True)
    ready = tmp_path / "ready"
    helper = procs.start(["sh", "-c", f"mount -t tmpfs t {victim}/proc && touch {ready} "
                          "&& exec sleep 600"], contain=True)
    try:
        deadline = time.monotonic() + 10
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        with pytest.raises(ImageError, match=rf"cannot remove {victim}: process \d+ still has "
                           rf"{victim}/proc mounted \(a build running there\)"):
            remove_tree(victim)
        assert victim.is_dir()
    finally:
        procs.stop(helper, grace=0)
    remove_tree(victim)
    assert not victim.exists()
