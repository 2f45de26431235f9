"""Concise failure reports for errors pytest-virtio raises on purpose.

A ``VirtioError`` message already names what went wrong and the fix (and, for
a guest, carries the console tail).  The frames that led to it run through the
fixtures, the session and the console reader: pytest would print forty lines
of our internals above the one line the user needs.  So, unless ``--fulltrace``
is given, those frames are dropped: an error raised while setting up a guest
is reported as its message alone, and one raised from a call in the test body
keeps only the test's own frames (the line that called ``guest.check``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from _pytest._code.code import ExceptionRepr, ReprEntry, TracebackEntry

from pytest_virtio.errors import VirtioError

_HIDDEN_ROOTS = tuple(
    str(Path(mod.__file__).resolve().parent)
    for mod in (__import__("pytest_virtio"), __import__("_pytest"), __import__("pluggy"))
    if mod.__file__
)


def _is_users_frame(entry: TracebackEntry) -> bool:
    """True for frames outside pytest-virtio, pytest and pluggy."""
    path = str(entry.path)
    try:
        path = str(Path(path).resolve())
    except OSError:
        return True
    return not path.startswith(_HIDDEN_ROOTS)


def _message_only(excinfo: pytest.ExceptionInfo[BaseException]) -> ExceptionRepr:
    """The error's class, message and notes, no frames; the short summary keeps its text."""
    body = excinfo.getrepr(style="value")
    for entry in body.reprtraceback.reprentries:
        if isinstance(entry, ReprEntry):
            entry.lines = excinfo.exconly().split("\n")
    return body


def concise_longrepr(
    item: pytest.Item, excinfo: pytest.ExceptionInfo[BaseException]
) -> ExceptionRepr | None:
    """The report body for ``excinfo``, or None to keep pytest's own.

    Only our own errors are shortened; anything else (an assertion in the
    test, a bug in pytest-virtio surfacing as a TypeError) keeps its traceback.
    """
    if not isinstance(excinfo.value, VirtioError) or item.config.getoption("fulltrace", False):
        return None
    fresh = pytest.ExceptionInfo.from_exception(excinfo.value)
    users = fresh.traceback.filter(_is_users_frame)
    if not users:
        return _message_only(fresh)
    fresh.traceback = users
    style = item.config.getoption("tbstyle", "auto")
    return fresh.getrepr(
        style="long" if style == "auto" else style,
        showlocals=item.config.getoption("showlocals", False),
        funcargs=True,
        tbfilter=False,  # pytest's own filter would re-grow the cut frames
    )
