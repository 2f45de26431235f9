"""Snapshot templates: restored guests are as fresh as a boot and isolated from each other.

One VirtioSession with snapshots on for the module: its first guest per shape
boots and saves the template, every later one is a restore of it.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator

import pytest

from pytest_virtio import spec as spec_mod
from pytest_virtio.errors import GuestPanic
from pytest_virtio.guests.session import VirtioSession
from pytest_virtio.plugin.hooks import SETTINGS_KEY

PLAIN = spec_mod.MachineSpec()
WITH_NIC = spec_mod.spec_from_kwargs({"nics": ["virtio-net"]})

#: Nothing of the freshening helper is left in a test's guest: no directory,
#: no process, no zombie (the pattern is bracketed so grep does not find itself).
NO_HELPER = ("test ! -e /run/pytest-virtio-freshen && "
             "! grep -ls 'pytest-virtio-fresh[e]n' /proc/[0-9]*/cmdline && "
             "! grep -s '^[0-9]* ([^)]*) Z' /proc/[0-9]*/stat")


@pytest.fixture(scope="module")
def snap(pytestconfig: pytest.Config) -> Iterator[tuple[VirtioSession, list[str]]]:
    settings = dataclasses.replace(pytestconfig.stash[SETTINGS_KEY], snapshot=True)
    said: list[str] = []
    with VirtioSession(settings, said.append) as session:
        yield session, said


def _random(guest) -> str:
    return guest.check("head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'").stdout


def test_restored_guests_differ_in_entropy_and_share_nothing(snap) -> None:
    session, said = snap
    # The shape's first guest is booted, saved as the template, and runs on.
    first = session.boot(PLAIN, "first")
    assert len(session.templates.templates) == 1
    assert any("template of a 512 MiB guest saved" in m for m in said), said
    first.check("echo from-first > /root/left-behind && modprobe e1000 && sync")
    second = session.boot(PLAIN, "second")
    third = session.boot(PLAIN, "third")
    assert len(session.templates.templates) == 1  # restores, not new templates
    assert len({first.machine.pid, second.machine.pid, third.machine.pid}) == 3
    # Two restores of one saved RNG state: reseeded, so their bytes differ.
    a, b = _random(second), _random(third)
    assert len(a) == len(b) == 64 and a != b
    second.check("echo from-second > /root/left-behind && modprobe e1000 && sync")
    for guest in (third, session.boot(PLAIN, "fourth")):
        assert guest.run("cat /root/left-behind").rc != 0
        assert "e1000" not in guest.lsmod()
    assert first.check("cat /root/left-behind").stdout == "from-first\n"
    for guest in (first, second, third):
        guest.check(NO_HELPER)
    for guest in list(session.guests):
        guest.close()


def test_restored_guest_has_the_host_wall_clock(snap) -> None:
    session, _ = snap
    session.boot(PLAIN, "clock0").close()  # this shape's template exists now
    template = session.templates.templates[0]
    # Let the saved clock fall two seconds behind: a restore that did not set
    # the clock would show it.
    time.sleep(max(0.0, template.state.stat().st_mtime + 2 - time.time()))
    guest = session.boot(PLAIN, "clock")
    before = time.time()
    guest_now = float(guest.check("date +%s.%N").stdout)
    after = time.time()
    assert before - 0.5 < guest_now < after + 0.5, (before, guest_now, after)
    # Its reproduce.sh boots the shape: the saved state is gone after the session.
    script = (guest.run_dir / "reproduce.sh").read_text()
    assert "-incoming" not in script and "restored from a snapshot template" in script
    assert str(session.image().rootfs) in script
    guest.close()


def test_a_guest_that_panics_does_not_touch_the_next(snap) -> None:
    session, _ = snap
    broken = session.boot(PLAIN, "broken")
    broken.run("rm -rf /usr/sbin/modprobe /root; sync")
    with pytest.raises(GuestPanic):
        broken.run("echo c > /proc/sysrq-trigger", timeout=30 * broken.timeout_scale)
    broken.close()
    after = session.boot(PLAIN, "after")
    assert after.check("test -x /usr/sbin/modprobe && test -d /root && echo ok").stdout == "ok\n"
    after.close()


def test_ssh_works_on_a_new_port_with_the_templates_host_key(snap) -> None:
    session, _ = snap
    one = session.boot(WITH_NIC, "ssh1")
    two = session.boot(WITH_NIC, "ssh2")
    assert one.host_key and one.host_key == two.host_key
    assert one.ssh_session().port != two.ssh_session().port
    assert two.run("echo over-ssh", via="ssh").stdout == "over-ssh\n"
    assert one.run("hostname", via="ssh").stdout == "pvguest\n"
    one.close()
    two.close()


def test_vhost_user_disk_is_plugged_after_the_restore(snap) -> None:
    session, _ = snap
    spec = spec_mod.spec_from_kwargs({"disks": [{"bus": "vhost-user-blk", "size": "16M"}]})
    guest = session.boot(spec, "vu")
    path = guest.disk_path("disk0")
    guest.check(f"dd if=/dev/zero of={path} bs=4k count=16 oflag=direct 2>/dev/null")
    assert guest.backends["disk0"].stats.to_dict()["bytes"].get("OUT", 0) >= 16 * 4096
    guest.close()


def test_a_shape_that_cannot_be_saved_boots_and_says_so_once(snap, tmp_path) -> None:
    session, said = snap
    image = tmp_path / "data.img"
    image.write_bytes(b"\0" * (1 << 20))
    spec = spec_mod.spec_from_kwargs({"disks": [{"bus": "virtio-blk", "image": str(image)}]})
    before = len(session.templates.templates)
    for name in ("in-place1", "in-place2"):
        session.boot(spec, name).close()
    fallbacks = [m for m in said if "booting instead of restoring" in m and "in place" in m]
    assert len(fallbacks) == 1, said
    assert len(session.templates.templates) == before


def test_a_virtio_console_channel_survives_save_and_restore(snap) -> None:
    """The command shell on hvc0 (command_channel='virtio-console') answers in a restored
    guest as in the one that was saved: QEMU migrates the virtconsole port and the
    host end re-adopts the channel."""
    session, _ = snap
    shape = spec_mod.MachineSpec(command_channel="virtio-console")
    before = len(session.templates.templates)
    first = session.boot(shape, "hvc-first")
    assert len(session.templates.templates) == before + 1  # booted and saved
    restored = session.boot(shape, "hvc-restored")
    assert len(session.templates.templates) == before + 1  # restored, not saved again
    assert restored.machine.pid != first.machine.pid
    for guest in (first, restored):
        assert guest.run("readlink /proc/$$/fd/0").stdout.strip() == "/dev/hvc0"
        out = guest.run("head -c 200000 /dev/zero | tr '\\0' x").stdout
        assert out == "x" * 200000
