"""Names never become paths unchecked (artifact directories, socket paths), a full
artifacts filesystem or a read-only cache is one clear line, guests are closed anyway.

The full and read-only filesystems are real: a tmpfs filled to the last page, and a
read-only bind mount (root is not stopped by chmod 0555).
"""

from __future__ import annotations

import contextlib
import subprocess
import tempfile
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

TCG = "--virtio-accel=tcg"
FindQemus = Callable[[Path], list[str]]

#: The last test of an inner run: no QEMU of the session is left once the tests
#: before it were torn down (their guests closed at teardown, not at session end).
NO_QEMU_LEFT = """

def test_zz_no_qemu_left():
    import os, subprocess
    out = subprocess.run(["pgrep", "-af", "qemu-system"], capture_output=True,
                         text=True).stdout
    assert not [l for l in out.splitlines() if os.environ["TMPDIR"] in l], out
"""


def _mount(*args: str) -> None:
    proc = subprocess.run(["mount", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.fail(f"mount {' '.join(args)}: {proc.stderr.strip()} (this test needs root "
                    "and mount(2), as the image build does)", pytrace=False)


@contextlib.contextmanager
def _mounted(*args: str, at: Path) -> Iterator[Path]:
    _mount(*args, str(at))
    try:
        yield at
    finally:
        subprocess.run(["umount", "-l", str(at)], check=True)


@pytest.fixture
def full_fs() -> Iterator[Path]:
    """A directory on a tmpfs with no free block left (empty files still fit)."""
    at = Path(tempfile.mkdtemp(prefix="pvfull", dir="/tmp"))
    try:
        with _mounted("-t", "tmpfs", "-o", "size=256k,mode=0755", "tmpfs", at=at):
            (at / "art").mkdir()
            with contextlib.suppress(OSError), (at / "filler").open("wb", buffering=0) as f:
                while True:  # until ENOSPC
                    f.write(b"\0" * 4096)
            yield at / "art"
    finally:
        at.rmdir()


@pytest.fixture
def read_only_dir() -> Iterator[Path]:
    """An empty directory on a read-only bind mount."""
    base = Path(tempfile.mkdtemp(prefix="pvro", dir="/tmp"))
    (base / "src").mkdir()
    (base / "ro").mkdir()
    try:
        with _mounted("--bind", str(base / "src"), at=base / "ro"):
            _mount("-o", "remount,bind,ro", str(base / "ro"))
            yield base / "ro"
    finally:
        for d in ("ro", "src"):
            (base / d).rmdir()
        base.rmdir()


def _kept_dirs(pytester: pytest.Pytester) -> list[Path]:
    return sorted(p for p in (pytester.path / ".pytest-virtio").iterdir())


def _logs(guest_dir: Path) -> str:
    """A kept guest's console and command-channel logs (a command's output is in the latter)."""
    return "".join(p.read_text(errors="replace") for p in sorted(guest_dir.glob("*.log")))


def test_guest_names_with_slashes_stay_inside_the_artifacts_tree(
    pytester: pytest.Pytester, inner_tmp: Path, find_qemus: FindQemus
) -> None:
    """name="/some/dir" once rmtree'd that directory and wrote the artifacts into it;
    name="../../escape" wrote beside the tree."""
    user_dir = pytester.mkdir("user") / "dir"
    user_dir.mkdir()
    (user_dir / "precious.txt").write_text("mine")
    pytester.makepyfile(f"""
        def test_named(make_guest):
            make_guest(name={str(user_dir)!r}).check("echo abs-name-was-here")
            make_guest(name="../../escape").check("echo dotdot-name-was-here")
            assert False, "deliberate"
        """)
    result = pytester.runpytest_subprocess(TCG)
    result.assert_outcomes(failed=1)
    assert [p.name for p in user_dir.iterdir()] == ["precious.txt"]
    assert (user_dir / "precious.txt").read_text() == "mine"
    assert not (pytester.path / "escape").exists()
    assert not (pytester.path.parent / "escape").exists()
    [test_dir] = _kept_dirs(pytester)
    guests = sorted(test_dir.iterdir())
    assert len(guests) == 2, guests
    logs = " ".join(_logs(g) for g in guests)
    assert "abs-name-was-here" in logs and "dotdot-name-was-here" in logs
    assert find_qemus(inner_tmp) == []


def test_ids_that_sanitize_alike_keep_their_own_artifacts(
    pytester: pytest.Pytester, inner_tmp: Path
) -> None:
    """'sp ace' and 'sp_ace' were one directory: the second test's keep removed the first's."""
    pytester.makepyfile("""
        import pytest

        @pytest.mark.parametrize("word", ["sp ace", "sp_ace"])
        def test_word(guest, word):
            guest.check(f"echo 'marker {word.replace(' ', '-')}'")
            assert False, "deliberate"
        """)
    result = pytester.runpytest_subprocess(TCG)
    result.assert_outcomes(failed=2)
    kept = _kept_dirs(pytester)
    assert len(kept) == 2, kept
    logs = sorted(_logs(d / "guest") for d in kept)
    assert "marker sp-ace" in logs[0] + logs[1] and "marker sp_ace" in logs[0] + logs[1]
    assert ("marker sp-ace" in logs[0]) != ("marker sp-ace" in logs[1])


def test_a_300_character_id_keeps_its_artifacts_and_closes_its_guest(
    pytester: pytest.Pytester, inner_tmp: Path, find_qemus: FindQemus
) -> None:
    """Its directory name raised ENAMETOOLONG at teardown before the guest was closed:
    the test errored and its QEMU ran until the session ended."""
    pytester.makepyfile(textwrap.dedent("""
        import pytest

        @pytest.mark.parametrize("x", ["a" * 300], ids=["a" * 300])
        def test_long(guest, x):
            guest.check("echo long-id-was-here")
            assert False, "deliberate"
        """) + NO_QEMU_LEFT)
    result = pytester.runpytest_subprocess(TCG, "-p", "no:randomly")
    result.assert_outcomes(failed=1, passed=1)
    assert "ENAMETOOLONG" not in result.stdout.str() + result.stderr.str()
    [test_dir] = _kept_dirs(pytester)
    assert len(test_dir.name) < 100
    assert "long-id-was-here" in _logs(test_dir / "guest")
    assert (test_dir / "guest" / "reproduce.sh").is_file()
    assert find_qemus(inner_tmp) == []


def test_a_full_artifacts_filesystem_is_one_line_and_outcomes_stay(
    pytester: pytest.Pytester, inner_tmp: Path, full_fs: Path, find_qemus: FindQemus
) -> None:
    """It was a shutil.Error traceback as a teardown error of every test (a passing one
    too, with keep=always), and the guests stayed up until the session ended."""
    pytester.makepyfile(textwrap.dedent("""
        def test_passes(guest):
            assert guest.run("true").ok

        def test_fails(guest):
            assert guest.check("echo own-error").stdout.strip() == "nope"
        """) + NO_QEMU_LEFT)
    result = pytester.runpytest_subprocess(TCG, "-p", "no:randomly", "--virtio-keep=always",
                                           f"--virtio-artifacts={full_fs}", "-rw")
    result.assert_outcomes(passed=2, failed=1)
    out = result.stdout.str()
    assert "assert 'own-error' == 'nope'" in out, "the failing test lost its own error"
    assert "shutil.Error" not in out and "Traceback" not in out
    result.stdout.fnmatch_lines([
        f"*the artifacts of guest 'guest' could not be kept at {full_fs}/*test_passes*/guest: "
        "*No space left on device*; free space there or choose a writable "
        "--virtio-artifacts directory",
        f"*could not be kept at {full_fs}/*test_fails*/guest: *No space left on device*",
    ])
    assert find_qemus(inner_tmp) == []


def test_a_read_only_cache_is_a_usage_error_naming_it(
    pytester: pytest.Pytester, read_only_dir: Path
) -> None:
    """It was an INTERNALERROR traceback (Read-only file system) from the header."""
    pytester.makepyfile("def test_x(): pass")
    result = pytester.runpytest_subprocess(TCG, f"--virtio-cache={read_only_dir}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "INTERNALERROR" not in result.stdout.str() + result.stderr.str()
    result.stderr.fnmatch_lines([
        f"ERROR: --virtio-cache: the image cache {read_only_dir} is not writable (Read-only "
        "file system): choose a writable directory with --virtio-cache=DIR*"])


def test_longest_disk_name_is_in_the_socket_path_check(
    pytester: pytest.Pytester, inner_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The run directory was checked against a 20-character disk name, but a disk with
    serial= may have a 32-character one: its vhost-user socket then failed to bind."""
    # Run directory <TMPDIR>/pv-xxxxxx/g1: fits a 20-character name's socket, not a 32's.
    deep = inner_tmp / ("d" * (60 - len(str(inner_tmp)) - 1))
    deep.mkdir()
    monkeypatch.setenv("TMPDIR", str(deep))
    pytester.makepyfile("""
        import pytest

        @pytest.mark.vm(disks=[{"bus": "vhost-user-blk", "name": "d" * 32, "serial": "s1"}])
        def test_x(guest):
            pass
        """)
    result = pytester.runpytest_subprocess(TCG)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*run directory * is too long for unix socket paths (1* > 107 "
                                 "bytes): set TMPDIR to a shorter directory*"])
