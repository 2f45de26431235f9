"""The artifacts tree: names become one safe directory each; nothing outside is removed."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pytest_virtio.errors import ConfigError
from pytest_virtio.guests.settings import check_writable_cache
from pytest_virtio.plugin import artifacts
from pytest_virtio.plugin.artifacts import dir_name

NAME_MAX = 255


def _is_one_safe_component(name: str) -> bool:
    return ("/" not in name and "\0" not in name and name not in ("", ".", "..")
            and not name.startswith(".") and len(name.encode()) <= NAME_MAX)


@given(st.text(max_size=400))
def test_any_name_is_one_safe_component(name: str) -> None:
    assert _is_one_safe_component(dir_name(name))
    assert len(dir_name(name)) <= artifacts.MAX_STEM + 1 + artifacts.HASH_CHARS


@given(st.text(max_size=120), st.text(max_size=120))
def test_distinct_names_get_distinct_directories(a: str, b: str) -> None:
    if a != b:
        assert dir_name(a) != dir_name(b)


@pytest.mark.parametrize("pair", [("sp ace", "sp_ace"), ("a/b", "a_b"), ("x" * 300, "x" * 301),
                                  ("guest-0123456789", "guest")])
def test_names_that_sanitize_alike_stay_apart(pair: tuple[str, str]) -> None:
    a, b = pair
    assert dir_name(a) != dir_name(b)
    # A name spelt like another's hashed directory is hashed too: it cannot take that one.
    hashed = dir_name(a) if dir_name(a) != a else dir_name(b)
    assert dir_name(hashed) != hashed


def test_plain_names_are_kept_readable() -> None:
    assert dir_name("guest0") == "guest0"
    assert dir_name("with-driver") == "with-driver"
    assert dir_name("tests/test_x.py::test_y[disk=ahci]").startswith(
        "tests_test_x.py_test_y_disk=ahci-")
    assert dir_name("/some/dir").startswith("some_dir-")
    assert dir_name("..").startswith("x-")


def test_a_symlink_in_the_tree_is_unlinked_not_followed(tmp_path: Path) -> None:
    root, outside = tmp_path / "art", tmp_path / "user"
    outside.mkdir()
    (outside / "precious.txt").write_text("mine")
    (root / "t").mkdir(parents=True)
    dest = root / "t" / "guest"
    dest.symlink_to(outside)
    artifacts.replace_dir(root, dest, lambda d: d.mkdir())
    assert (outside / "precious.txt").read_text() == "mine"
    assert dest.is_dir() and not dest.is_symlink()


def test_a_test_directory_linking_outside_is_refused(tmp_path: Path) -> None:
    root, outside = tmp_path / "art", tmp_path / "user"
    (outside / "guest").mkdir(parents=True)
    (outside / "guest" / "precious.txt").write_text("mine")
    root.mkdir()
    (root / "t").symlink_to(outside)
    with pytest.raises(artifacts.OutsideArtifacts, match="not inside the artifacts directory"):
        artifacts.replace_dir(root, root / "t" / "guest", lambda d: d.mkdir())
    assert (outside / "guest" / "precious.txt").read_text() == "mine"


def test_an_earlier_run_is_replaced(tmp_path: Path) -> None:
    root = tmp_path / "art"
    dest = root / "t" / "guest"
    dest.mkdir(parents=True)
    (dest / "old.txt").write_text("old")
    artifacts.replace_dir(root, dest, lambda d: d.mkdir())
    assert list(dest.iterdir()) == []


def test_not_kept_message_is_one_line_naming_path_file_and_fix(tmp_path: Path) -> None:
    # As shutil.copyfile raises it on a full disk: both files named.
    error = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/run/g1/console.log", None,
                    str(tmp_path / "console.log"))
    line = artifacts.not_kept_message("guest 'guest'", tmp_path, error)
    assert line == (f"pytest-virtio: the artifacts of guest 'guest' could not be kept at "
                    f"{tmp_path}: No space left on device (at console.log); free space there "
                    "or choose a writable --virtio-artifacts directory")


def test_copy_tree_raises_the_first_file_error_not_a_list(tmp_path: Path) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    src.mkdir()
    (src / "a.txt").write_text("a")
    os.mkfifo(src / "b.fifo")  # copyfile refuses a named pipe
    with pytest.raises(OSError, match="named pipe") as info:
        artifacts.copy_tree(src, dest, ignore=shutil.ignore_patterns())
    assert not isinstance(info.value, shutil.Error)
    assert (dest / "a.txt").read_text() == "a"  # the rest is still copied


def test_unwritable_cache_under_proc_is_a_config_error() -> None:
    """/proc takes no new directories, even from root (chmod 0555 would not stop root)."""
    with pytest.raises(ConfigError, match=r"--virtio-cache: the image cache /proc/pv-cache is "
                                          r"not writable .*choose a writable directory"):
        check_writable_cache(Path("/proc/pv-cache"))


def test_writable_cache_is_made(tmp_path: Path) -> None:
    check_writable_cache(tmp_path / "a" / "cache")
    assert (tmp_path / "a" / "cache").is_dir()
    assert list((tmp_path / "a" / "cache").iterdir()) == []


def test_session_socket_check_covers_the_longest_device_name() -> None:
    from pytest_virtio.guests.session import LONGEST_NAME
    from pytest_virtio.spec.catalogue import _NAME_RE

    assert _NAME_RE.match("d" + LONGEST_NAME[1:])
    assert not _NAME_RE.match("d" + LONGEST_NAME)
