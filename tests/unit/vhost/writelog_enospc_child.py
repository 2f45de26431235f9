"""Child for test_write_log: a write log under RLIMIT_FSIZE, driven until its spill is full.

    writelog_enospc_child.py LOG_DIR LIMIT_BYTES  -> one JSON object on stdout

The limit is set here, so only this process is limited, after the rig's
guest RAM (a memfd, limited too) and before the log reserves any room; Python
ignores SIGXFSZ, so growing a file past the limit is EFBIG.
"""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

from logged_rig import LoggedRig

from pytest_virtio.errors import BackendError
from pytest_virtio.vhost_user.crashstates import crash_states
from pytest_virtio.vhost_user.protocol import BlkStatus, BlkType


def _message(call: object) -> str:
    try:
        call()  # type: ignore[operator]
    except BackendError as exc:
        return str(exc)
    return "no error"


def main() -> None:
    log_dir, limit = Path(sys.argv[1]), int(sys.argv[2])
    rig = LoggedRig(log_dir)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    ok = 0
    status = BlkStatus.OK
    while status == BlkStatus.OK and ok < 10_000:
        sector = ok * 8
        status = rig.write(sector, bytes([ok % 255 + 1]) * 4096)
        ok += status == BlkStatus.OK
    failed_at = ok * 8 * 512
    untouched = bytes(rig.storage.data[failed_at : failed_at + 4096]) == bytes(4096)
    later = {"write": rig.write(0, b"z" * 512), "flush": rig.flush(),
             "discard": rig.discard(0, 8), "read": rig.do(BlkType.IN, 0, 512)}
    rig.log.close()
    print(json.dumps({
        "ok_writes": ok, "failed_status": status, "medium_untouched": untouched,
        "later": later, "broken": rig.log.broken, "check": _message(rig.log.check),
        "crash_states": _message(lambda: crash_states(rig.log.recorded())),
    }))


if __name__ == "__main__":
    main()
