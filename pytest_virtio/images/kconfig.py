"""A kernel's configuration (``.config``, ``/boot/config-<ver>``): parsed once, typed.

Why: a kernel developer's first question about a missing device is
``grep -i virtio /boot/config-…``. Knowing the config lets the plugin say *why*
a driver is missing (``CONFIG_VIRTIO_BLK is not set`` is a kernel to rebuild;
``=m`` with no module is a modules tree to reinstall) and lets a test ask what
the kernel it runs was built with.

The grammar is Kconfig's own (``scripts/kconfig/confdata.c``): ``CONFIG_X=y``,
``=m``, ``="string"`` or a number, and exactly ``# CONFIG_X is not set``; any
other line starting with ``#`` is a comment, a later assignment overrides an
earlier one. This module does no I/O beyond :func:`read_config`.
"""

from __future__ import annotations

import enum
import functools
import logging
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Final

from pytest_virtio.errors import ConfigError

__all__ = ["DRIVER_SYMBOLS", "KernelConfig", "Tristate", "Value", "driver_verdict",
           "parse_config", "read_config", "symbol_name"]

log = logging.getLogger(__name__)

PREFIX: Final = "CONFIG_"


class Tristate(enum.Enum):
    """A bool/tristate symbol's state; ``N`` is also what an absent symbol means."""

    Y = "y"
    M = "m"
    N = "n"


#: A symbol's value: a tristate, a string (unquoted, unescaped) or a number.
Value = Tristate | str | int

_ASSIGN: Final = re.compile(r"CONFIG_([A-Za-z0-9_]+)=(.*)")
_NOT_SET: Final = re.compile(r"# CONFIG_([A-Za-z0-9_]+) is not set")
_NUMBER: Final = re.compile(r"-?[0-9]+|0[xX][0-9a-fA-F]+")


def symbol_name(name: str) -> str:
    """The canonical key of ``name``: upper case, without ``CONFIG_``.

    Why: tests and people write ``virtio_blk``, ``VIRTIO_BLK`` or
    ``CONFIG_VIRTIO_BLK`` for the same symbol (``grep -i`` habits).
    """
    upper = name.strip().upper()
    return upper.removeprefix(PREFIX)


def _value(raw: str) -> Value:
    """One right-hand side: y/m/n, a quoted string (``\\"`` and ``\\\\`` unescaped), a number."""
    if raw in ("y", "m", "n"):
        return Tristate(raw)
    if len(raw) >= 2 and raw[0] == raw[-1] == '"':
        return re.sub(r"\\(.)", r"\1", raw[1:-1])
    if _NUMBER.fullmatch(raw):
        # Kconfig reads an int in base 10 (``010`` is ten) and a hex with its 0x;
        # int(raw, 0) would refuse ``010`` and crash the whole parse.
        return int(raw, 16) if raw[:2] in ("0x", "0X") else int(raw, 10)
    return raw


@dataclass(frozen=True, slots=True, eq=False)
class KernelConfig(Mapping[str, Value]):
    """A kernel's config as an immutable mapping of symbol (no ``CONFIG_``) → value.

    ``config["virtio_blk"]``, ``config.state("CONFIG_VIRTIO_BLK")``: names in any
    case, with or without the prefix. A symbol set to ``n`` or absent (its
    dependencies are off, so Kconfig wrote nothing) is :meth:`missing`. Two
    configs are equal when their symbols and values are (wherever they were read).
    """

    symbols: Mapping[str, Value]
    #: Where it was read from (a path, ``/proc/config.gz`` in the guest ...).
    source: str

    def __getitem__(self, name: str) -> Value:
        return self.symbols[symbol_name(name)]

    def __iter__(self) -> Iterator[str]:
        return iter(self.symbols)

    def __len__(self) -> int:
        return len(self.symbols)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and symbol_name(name) in self.symbols

    def state(self, name: str) -> Value:
        """The symbol's value; ``Tristate.N`` when the config does not mention it."""
        return self.symbols.get(symbol_name(name), Tristate.N)

    def builtin(self, name: str) -> bool:
        return self.state(name) is Tristate.Y

    def module(self, name: str) -> bool:
        return self.state(name) is Tristate.M

    def enabled(self, name: str) -> bool:
        """Built in or a module."""
        return self.state(name) in (Tristate.Y, Tristate.M)

    def missing(self, name: str) -> bool:
        """``# CONFIG_X is not set``, ``=n``, or not in the config at all."""
        return self.state(name) is Tristate.N

    def matching(self, text: str) -> dict[str, Value]:
        """Symbols whose name contains ``text`` (any case): ``grep -i virtio`` as a dict."""
        needle = symbol_name(text)
        return {k: v for k, v in self.symbols.items() if needle in k}

    def describe(self, name: str) -> str:
        """The symbol as a .config line would say it (absent ones say so)."""
        key = symbol_name(name)
        if key not in self.symbols:
            return f"{PREFIX}{key} is not in this kernel's config"
        value = self.symbols[key]
        if value is Tristate.N:
            return f"{PREFIX}{key} is not set in this kernel's config"
        if isinstance(value, Tristate):
            return f"{PREFIX}{key}={value.value}"
        return f'{PREFIX}{key}="{value}"' if isinstance(value, str) else f"{PREFIX}{key}={value}"


def parse_config(text: str, source: str) -> KernelConfig:
    """Parse .config text (LF or CRLF); lines Kconfig would not read are logged and skipped."""
    values: dict[str, Value] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        not_set = _NOT_SET.fullmatch(line)
        if not line or (line.startswith("#") and not not_set):
            continue
        match = not_set or _ASSIGN.fullmatch(line)
        if match is None:
            log.debug("%s:%d: not a config line, skipped: %.80s", source, number, line)
            continue
        value = Tristate.N if not_set else _value(match.group(2))
        values[match.group(1).upper()] = value
    return KernelConfig(MappingProxyType(values), source)


@functools.lru_cache(maxsize=16)
def _read_cached(path: Path, mtime_ns: int, size: int) -> KernelConfig:
    log.debug("reading kernel config %s", path)
    return parse_config(path.read_text(errors="replace"), str(path))


def read_config(path: Path) -> KernelConfig:
    """The config in ``path``, parsed once per version of the file (path, mtime, size)."""
    try:
        st = path.stat()
    except OSError as exc:
        raise ConfigError(f"cannot read the kernel config {path}: {exc.strerror}") from exc
    return _read_cached(path, st.st_mtime_ns, st.st_size)


#: Guest module (as modules.dep names it, ``-`` as ``_``) → the Kconfig symbol that
#: builds it, for every driver the device catalogue asks for (verified against
#: Debian's 6.1 config and each driver's Makefile line ``obj-$(CONFIG_…) += <module>.o``).
DRIVER_SYMBOLS: Final[Mapping[str, str]] = MappingProxyType({
    "virtio_pci": "VIRTIO_PCI",
    "virtio_mmio": "VIRTIO_MMIO",
    "virtio_blk": "VIRTIO_BLK",
    "virtio_scsi": "SCSI_VIRTIO",
    "virtio_net": "VIRTIO_NET",
    "virtio_balloon": "VIRTIO_BALLOON",
    "virtio_console": "VIRTIO_CONSOLE",
    "virtio_rng": "HW_RANDOM_VIRTIO",
    "sd_mod": "BLK_DEV_SD",
    "sr_mod": "BLK_DEV_SR",
    "nvme": "BLK_DEV_NVME",
    "ahci": "SATA_AHCI",
    "ata_piix": "ATA_PIIX",
    "sym53c8xx": "SCSI_SYM53C8XX_2",
    "e1000": "E1000",
    "e1000e": "E1000E",
    "8139cp": "8139CP",
    "8139too": "8139TOO",
})


def driver_verdict(module: str, config: KernelConfig | None, modules_dir: Path | str) -> str:
    """Why ``module`` is missing from ``modules_dir``, in the config's words ('' if unknown).

    Why: "no virtio_blk" has two fixes: ``not set`` means rebuild the kernel with
    the driver; ``=m`` with no module means the modules tree is not this
    kernel's (or ``make modules_install`` was not run); ``=y`` means
    ``modules.builtin`` is stale.
    """
    name = module.replace("-", "_")
    symbol = DRIVER_SYMBOLS.get(name)
    if symbol is None:
        return ""
    if config is None:
        return (f"{PREFIX}{symbol} unknown: the host has no config for this kernel (a "
                "build tree's .config, or config-<release> beside the kernel file, would say)")
    where = f"({config.source})"
    state = config.state(symbol)
    if state is Tristate.M:
        return (f"{PREFIX}{symbol}=m {where} but the {name} module is missing from the "
                f"modules tree {modules_dir}: install this kernel's modules "
                "(make modules_install) or give its modules tree")
    if state is Tristate.Y:
        return (f"{PREFIX}{symbol}=y (built in) {where} but {modules_dir}/modules.builtin "
                "does not list it: the modules tree is not this kernel's")
    return f"{config.describe(symbol)} {where}: rebuild the kernel with {PREFIX}{symbol}=m or =y"
