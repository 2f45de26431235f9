"""The one check of a marker's keyword names, and its one "unknown key" message.

Every pytest-virtio marker (``vm`` and its disk, NIC and device items, ``workload``,
``perf``, ``expect_drivers``) and ``guest.hotplug`` check their keys here, so a typo
reads the same wherever it is made, naming where, the key and every key that works::

    @pytest.mark.workload("fio"): unknown key 'iodepht' (allowed: 'disk', 'rw', ...)
"""

from __future__ import annotations

from collections.abc import Iterable

from pytest_virtio.errors import ConfigError

__all__ = ["check_keys"]


def check_keys(where: str, given: Iterable[object], allowed: Iterable[str]) -> None:
    """Raise a ConfigError if ``given`` holds a key not in ``allowed``.

    ``where`` starts the message (``"@pytest.mark.perf"``); the allowed keys are
    listed in their own order, which callers keep meaningful (a dataclass's fields).
    """
    choices = tuple(allowed)
    unknown = sorted({key for key in given if key not in choices}, key=str)
    if not unknown:
        return
    noun = "key" if len(unknown) == 1 else "keys"
    raise ConfigError(
        f"{where}: unknown {noun} {', '.join(map(repr, unknown))} "
        f"(allowed: {', '.join(map(repr, choices))})"
    )
