"""Tearing guests down: every backend stopped, every guest closed, nothing swallowed.

A backend whose thread will not stop is the one teardown error a test must see
(its disk stays busy, its thread runs on); everything else while closing a
guest means QEMU was already gone, and its shutdown escalated to a kill.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol

from pytest_virtio.errors import BackendError, VirtioError

if TYPE_CHECKING:
    from pytest_virtio.vhost_user.server import VhostUserBlkServer

__all__ = ["Closable", "Teardown", "stop_backends"]


class Closable(Protocol):
    """What teardown closes: a guest (:class:`.guest.Guest`), or anything closed like one."""

    def close(self) -> None: ...


def stop_backends(backends: Mapping[str, VhostUserBlkServer], owner: str) -> None:
    """Stop every in-process vhost-user backend, each one even if another fails.

    A backend whose thread will not stop (stuck in a storage call, say) keeps a
    thread running and its disk busy: that is a BackendError naming the disk(s),
    raised once all were tried, for teardown to report rather than swallow.
    """
    failed: list[tuple[str, BackendError]] = []
    for name, backend in backends.items():
        try:
            backend.close()
        except BackendError as exc:
            failed.append((name, exc))
    if failed:
        raise BackendError(f"{owner}: " + "; ".join(  # the message carries each cause
            f"vhost-user-blk disk {name!r} did not stop: {exc}" for name, exc in failed
        )) from None


class Teardown:
    """Closes guests one after another, keeping what must not be swallowed.

    A backend that would not stop is kept and raised once every guest is
    closed (:meth:`raise_stuck`); any other error closing a guest means QEMU
    was already gone or broken, and its shutdown escalated to a kill.
    """

    def __init__(self) -> None:
        self.stuck: list[BackendError] = []

    def close(self, guest: Closable) -> None:
        try:
            guest.close()
        except BackendError as exc:
            self.stuck.append(exc)
        except (VirtioError, OSError):
            pass

    def raise_stuck(self) -> None:
        if len(self.stuck) == 1:
            raise self.stuck[0]
        if self.stuck:
            raise BackendError("; ".join(str(e) for e in self.stuck)) from None
