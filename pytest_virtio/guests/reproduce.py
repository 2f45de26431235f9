"""``reproduce.sh``: a guest's QEMU command line that still runs after the session ended.

Why not just the argv: it names the run directory (sockets, console log, blank
data disks), which is deleted with the session, and vhost-user-blk disks whose
server was the pytest process. The script therefore makes its own directory
(``$PV_RUN`` or a fresh ``mktemp -d``), puts every run-directory path there,
recreates blank data disks at their size, serves vhost-user-blk disks with
``qemu-storage-daemon`` (Debian ``qemu-system-common``), starts a passt per
passt-backed NIC (without the SSH forward), recreates tap NICs when run as root
(QEMU in a new network namespace with one tap per such NIC; not root: user-mode
networking carries them, and the script says so) and drops the session's
SSH key (``-fw_cfg``; its private half is gone). Files that outlive the session
stay as they were: the cached kernel, initramfs and root image (opened with
``snapshot=on``), and disk images the test named.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from pathlib import Path

from pytest_virtio.guests.passt import GUEST_PREFIX, passt_argv
from pytest_virtio.guests.tap import HOST_ADDRESS
from pytest_virtio.spec import Disk, LaunchContext, MachineSpec
from pytest_virtio.spec.catalogue import COMMAND_TTYS

__all__ = ["script"]


def _quote(arg: str, run_dir: str) -> str:
    """``arg`` shell-quoted, with the run directory replaced by ``"$R"``."""
    return '"$R"'.join(shlex.quote(part) if part else "" for part in arg.split(run_dir))


def _without_fw_cfg(argv: Sequence[str]) -> list[str]:
    kept: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "-fw_cfg":
            skip = True
        else:
            kept.append(arg)
    return kept


def _blank_disks(spec: MachineSpec, ctx: LaunchContext, run_dir: str) -> list[str]:
    lines = []
    for disk in spec.disks:
        path = ctx.disk_files.get(disk.name, "")
        if disk.image is None and path.startswith(run_dir) and disk.external_socket is None:
            lines.append(f"truncate -s {disk.size_bytes} {_quote(path, run_dir)}")
    return lines


def _storage_daemon(disks: Sequence[Disk], ctx: LaunchContext, run_dir: str,
                    smp: int) -> list[str]:
    """Lines starting one qemu-storage-daemon serving every in-process vhost-user-blk disk."""
    if not disks:
        return []
    args = ["qemu-storage-daemon"]
    for disk in disks:
        writable = "off" if disk.readonly else "on"
        args += ["--blockdev",
                 f"driver=file,node-name=f-{disk.name},filename={ctx.disk_files[disk.name]}"]
        args += ["--export", f"type=vhost-user-blk,id=e-{disk.name},node-name=f-{disk.name},"
                 f"addr.type=unix,addr.path={ctx.vhost_sockets[disk.name]},"
                 f"writable={writable},num-queues={disk.num_queues or smp}"]
    return ["# vhost-user-blk disks were served by the pytest process: qemu-storage-daemon now.",
            *_in_background(args, [ctx.vhost_sockets[d.name] for d in disks], run_dir)]


def _passts(spec: MachineSpec, ctx: LaunchContext, run_dir: str) -> list[str]:
    """Lines starting a passt per passt-backed NIC (no SSH forward: the key is gone)."""
    lines: list[str] = []
    for nic in spec.nics:
        if nic.backend == "passt":
            sock = ctx.net_sockets[nic.name]
            lines += [f"# NIC {nic.name} was carried by passt: started here the same way.",
                      *_in_background(passt_argv("passt", sock, None), [sock], run_dir)]
    return lines


#: Set in the copy of the script that runs in its own network namespace.
_NETNS_FLAG = "PV_TAP_NETNS"


def _tap_variable(index: int) -> str:
    return f"PV_TAP{index}"


def _taps(spec: MachineSpec) -> list[str]:
    """Lines giving each tap NIC its netdev (``$PV_TAP<i>``): as root, the script runs
    again in a new network namespace and makes the taps there (the first addressed as
    the guest's gateway); otherwise user-mode networking, said on stderr."""
    taps = [nic for nic in spec.nics if nic.backend == "tap"]
    if not taps:
        return []
    names = ", ".join(nic.name for nic in taps)
    made: list[str] = ["  ip link set lo up"]
    fallback: list[str] = []
    for i, nic in enumerate(taps):
        dev = f"pvtap{i}"
        made += [f"  ip tuntap add dev {dev} mode tap vnet_hdr",
                 *([f"  ip addr add {HOST_ADDRESS}/{GUEST_PREFIX} dev {dev}"] if i == 0 else []),
                 f"  ip link set {dev} up",
                 f"  {_tap_variable(i)}=tap,id={nic.name},ifname={dev},script=no,downscript=no"]
        fallback.append(f"  {_tap_variable(i)}=user,id={nic.name}")
    return [
        f"# NIC(s) {names} were tap devices in a network namespace of their own (its end",
        f"# {HOST_ADDRESS}/{GUEST_PREFIX}). As root this script makes that again: it runs "
        "itself in a new",
        "# network namespace with a tap per such NIC. Otherwise user-mode networking "
        "carries them.",
        f'if [ "$(id -u)" = 0 ] && [ -z "${{{_NETNS_FLAG}:-}}" ]; then',
        f'  export {_NETNS_FLAG}=1; exec unshare --net -- sh "$0" "$@"',
        "fi",
        f'if [ -n "${{{_NETNS_FLAG}:-}}" ]; then',
        *made,
        "else",
        f'  echo "reproduce.sh: not root: NIC(s) {names} on user-mode networking, not on a '
        'tap" >&2',
        *fallback,
        "fi",
    ]


def _tap_netdevs(argv: Sequence[str], spec: MachineSpec) -> list[str]:
    """``argv`` with each tap NIC's ``-netdev`` (an fd of the session's) as ``$PV_TAP<i>``."""
    taps = [nic.name for nic in spec.nics if nic.backend == "tap"]
    out = list(argv)
    for i, arg in enumerate(argv):
        if i and argv[i - 1] == "-netdev" and arg.startswith("tap,"):
            name = arg.split("id=", 1)[1].split(",", 1)[0]
            out[i] = f'"${_tap_variable(taps.index(name))}"'
    return out


def _in_background(args: Sequence[str], sockets: Sequence[str], run_dir: str) -> list[str]:
    """Start ``args`` in the background (killed with the script) and wait for its sockets."""
    socks = " ".join(_quote(s, run_dir) for s in sockets)
    return [
        " ".join(_quote(a, run_dir) for a in args) + " &",
        'pid=$!; pids="$pids $pid"',
        f"for s in {socks}; do",
        '  while [ ! -S "$s" ]; do kill -0 $pid || exit 1; sleep 0.05; done',
        "done",
    ]


def script(argv: Sequence[str], run_dir: Path, spec: MachineSpec, ctx: LaunchContext) -> str:
    """The text of ``reproduce.sh`` for one guest (see the module docstring)."""
    rd = str(run_dir)
    served = [d for d in spec.disks if d.bus == "vhost-user-blk" and d.external_socket is None]
    command = " ".join(a if a.startswith('"$') else _quote(a, rd)
                       for a in _tap_netdevs(_without_fw_cfg(argv), spec))
    helpers = [*_storage_daemon(served, ctx, rd, spec.smp), *_passts(spec, ctx, rd)]
    exec_or_run = "exec " if not helpers else ""
    # Ctrl-C reaches the helpers too (one process group); the trap covers the rest.
    trap = ["pids=", "trap 'kill $pids 2>/dev/null' EXIT"] if helpers else []
    lines = [
        "#!/bin/sh",
        "# This guest's QEMU command line as pytest-virtio ran it, runnable after the",
        "# session: sockets, console log and blank disks go to $PV_RUN (default: a new",
        "# temporary directory). Extra QEMU arguments may follow, e.g. -serial stdio.",
        "set -e",
        *_taps(spec),
        'R=${PV_RUN:-$(mktemp -d "${TMPDIR:-/tmp}/pv-repro.XXXXXX")}',
        'mkdir -p "$R"',
        ('echo "reproduce.sh: run directory $R (kernel console log: $R/console.log; the '
         f'guest shell is on {COMMAND_TTYS[spec.command_channel]}: '
         'socat - UNIX-CONNECT:$R/cmd.sock)" >&2'),
        *_blank_disks(spec, ctx, rd),
        *trap,
        *helpers,
        f'{exec_or_run}{command} "$@"',
    ]
    return "\n".join(lines) + "\n"
