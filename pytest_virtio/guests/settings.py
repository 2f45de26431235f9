"""Settings resolved once: CLI option > ini > environment > default.

Why one frozen object: every part of the plugin reads the same validated
values, and a bad value is reported once, at configure time, naming where it
came from and what is allowed (a marker still overrides per test).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pytest_virtio.errors import ConfigError
from pytest_virtio.files import check_readable_file
from pytest_virtio.images import default_cache_dir, load_recipe
from pytest_virtio.images.kernel import check_choice
from pytest_virtio.results.baseline import DEFAULT_COMPARE_FAIL, CompareFail, parse_compare_fail
from pytest_virtio.results.perf import parse_rounds

ACCELS = ("auto", "kvm", "tcg")
KEEP = ("failed", "always", "never")
INCONCLUSIVE = ("pass", "fail")
SPLATS = ("fail", "off")


@dataclass(frozen=True, slots=True)
class Option:
    """One setting: its CLI flag, ini key, environment variable, default, help."""

    name: str
    default: str | None
    help: str
    choices: tuple[str, ...] | None = None
    #: The value of the bare flag (``--virtio-snapshot`` means ``on``); None: needs one.
    bare: str | None = None

    @property
    def flag(self) -> str:
        return "--virtio-" + self.name.replace("_", "-")

    @property
    def ini(self) -> str:
        return "virtio_" + self.name

    @property
    def env(self) -> str:
        return "PYTEST_VIRTIO_" + self.name.upper()

    def cli(self) -> tuple[tuple[str, ...], dict[str, Any]]:
        """The option strings and argparse keywords of its command-line option.

        An option with a bare form is a flag whose value, if any, is given with
        ``=`` only (``--virtio-snapshot=off``): an optional separate value would
        take the next argument, a path in ``pytest --virtio-snapshot tests/``.
        """
        if self.bare is None:
            return (self.flag,), {"choices": self.choices}
        forms = tuple(f"{self.flag}={choice}" for choice in self.choices or ())
        return (self.flag, *forms), {"action": FlagAction, "bare": self.bare}


class FlagAction(argparse.Action):
    """``--flag`` (the option's bare value) or ``--flag=VALUE``, never ``--flag VALUE``.

    Each ``--flag=VALUE`` is an option string of its own (argparse matches a
    whole option string before it splits at ``=``), so the flag takes no
    argument and the word after it stays a path.
    """

    def __init__(self, option_strings: Sequence[str], dest: str, bare: str,
                 **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, **kwargs)
        self.bare = bare

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: object, option_string: str | None = None) -> None:
        _, sep, value = (option_string or "").partition("=")
        setattr(namespace, self.dest, value if sep else self.bare)


OPTIONS: tuple[Option, ...] = (
    Option("accel", "auto", "accelerator: auto probes KVM with a bounded boot, else TCG",
           ACCELS),
    Option("qemu", None, "qemu-system-x86_64 binary (default: from PATH)"),
    Option("cache", None, "image cache directory (default ~/.cache/pytest-virtio)"),
    Option("kernel", None, "boot this kernel (bzImage, vmlinux or build tree) on the built "
           "image's rootfs; the plugin builds its initramfs"),
    Option("modules", None, "with --virtio-kernel: its modules (modules_install tree, build "
           "tree or /lib/modules/<version>)"),
    Option("initrd", None, "with --virtio-kernel and --virtio-rootfs: use this initramfs as is"),
    Option("rootfs", None, "with --virtio-kernel and --virtio-initrd: its root disk image "
           "(label pvroot)"),
    Option("image", None, "build and boot this image recipe (a .toml file) instead of the "
           "shipped bookworm one"),
    Option("keep", "failed", "keep guest artifacts (console, stderr, reproduce.sh)", KEEP),
    Option("artifacts", ".pytest-virtio", "where kept artifacts go"),
    Option("timeout_scale", None, "multiply every guest timeout (default: 1 kvm, 4 tcg)"),
    Option("snapshot", "off", "restore each guest from a per-worker snapshot of its machine "
           "shape (booted once) instead of booting it", ("on", "off"), bare="on"),
    Option("json", None, "write every workload result of the session to this JSON file"),
    Option("plot", None, "draw a bar chart of the results to this .svg or .png file"),
    Option("save", None, "save the results as a baseline file for this machine"),
    Option("compare", None, "compare the results with a baseline file saved earlier"),
    Option("compare_fail", "iops:10%", "with --virtio-compare: fail on regressions beyond "
           "these tolerances, e.g. 'iops:10%,lat_p99:20%' (metrics iops, bw, lat_p99)"),
    Option("perf_rounds", "1", "run each measured workload this many times on its guest "
           "(every round is a sample; relative checks compare medians)"),
    Option("perf_inconclusive", "pass", "a relative check whose spreads straddle the "
           "factor is reported as inconclusive; 'fail' makes that fail the session",
           INCONCLUSIVE),
    Option("splats", "fail", "a kernel splat (WARNING, BUG, Oops, KASAN/UBSAN/KFENCE, lockdep, "
           "hung task, lockup, RCU stall, list corruption, a broken virtio ring) the guest "
           "logged while a test ran fails that test; 'off' does not look", SPLATS),
)


@dataclass(frozen=True, slots=True)
class Settings:
    accel: str = "auto"
    qemu: str | None = None
    cache_dir: Path = Path()
    kernel: str | None = None
    modules: str | None = None
    initrd: str | None = None
    rootfs: str | None = None
    image: str | None = None
    keep: str = "failed"
    artifacts: Path = Path(".pytest-virtio")
    timeout_scale: float | None = None
    snapshot: bool = False
    json: Path | None = None
    plot: Path | None = None
    save: Path | None = None
    compare: Path | None = None
    compare_fail: CompareFail = DEFAULT_COMPARE_FAIL
    perf_rounds: int = 1
    perf_inconclusive: str = "pass"
    splats: str = "fail"

    @classmethod
    def from_values(cls, values: dict[str, str | None]) -> Settings:
        """Validate raw strings (from any source) into Settings."""
        for opt in OPTIONS:
            val = values.get(opt.name)
            if val is not None and opt.choices and val not in opt.choices:
                raise ConfigError(
                    f"{opt.flag} / {opt.ini} / {opt.env}: {val!r} is not one of "
                    f"{', '.join(opt.choices)}"
                )
        custom = [values.get(k) for k in ("kernel", "initrd", "rootfs")]
        _check_kernel_route(values)
        image = values.get("image")
        if image:
            _check_readable_file("image", image)
            load_recipe(image)  # a bad field fails now, naming it, not at the first boot
        scale = values.get("timeout_scale")
        try:
            scale_f = float(scale) if scale else None
        except ValueError:
            raise ConfigError(f"--virtio-timeout-scale: {scale!r} is not a number") from None
        if scale_f is not None and scale_f <= 0:
            raise ConfigError(f"--virtio-timeout-scale: {scale!r} must be positive")
        cache = values.get("cache")
        cache_dir = Path(cache).expanduser() if cache else default_cache_dir()
        check_writable_cache(cache_dir)
        report_paths = _report_paths(values)
        return cls(
            accel=values.get("accel") or "auto",
            qemu=values.get("qemu"),
            cache_dir=cache_dir,
            kernel=custom[0], modules=values.get("modules"), initrd=custom[1],
            rootfs=custom[2], image=image,
            keep=values.get("keep") or "failed",
            artifacts=Path(values.get("artifacts") or ".pytest-virtio"),
            timeout_scale=scale_f,
            snapshot=(values.get("snapshot") or "off") == "on",
            **report_paths,
            compare_fail=_compare_fail(values.get("compare_fail")),
            perf_rounds=_rounds(values.get("perf_rounds")),
            perf_inconclusive=values.get("perf_inconclusive") or "pass",
            splats=values.get("splats") or "fail",
        )


def _check_kernel_route(values: dict[str, str | None]) -> None:
    """Two routes: your kernel alone (+ its modules), or kernel + initrd + rootfs as is."""
    kernel, modules = values.get("kernel"), values.get("modules")
    initrd, rootfs = values.get("initrd"), values.get("rootfs")
    if modules and not kernel:
        raise ConfigError("--virtio-modules goes with --virtio-kernel: give the kernel these "
                          "modules belong to")
    if initrd or rootfs:
        if not (kernel and initrd and rootfs):
            raise ConfigError(
                "--virtio-initrd and --virtio-rootfs go with --virtio-kernel: give all three "
                "(a kernel alone, with --virtio-modules, gets an initramfs built for it)"
            )
        if modules:
            raise ConfigError("--virtio-modules goes with --virtio-kernel alone: with "
                              "--virtio-initrd the initrd and rootfs bring their own modules")
        for name in ("kernel", "initrd", "rootfs"):
            _check_readable_file(name, values[name] or "")
        return
    if kernel:
        check_choice(kernel, modules)


def _report_paths(values: dict[str, str | None]) -> dict[str, Path | None]:
    """--virtio-json/-plot/-save/-compare as paths; the chart suffix is checked up front
    so a typo fails at configure time, not after a long run."""
    paths = {k: Path(v).expanduser() if (v := values.get(k)) else None
             for k in ("json", "plot", "save", "compare")}
    plot = paths["plot"]
    if plot is not None and plot.suffix.lower() not in (".svg", ".png"):
        raise ConfigError(f"--virtio-plot: {str(plot)!r} must end in .svg or .png")
    return paths


def _rounds(value: str | None) -> int:
    return parse_rounds(value or "1", "--virtio-perf-rounds")


def _compare_fail(spec: str | None) -> CompareFail:
    if not spec:
        return DEFAULT_COMPARE_FAIL
    try:
        return parse_compare_fail(spec)
    except ConfigError as exc:
        raise ConfigError(f"--virtio-compare-fail: {exc}") from None


def check_writable_cache(path: Path) -> None:
    """The image cache must take files: every session locks, and may build, in it.

    Checked by making the directory and a nameless file in it (``os.access`` says
    yes to root on a mode-0555 directory, and nothing about a path under /proc),
    so a read-only or unwritable cache is a usage error now, naming the path and
    the fix, not an INTERNALERROR at the header or a failure at the first boot.
    """
    opt = next(o for o in OPTIONS if o.name == "cache")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise ConfigError(
            f"{opt.flag}: the image cache {path} is not writable ({exc.strerror or exc}): "
            f"choose a writable directory with {opt.flag}=DIR (ini {opt.ini}, env {opt.env})"
        ) from None


def _check_readable_file(name: str, path: str) -> None:
    """Fail at configure time, not at the first boot minutes later."""
    check_readable_file(Path(path).expanduser(), f"--virtio-{name}:", f"{name} file")


def resolve_values(getoption: Any, getini: Any) -> dict[str, str | None]:
    """Merge CLI > ini > environment > default for every option."""
    values: dict[str, str | None] = {}
    for opt in OPTIONS:
        val = getoption(opt.flag)
        if val is None:
            ini = getini(opt.ini)
            val = ini if ini else None
        if val is None:
            val = os.environ.get(opt.env) or opt.default
        values[opt.name] = val
    return values
