"""The artifacts tree: where a test's kept guest artifacts go, and the only place removed.

Why a module: a test id and a guest name (``make_guest(name=...)``) are text a
user chose; joined to a path unchecked, ``name="/some/dir"`` or ``"../x"`` made
the plugin ``rmtree`` a directory outside the tree, two ids that sanitized alike
(``sp ace``, ``sp_ace``) shared one directory, and a 300-character id raised
ENAMETOOLONG.  Here every name becomes one directory name: a readable stem of
safe characters, plus a short hash of the exact original whenever the stem is
not the name itself (or the name is long, or merely looks like a hashed one), so
distinct names give distinct directories and none is longer than
:data:`MAX_STEM` + 11 bytes.  Removal happens only in :func:`replace_dir`, on a
path whose resolved parent is inside the resolved artifacts root.
"""

from __future__ import annotations

import hashlib
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

__all__ = ["MAX_STEM", "ArtifactsNotKept", "OutsideArtifacts", "copy_tree", "dir_name",
           "not_kept_message", "replace_dir"]

#: The readable part of a directory name is cut to this many characters.
MAX_STEM = 80
HASH_CHARS = 10
_UNSAFE = re.compile(r"[^A-Za-z0-9_.=-]+")
_HASHED = re.compile(rf".*-[0-9a-f]{{{HASH_CHARS}}}")


class OutsideArtifacts(OSError):
    """A destination that does not resolve to a directory inside the artifacts root."""


class ArtifactsNotKept(pytest.PytestWarning):
    """A guest's artifacts could not be written (full or read-only filesystem, ...);
    the test keeps its own outcome and the guest is still closed."""


def dir_name(name: str) -> str:
    """The one directory name for ``name`` (a test id or a guest name).

    ``name`` itself when it is short, made only of ``[A-Za-z0-9_.=-]``, does not
    start with a dot and does not end like a hashed name; otherwise its sanitized
    stem plus ``-`` and the first hex digits of the SHA-256 of ``name``.
    """
    stem = _UNSAFE.sub("_", name).strip("_.")
    if name and stem == name and len(name) <= MAX_STEM and not _HASHED.fullmatch(name):
        return name
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:HASH_CHARS]
    return f"{stem[:MAX_STEM] or 'x'}-{digest}"


def _check_inside(root: Path, dest: Path) -> None:
    parent = dest.parent.resolve()
    if dest.name in ("", ".", "..") or not parent.is_relative_to(root.resolve()):
        raise OutsideArtifacts(
            f"{dest} is not inside the artifacts directory {root.resolve()} (its parent "
            f"resolves to {parent}): remove that link or choose another --virtio-artifacts")


def replace_dir(root: Path, dest: Path, fill: Callable[[Path], object]) -> None:
    """Make ``dest`` anew and have ``fill(dest)`` write it (e.g. a ``copytree``).

    ``dest`` must be a directory whose parent resolves inside ``root``; what is
    there now (artifacts of an earlier run) is removed first: a symlink is
    unlinked, never followed.  Anything else is an :class:`OutsideArtifacts`.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    _check_inside(root, dest)
    if dest.is_symlink() or (dest.exists() and not dest.is_dir()):
        dest.unlink()
    elif dest.exists():
        shutil.rmtree(dest)
    fill(dest)


def copy_tree(src: Path, dest: Path, ignore: Callable[[Any, list[str]], Any]) -> None:
    """``shutil.copytree``, every file it can; then the first file's own OSError.

    Why not copytree's ``shutil.Error``: it is a list of every failed file as
    text, which on a full disk is every file after the first, each with both paths.
    """
    failed: list[OSError] = []

    def copy(s: str, d: str) -> object:
        try:
            return shutil.copy2(s, d)
        except OSError as exc:
            failed.append(exc)
            raise

    try:
        shutil.copytree(src, dest, ignore=ignore, copy_function=copy)
    except shutil.Error:
        if not failed:
            raise
        raise failed[0] from None


def not_kept_message(what: str, dest: Path, exc: BaseException) -> str:
    """One line: which artifacts, where, why (and at which file), the fix."""
    reason = str(exc)
    if isinstance(exc, OSError) and exc.strerror:
        where = exc.filename2 or exc.filename
        reason = f"{exc.strerror} (at {Path(where).name})" if where else exc.strerror
    return (f"pytest-virtio: the artifacts of {what} could not be kept at {dest}: {reason}; "
            "free space there or choose a writable --virtio-artifacts directory")
