"""A distro's own boot: Debian's initramfs-tools initramfs and systemd (bookworm-distro).

Direct kernel boot with the initramfs the kernel package's postinst generated
(MODULES=most, so every root bus is found without us choosing modules), systemd
as PID 1, the framed console served by a systemd unit, qemu-ga started by systemd
and SSH with the session's key. Builds one more
image once per machine.
"""

from __future__ import annotations

import pytest

from pytest_virtio.guests.session import VirtioSession
from pytest_virtio.images.recipe import DATA_DIR

INNER = '''
import pytest


@pytest.mark.vm(root_bus="ide", devices=["agent"], nics=["virtio-net"])
def test_distro_initramfs_and_systemd(guest):
    assert guest.ctx.initrd.endswith("/initrd.img")  # the distro's, not one of ours
    assert guest.check("cat /proc/1/comm").stdout.strip() == "systemd"
    assert guest.check("systemctl is-active pytest-virtio-console").stdout.strip() == "active"
    assert "root=LABEL=pvroot" in guest.check("cat /proc/cmdline").stdout
    # the root is on IDE: initramfs-tools (MODULES=most) carried ata_piix without us
    assert "ata_piix" in guest.lsmod()
    # qemu-ga was started by the distro's systemd (its udev rule), not by us
    assert guest.check("systemctl is-active qemu-guest-agent", via="agent").stdout.strip() \
        == "active"
    assert guest.check("cat /proc/1/comm", via="agent").stdout.strip() == "systemd"
    # SSH as under our init: the session's key from fw_cfg, dropbear started by pv-ssh
    assert guest.check("cat /proc/1/comm", via="ssh").stdout.strip() == "systemd"


@pytest.mark.vm(initramfs_modules=["virtio_blk"])
def test_initramfs_modules_is_refused(guest):
    pass
'''


def test_distro_boot(pytester: pytest.Pytester, virtio_session: VirtioSession,
                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTEST_VIRTIO_CACHE", str(virtio_session.settings.cache_dir))
    pytester.makepyfile(test_distro=INNER)
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", f"--virtio-accel={virtio_session.accel().accel}",
        f"--virtio-image={DATA_DIR / 'bookworm-distro.toml'}", "-q",
        "--continue-on-collection-errors", timeout=1500,
    )
    result.assert_outcomes(passed=1, errors=1)
    assert "boots the distro's own initramfs (boot = \"distro\")" in result.stdout.str()
