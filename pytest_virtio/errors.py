"""The error hierarchy: one root, one branch per place a failure can come from.

Modelled on qemu.qmp: callers catch the precise class they can handle, or
``VirtioError`` for all of them.  Every message is meant to be read by a person
in a pytest failure report, so each names the thing that failed and the fix.
"""

from __future__ import annotations


class VirtioError(Exception):
    """Root of every error pytest-virtio raises on purpose."""

    #: The guest whose boot failed with this error (already shut down), so the
    #: fixture can keep its console log and command line as artifacts.
    failed_guest: object | None = None


class ConfigError(VirtioError):
    """A bad option, ini value, environment variable or marker argument."""


class MissingToolError(VirtioError):
    """A host program is missing; the message names the Debian package to install."""

    def __init__(self, tool: str, package: str, why: str = "") -> None:
        self.tool = tool
        self.package = package
        hint = f" ({why})" if why else ""
        super().__init__(
            f"{tool} not found{hint}; install it with: apt-get install {package}"
        )


class ImageError(VirtioError):
    """A guest image could not be built, or a cached one is corrupt or unreadable."""


class LaunchError(VirtioError):
    """QEMU would not start, or exited while the test still needed it."""


class QmpError(LaunchError):
    """QEMU answered a QMP command with an error.

    Like qemu.qmp's ``ExecuteError`` it carries what was sent and what came
    back, so callers decide on QEMU's error class and description, not on the
    text of a message (hotplug retries "in use", the balloon waits out "hasn't
    updated").  A LaunchError because for the test it is the same failure: QEMU
    would not do what the guest needed.
    """

    def __init__(self, command: str, arguments: dict[str, object] | None,
                 error_class: str, desc: str) -> None:
        self.command = command
        self.arguments = arguments
        self.error_class = error_class
        self.desc = desc
        super().__init__(f"QMP {command} failed: {desc} ({error_class})")


class QmpTimeout(LaunchError):
    """QEMU sent no reply to a QMP command within ``timeout`` seconds.

    A reply normally takes milliseconds; none at all means QEMU's main loop is
    blocked (a vhost-user back-end that does not answer, a process stopped by
    the host).  Carries the command so the report says what QEMU was asked.
    """

    def __init__(self, command: str, arguments: dict[str, object] | None, timeout: float,
                 stderr_tail: str = "") -> None:
        self.command = command
        self.arguments = arguments
        self.timeout = timeout
        tail = f"\n{stderr_tail}" if stderr_tail else ""
        super().__init__(f"QEMU did not answer QMP {command} within {timeout:.0f}s: its main "
                         f"loop is blocked (a vhost-user back-end not answering, or the "
                         f"process stopped){tail}")


class MissingDriver(LaunchError):
    """The guest kernel has no driver for a device the spec asks for.

    Found on the host before boot from the kernel's ``modules.dep`` and
    ``modules.builtin``: a kernel built without, say, AHCI cannot drive an AHCI
    disk, and saying so beats a disk that silently never appears.
    """

    def __init__(self, kernel_version: str, device: str, modules: tuple[str, ...],
                 where: str, config_verdict: str = "") -> None:
        self.kernel_version = kernel_version
        self.device = device
        self.modules = modules
        #: What the kernel's config says about the drivers (``CONFIG_X is not set``
        #: or ``CONFIG_X=m`` with the module missing); '' when no config is known.
        self.config_verdict = config_verdict
        why = f"; {config_verdict}" if config_verdict else ""
        super().__init__(
            f"kernel {kernel_version} has no driver for {device}: {', '.join(modules)} "
            f"neither a module (modules.dep) nor built in (modules.builtin) in {where}{why}"
        )


class GuestError(VirtioError):
    """Something went wrong inside a running guest; carries the console tail."""

    def __init__(self, message: str, console_tail: str = "") -> None:
        self.console_tail = console_tail
        if console_tail:
            message = f"{message.rstrip()}\n--- console tail ---\n{console_tail}"
        super().__init__(message)


class GuestTimeout(GuestError):
    """The guest did not answer within the (accelerator-scaled) timeout."""


class GuestPanic(GuestError):
    """The guest kernel panicked."""


class ChannelError(GuestError):
    """The command channel could not carry a command or its result exactly."""


class ChannelRefused(ChannelError):
    """The guest's shell received a command other than the bytes sent (none of it ran)."""


class ChannelMode(ChannelError):
    """The channel's terminal mode was changed (by a command): a result was not exact."""


class ShellRestarted(ChannelError):
    """The guest's command shell died during a command (e.g. ``kill -9 $$``): no result."""


class CommandFailed(GuestError):
    """``guest.check`` ran a command that exited non-zero."""


class BackendError(VirtioError):
    """The in-process vhost-user backend failed."""


class ProtocolError(BackendError):
    """A vhost-user message or a virtqueue broke the protocol's rules."""


class WorkloadError(VirtioError):
    """A workload (fio, dd, iperf3) failed in the guest."""
