"""What the installed QEMU can do: version and compiled-in device models.

Why probe at all: distributions build QEMU with different device sets (Debian's
``qemu-system-x86`` has them all; a minimal build may lack lsi53c895a or nvme),
and a missing model is far clearer as "skip: QEMU lacks nvme" at collection time
than as a QEMU exit in the middle of a test. Results are cached per binary path
because ``-device help`` costs a process spawn and never changes during a run.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess

from pytest_virtio.errors import ConfigError, MissingToolError
from pytest_virtio.spec import MachineSpec, required_qemu_devices

__all__ = [
    "DEFAULT_BINARY",
    "ENV_VAR",
    "device_models",
    "find_qemu",
    "missing_devices",
    "parse_device_help",
    "parse_version",
    "qemu_version",
]

DEFAULT_BINARY = "qemu-system-x86_64"
PACKAGE = "qemu-system-x86"
ENV_VAR = "PYTEST_VIRTIO_QEMU"
PROBE_TIMEOUT = 30.0

_VERSION_RE = re.compile(r"QEMU emulator version (\d+)\.(\d+)(?:\.(\d+))?")
_NAME_RE = re.compile(r'^name "([^"]+)"')
_ALIAS_RE = re.compile(r'alias "([^"]+)"')


def find_qemu(explicit: str | None = None) -> str:
    """The QEMU binary to use: ``explicit``, else ``$PYTEST_VIRTIO_QEMU``, else PATH.

    An explicit or environment value that names nothing executable is a
    ConfigError (the user asked for it); nothing on PATH is a MissingToolError
    (the fix is a package install).
    """
    for source, value in (("explicit qemu binary", explicit), (ENV_VAR, os.environ.get(ENV_VAR))):
        if value:
            return _resolve(value, source)
    found = shutil.which(DEFAULT_BINARY)
    if found is None:
        raise MissingToolError(DEFAULT_BINARY, PACKAGE)
    return found


def _resolve(value: str, source: str) -> str:
    found = shutil.which(value)
    if found is None:
        raise ConfigError(f"{source} {value!r} is not an executable file or a command on PATH")
    return found


def _run_probe(binary: str, *args: str) -> str:
    """stdout of ``binary args``; a missing binary becomes a MissingToolError."""
    try:
        proc = subprocess.run(
            [binary, *args],
            capture_output=True,
            text=True,
            timeout=PROBE_TIMEOUT,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except FileNotFoundError:
        raise MissingToolError(DEFAULT_BINARY, PACKAGE, f"tried {binary!r}") from None
    except PermissionError:
        raise MissingToolError(DEFAULT_BINARY, PACKAGE, f"{binary!r} is not executable") from None
    if proc.returncode != 0:
        raise ConfigError(
            f"{binary} {' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()[:500]}"
        )
    return proc.stdout


def parse_version(text: str) -> tuple[int, int, int]:
    """(major, minor, micro) from ``--version`` output."""
    match = _VERSION_RE.search(text)
    if match is None:
        raise ConfigError(f"cannot read a QEMU version from: {text.strip()[:200]!r}")
    major, minor, micro = match.groups()
    return int(major), int(minor), int(micro or 0)


def parse_device_help(text: str) -> frozenset[str]:
    """Device model names and their aliases from ``-device help`` output.

    Aliases matter: ``ahci`` is listed as ``name "ich9-ahci", ..., alias "ahci"``.
    """
    models: set[str] = set()
    for line in text.splitlines():
        match = _NAME_RE.match(line.strip())
        if match is None:
            continue
        models.add(match.group(1))
        models.update(_ALIAS_RE.findall(line))
    return frozenset(models)


@functools.lru_cache(maxsize=8)
def qemu_version(binary: str = DEFAULT_BINARY) -> tuple[int, int, int]:
    """The installed QEMU's version (cached per binary)."""
    return parse_version(_run_probe(binary, "--version"))


@functools.lru_cache(maxsize=8)
def device_models(binary: str = DEFAULT_BINARY) -> frozenset[str]:
    """Every ``-device`` model the binary knows (cached per binary)."""
    return parse_device_help(_run_probe(binary, "-device", "help"))


def missing_devices(spec: MachineSpec, binary: str = DEFAULT_BINARY) -> frozenset[str]:
    """Device models ``spec`` needs that ``binary`` lacks (empty: it can run)."""
    return required_qemu_devices(spec) - device_models(binary)
