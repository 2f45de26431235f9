"""Kernel splats from /dev/kmsg records: what counts, what is only text, where a report ends."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from pytest_virtio.channels.kmsg import new_records_shell, parse_records
from pytest_virtio.channels.runners import Result
from pytest_virtio.channels.splats import MAX_LINES, find_splats
from pytest_virtio.errors import GuestError
from pytest_virtio.guests.kernel_log import KernelLog

WARN = """\
4,1001,5000000,-;------------[ cut here ]------------
4,1002,5000001,-;WARNING: CPU: 0 PID: 1 at drivers/virtio/virtio_ring.c:2101 virtqueue_add+0x1/0x2
4,1003,5000002,-;Modules linked in: virtio_blk
4,1004,5000003,-;CPU: 0 PID: 1 Comm: sh Not tainted 6.1.0 #1
4,1005,5000004,-;Call Trace:
4,1006,5000005,-; <TASK>
4,1007,5000006,-; virtqueue_add_split+0x10/0x20
4,1008,5000007,-;---[ end trace 0000000000000000 ]---
6,1009,5000008,-;virtio_blk virtio1: [vdb] 2048 512-byte logical blocks
"""


def _records(text: str):
    return parse_records(text)


def test_a_warning_is_one_splat_with_its_trace_up_to_the_end_line() -> None:
    [splat] = find_splats(_records(WARN))
    assert splat.kind == "warning" and splat.seq == 1002
    assert splat.title.startswith("WARNING: CPU: 0 PID: 1 at drivers/virtio/virtio_ring.c")
    assert "virtqueue_add_split" in splat.report and "end trace" in splat.report
    assert "512-byte logical blocks" not in splat.report  # after the end line


def test_user_written_lookalikes_and_quotes_are_not_splats() -> None:
    text = ("12,2001,1,-;WARNING: CPU: 0 PID: 1 at fake.c:1 written to /dev/kmsg by a user\n"
            "14,2002,2,-;BUG: KASAN: only text\n"
            "6,2003,3,-;audit: comm=\"sh\" msg='WARNING: CPU: 1 PID: 2 at x'\n"
            "6,2004,4,-;PCI: Using host bridge windows from ACPI; if necessary, report a bug\n")
    assert find_splats(_records(text)) == []


@pytest.mark.parametrize(("line", "kind"), [
    ("4,1,1,-;WARNING: possible circular locking dependency detected", "lockdep"),
    ("3,1,1,-;BUG: KASAN: slab-out-of-bounds in foo+0x1/0x2", "kasan"),
    ("3,1,1,-;BUG: KFENCE: use-after-free read in bar", "kfence"),
    ("0,1,1,-;watchdog: BUG: soft lockup - CPU#0 stuck for 22s! [sh:1]", "soft lockup"),
    ("1,1,1,-;BUG: kernel NULL pointer dereference, address: 0000000000000000", "bug"),
    ("4,1,1,-;kernel BUG at mm/slub.c:1!", "kernel BUG"),
    ("4,1,1,-;Oops: 0000 [#1] PREEMPT SMP NOPTI", "oops"),
    ("4,1,1,-;general protection fault, probably for non-canonical address", "oops"),
    ("3,1,1,-;UBSAN: shift-out-of-bounds in lib/x.c:3:4", "ubsan"),
    ("0,1,1,-;NMI watchdog: Watchdog detected hard LOCKUP on cpu 1", "hard lockup"),
    ("3,1,1,-;INFO: task touch:123 blocked for more than 1 seconds.", "hung task"),
    ("3,1,1,-;INFO: task kworker/0:1 my job:77 blocked for more than 120 seconds.", "hung task"),
    ("4,1,1,-;invalid opcode: 0000 [#1] PREEMPT SMP NOPTI", "oops"),
    ("4,1,1,-;divide error: 0000 [#1] PREEMPT SMP NOPTI", "oops"),
    ("3,1,1,-;BUG kmalloc-64 (Not tainted): Redzone overwritten", "slab corruption"),
    ("4,1,1,-;WARNING: possible irq lock inversion dependency detected", "lockdep"),
    ("4,1,1,-;WARNING: HARDIRQ-safe -> HARDIRQ-unsafe lock order detected", "lockdep"),
    ("4,1,1,-;WARNING: sh/42 still has locks held!", "lockdep"),
    ("3,1,1,-;rcu: INFO: rcu_preempt self-detected stall on CPU", "rcu stall"),
    ("4,1,1,-;list_add corruption. prev->next should be next", "list corruption"),
    ("3,1,1,-;virtio_blk virtio1: virtqueue_get_buf_ctx_split:id 7 is not a head!",
     "virtio ring"),
])
def test_each_kind_is_recognised(line: str, kind: str) -> None:
    [splat] = find_splats(_records(line + "\n"))
    assert splat.kind == kind


def test_a_warn_block_is_one_splat_named_by_its_message() -> None:
    """CHECK_DATA_CORRUPTION: __warn_printk prints cut-here and the message, then the
    WARNING line: one splat, of the message's kind, whose report holds both."""
    text = ("4,1,1,-;------------[ cut here ]------------\n"
            "4,2,2,-;list_add corruption. prev->next should be next (ffff), but was 0\n"
            "4,3,3,-;WARNING: CPU: 0 PID: 9 at lib/list_debug.c:30 __list_add_valid+0x1\n"
            "4,4,4,-;Call Trace:\n4,5,5,-;---[ end trace 0000000000000000 ]---\n"
            "6,6,6,-;after\n")
    [splat] = find_splats(_records(text))
    assert (splat.kind, splat.seq) == ("list corruption", 2)
    assert splat.report.splitlines()[0].endswith("[ cut here ]------------")
    assert "WARNING: CPU: 0 PID: 9" in splat.report and "after" not in splat.report
    assert splat.matches(re.compile("list_add corruption"))


def test_a_warn_message_is_in_its_report() -> None:
    text = ("4,1,1,-;------------[ cut here ]------------\n4,2,2,-;my driver: bad state 3\n"
            "4,3,3,-;WARNING: CPU: 0 PID: 9 at drivers/x.c:1 f+0x1\n"
            "4,4,4,-;---[ end trace 0 ]---\n")
    [splat] = find_splats(_records(text))
    assert splat.kind == "warning" and splat.matches(re.compile("bad state 3"))


def test_a_report_stops_at_the_next_splat_or_the_cap() -> None:
    two = "".join(f"4,{i},{i},-;WARNING: CPU: 0 PID: 1 at a.c:{i} f\n" for i in (1, 2))
    assert [s.seq for s in find_splats(_records(two))] == [1, 2]
    long = "4,1,1,-;WARNING: CPU: 0 PID: 1 at a.c:1 f\n" + "".join(
        f"4,{i},{i},-; frame{i}\n" for i in range(2, 200))
    [splat] = find_splats(_records(long))
    assert len(splat.report.splitlines()) == MAX_LINES + 1


def test_allowed_patterns_search_the_whole_report() -> None:
    [splat] = find_splats(_records(WARN))
    assert splat.matches(re.compile(r"virtio_ring\.c"))
    assert splat.matches(re.compile(r"virtqueue_add_split"))
    assert not splat.matches(re.compile(r"ext4"))


def test_records_parse_and_garbage_is_skipped() -> None:
    records = parse_records("6,7,1500000,-;hello; with ; semicolons\nnot a record\n"
                            "30,8,1,c;systemd[1]: x\n")
    assert [(r.seq, r.facility, r.level, r.text) for r in records] == [
        (7, 0, 6, "hello; with ; semicolons"), (8, 3, 6, "systemd[1]: x")]
    assert records[0].line() == "[    1.500000] hello; with ; semicolons"


def test_the_guest_side_filter_keeps_new_records_and_drops_continuations(tmp_path: Path) -> None:
    """The shell line itself, run by the host's dash, GNU dd and awk on a file shaped like
    /dev/kmsg's output (continuation lines included)."""
    log = tmp_path / "kmsg"
    log.write_text("6,1,1,-;old\n SUBSYSTEM=pci\n DEVICE=+pci:0000:00:01.0\n"
                   "6,2,2,-;also old\n4,3,3,-;new one\n DRIVER=virtio\n6,10,10,-;newer\n")
    out = subprocess.run(["sh", "-c", new_records_shell(2, str(log))], capture_output=True,
                         text=True, check=True).stdout
    assert [r.seq for r in parse_records(out)] == [3, 10]
    assert out.splitlines() == ["4,3,3,-;new one", "6,10,10,-;newer"]
    everything = subprocess.run(["sh", "-c", new_records_shell(-1, str(log))],
                                capture_output=True, text=True, check=True).stdout
    assert [r.seq for r in parse_records(everything)] == [1, 2, 3, 10]


def test_a_bad_cursor_is_refused() -> None:
    with pytest.raises(ValueError, match="after_seq"):
        new_records_shell(-5)


class _ScriptedShell:
    """Answers each look with the next scripted stdout (a boot id line, then records)."""

    def __init__(self, *answers: str) -> None:
        self.answers = list(answers)
        self.commands: list[str] = []

    def run(self, cmd: str, timeout: float | None = None, via: str = "console") -> Result:
        self.commands.append(cmd)
        return Result(cmd, 0, self.answers.pop(0).encode())

    def check(self, cmd: str, timeout: float | None = None, via: str = "console") -> Result:
        return self.run(cmd, timeout, via)

    def console_tail(self, lines: int = 40) -> str:
        return ""


def test_the_cursor_moves_restarts_after_a_reboot_and_logs_gaps(
        caplog: pytest.LogCaptureFixture) -> None:
    shell = _ScriptedShell("b1\n6,1,1,-;a\n6,2,2,-;b\n", "b1\n6,9,9,-;c\n",
                           "b2\n6,3,3,-;x\n", "b2\n6,0,0,-;boot\n6,1,1,-;again\n")
    log = KernelLog(shell)
    assert [r.seq for r in log.new_records()] == [1, 2] and "-v s=-1" in shell.commands[0]
    assert [r.seq for r in log.new_records()] == [9] and "-v s=2" in shell.commands[1]
    assert "6 record(s) lost before seq 9" in caplog.text
    # A new boot id: the old cursor would hide the new kernel's records; read from its start.
    assert [r.seq for r in log.new_records()] == [0, 1] and "-v s=-1" in shell.commands[3]
    assert log.seq == 1 and log.boot_id == "b2"


def test_an_unreadable_log_is_an_error_after_one_retry() -> None:
    shell = _ScriptedShell("b1\n", "b1\n")
    with pytest.raises(GuestError, match="cannot read the guest kernel's log"):
        KernelLog(shell).new_records()
    assert len(shell.commands) == 2
    flood = _ScriptedShell("b1\n", "b1\n6,5,5,-;after the overrun\n")
    assert [r.seq for r in KernelLog(flood).new_records()] == [5]
