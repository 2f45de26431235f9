"""Pruning the image cache: only images no shipped recipe uses, never a live build."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from filelock import FileLock

from pytest_virtio.images.builder import current_keys, prune_images, stale_images
from pytest_virtio.images.recipe import load_recipe


def _image(root: Path, name: str, size: int = 4096) -> Path:
    d = root / "images" / name
    d.mkdir(parents=True)
    (d / "rootfs.img").write_bytes(b"x" * size)
    (root / "images" / f"{name}.lock").touch()
    return d


def test_current_keys_name_the_shipped_recipe() -> None:
    assert load_recipe("bookworm").key() in current_keys()


def test_prune_keeps_current_and_live_builds(tmp_path: Path) -> None:
    keep = _image(tmp_path, "bookworm-current")
    old = _image(tmp_path, "bookworm-0000000000000000", size=8192)
    live = _image(tmp_path, f".build-bookworm-x-{os.getpid()}")
    dead = _image(tmp_path, f".build-bookworm-x-{_dead_pid()}")
    assert stale_images({"bookworm-current"}, tmp_path) == [dead, old]

    removed = prune_images({"bookworm-current"}, tmp_path)
    assert [p for p, _ in removed] == [dead, old]
    assert dict(removed)[old] >= 8192  # bytes on disk
    assert keep.is_dir() and live.is_dir() and not old.exists() and not dead.exists()
    assert not (tmp_path / "images" / "bookworm-0000000000000000.lock").exists()


def test_dry_run_removes_nothing(tmp_path: Path) -> None:
    old = _image(tmp_path, "bookworm-0000000000000000")
    assert [p for p, _ in prune_images(set(), tmp_path, dry_run=True)] == [old]
    assert old.is_dir()


def test_an_image_locked_by_another_process_is_left_alone(tmp_path: Path) -> None:
    old = _image(tmp_path, "bookworm-0000000000000000")
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time, filelock; l = filelock.FileLock(sys.argv[1]); l.acquire(); "
         "print('held', flush=True); time.sleep(30)", f"{old}.lock"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        assert prune_images(set(), tmp_path) == []
        assert old.is_dir()
    finally:
        holder.kill()
        holder.wait()
    with FileLock(f"{old}.lock", timeout=1):
        pass  # the lock is free again once its holder died
    assert [p for p, _ in prune_images(set(), tmp_path)] == [old]


def test_missing_cache_is_nothing_to_prune(tmp_path: Path) -> None:
    assert prune_images({"x"}, tmp_path / "nowhere") == []


def test_cli_prune_reports_what_it_removed(tmp_path: Path) -> None:
    _image(tmp_path, "bookworm-0000000000000000")
    out = subprocess.run(
        [sys.executable, "-m", "pytest_virtio.images", "prune", "--dry-run",
         "--cache-dir", str(tmp_path)],
        capture_output=True, text=True, check=True,
    ).stdout
    assert "would remove" in out and "bookworm-0000000000000000" in out
    assert out.rstrip().endswith("would remove 1 stale image(s) and staged kernel(s), 0 MiB")


def _dead_pid() -> int:
    """A pid that certainly belongs to no process: one that just exited and was reaped."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid
