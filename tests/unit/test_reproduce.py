"""reproduce.sh text: nothing in it may point into the (deleted) run directory."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

from pytest_virtio.guests import reproduce
from pytest_virtio.spec import Disk, LaunchContext, MachineSpec, Nic, to_argv

RUN = "/run/pv/g0"


def _ctx(spec: MachineSpec, **extra: object) -> LaunchContext:
    """Every path a session would give, the per-run ones under RUN."""
    return LaunchContext(
        qemu_binary="qemu-system-x86_64", accel="tcg", kernel="/cache/vmlinux",
        initrd="/cache/initrd", root_image="/cache/root.img", append="console=ttyS0",
        qmp_socket=f"{RUN}/qmp.sock", console_socket=f"{RUN}/con.sock",
        console_log=f"{RUN}/console.log",
        disk_files={d.name: d.image or f"{RUN}/disk-{d.name}.img" for d in spec.disks},
        vhost_sockets={d.name: f"{RUN}/vu-{d.name}.sock" for d in spec.disks
                       if d.bus == "vhost-user-blk"},
        **extra,  # type: ignore[arg-type]
    )


def test_script_moves_run_dir_paths_serves_vhost_disks_and_drops_fw_cfg() -> None:
    spec = MachineSpec(disks=(Disk(name="vu", bus="vhost-user-blk", size="32M"),
                              Disk(name="blk", bus="virtio-blk", size="16M"),
                              Disk(name="img", bus="virtio-blk", image="/images/data.img")),
                       nics=(Nic(),))
    ctx = _ctx(spec, fw_cfg={"opt/pytest-virtio/authorized_keys": f"{RUN}/ssh/k.pub"})
    argv = to_argv(spec, ctx)
    assert "-fw_cfg" in argv
    text = reproduce.script(argv, Path(RUN), spec, ctx)
    assert RUN not in text
    assert "-fw_cfg" not in text
    assert f"truncate -s {32 << 20} \"$R\"/disk-vu.img" in text
    assert f"truncate -s {16 << 20} \"$R\"/disk-blk.img" in text
    assert "/images/data.img" in text and "disk-img" not in text
    assert "qemu-storage-daemon --blockdev" in text and 'addr.path="$R"/vu-vu.sock' in text
    last = text.strip().splitlines()[-1]
    assert not last.startswith("exec ")  # the daemon is stopped when QEMU ends
    words = shlex.split(last.replace('"$R"', "/RUN"))
    assert words[0] == argv[0] and "socket,id=con0,path=/RUN/con.sock" in words[-2] + \
        " ".join(words)


def test_script_without_served_disks_execs_qemu() -> None:
    spec = MachineSpec()
    ctx = _ctx(spec)
    text = reproduce.script(to_argv(spec, ctx), Path(RUN), spec, ctx)
    assert text.strip().splitlines()[-1].startswith("exec ")
    assert "qemu-storage-daemon" not in text and "truncate" not in text


def test_script_names_the_shells_terminal_per_transport() -> None:
    for channel, tty in (("serial", "ttyS1"), ("virtio-console", "hvc0")):
        spec = MachineSpec(command_channel=channel)
        ctx = _ctx(spec)
        assert f"guest shell is on {tty}:" in reproduce.script(to_argv(spec, ctx), Path(RUN),
                                                                spec, ctx)


def test_script_starts_passt_for_a_passt_nic_and_kills_it_with_the_script(
        tmp_path: Path) -> None:
    spec = MachineSpec(nics=(Nic(name="net0", backend="passt"), Nic(name="net1")),
                       disks=(Disk(name="vu", bus="vhost-user-blk", size="8M"),))
    ctx = _ctx(spec, net_sockets={"net0": f"{RUN}/passt-net0.sock"})
    text = reproduce.script(to_argv(spec, ctx), Path(RUN), spec, ctx)
    assert RUN not in text
    passt = next(line for line in text.splitlines() if line.startswith("passt "))
    assert '--socket "$R"/passt-net0.sock' in passt and "--tcp-ports none" in passt
    assert passt.endswith(" &") and text.count("--socket") == 1  # net1 stays user-mode
    assert "qemu-storage-daemon" in text  # both helpers, one trap for both
    assert text.count("trap ") == 1 and text.index("trap ") < text.index("qemu-storage-daemon")
    assert not text.strip().splitlines()[-1].startswith("exec ")
    script = tmp_path / "reproduce.sh"
    script.write_text(text)
    assert subprocess.run(["sh", "-n", str(script)], check=False).returncode == 0
