"""``python -m pytest_virtio.images build|info|path|prune|kernel-deb``: the cache by hand."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pytest_virtio.errors import VirtioError
from pytest_virtio.images.builder import (
    MANIFEST,
    current_keys,
    default_cache_dir,
    ensure_disk_image,
    ensure_image,
    image_dir,
    prune_images,
    remove_unlocked,
)
from pytest_virtio.images.kernel import fetch_deb_kernel, stale_kernels
from pytest_virtio.images.recipe import load_recipe


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pytest_virtio.images")
    parser.add_argument("command", choices=("build", "info", "path", "prune", "kernel-deb"))
    parser.add_argument("package", nargs="?", default="linux-image-cloud-amd64",
                        help="kernel-deb: the Debian kernel package to fetch and unpack")
    parser.add_argument("--recipe", default="bookworm")
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    parser.add_argument("--dry-run", action="store_true",
                        help="prune: list what would be removed, remove nothing")
    args = parser.parse_args(argv)
    try:
        recipe = load_recipe(args.recipe)
        where = image_dir(recipe, args.cache_dir)
        if args.command == "prune":
            return _prune(args.cache_dir, args.dry_run)
        if args.command == "kernel-deb":
            kernel, modules = fetch_deb_kernel(
                args.package, args.cache_dir or default_cache_dir(),
                progress=_progress)
            print(f"--virtio-kernel={kernel} --virtio-modules={modules}")
            return 0
        if args.command == "path":
            print(where)
        elif args.command == "info":
            if not (where / MANIFEST).exists():
                print(f"{recipe.key()}: not built (would be {where})")
                return 1
            print(json.dumps(json.loads((where / MANIFEST).read_text()), indent=2))
        elif recipe.boot == "firmware":
            disk = ensure_disk_image(recipe, args.cache_dir, progress=_progress, force=args.force)
            print(disk.path)
        else:
            image = ensure_image(recipe, args.cache_dir, progress=_progress, force=args.force)
            print(image.cache_dir)
    except VirtioError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _prune(cache_dir: Path | None, dry_run: bool) -> int:
    """Remove images no shipped recipe uses any more (each recipe change makes a new one)
    and staged kernels a newer staging of the same kernel file replaced."""
    removed = prune_images(current_keys(), cache_dir, dry_run=dry_run)
    removed += remove_unlocked(stale_kernels(cache_dir or default_cache_dir()), dry_run)
    verb = "would remove" if dry_run else "removed"
    for path, size in removed:
        print(f"{verb} {path} ({size / 2**20:.0f} MiB)")
    total = sum(size for _, size in removed)
    print(f"{verb} {len(removed)} stale image(s) and staged kernel(s), "
          f"{total / 2**20:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
