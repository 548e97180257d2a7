"""One process per stage folder: an OS-level lock that a killed holder cannot leave stale.

`StageLock(stage_dir).acquire()` takes an exclusive `fcntl.flock` on `stage_dir/.lock` without
waiting. The kernel drops the lock when the holding process ends in any way (exit, exception,
SIGKILL, node reboot on a local disk), so there is no stale lock to clean up and a requeued Slurm
job gets it as soon as the old one is gone. Forked children (DataLoader workers) close their copy
of the lock's file descriptor at once, so that a holder killed before its workers does not leave
the lock held by them. The holder writes who it is (host, pid, Slurm job id,
start time) into the lock file, so that a refused second process can name it. On NFS v4 and Lustre
(mounted with `flock`), `flock` is a cluster-wide lock as well.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import IO


_HELD: list[IO[str]] = []
"""Lock files held by this process; a forked child closes its copies (see `_forget_in_child`)."""


def _forget_in_child() -> None:
    """In a forked child: close the inherited lock descriptors. A flock belongs to the open file,
    shared with the parent until every copy is closed; closing (not LOCK_UN, which would release
    the parent's lock) leaves the parent the only holder."""
    for handle in _HELD:
        handle.close()
    _HELD.clear()


os.register_at_fork(after_in_child=_forget_in_child)


class StageBusyError(RuntimeError):
    """Another process holds the stage folder; the message names the folder and the holder."""


class StageLock:
    """The exclusive lock of one stage folder, held from `acquire` until `release` or process end."""

    def __init__(self, stage_dir: Path) -> None:
        self.dir = stage_dir
        self.path = stage_dir / ".lock"
        self._handle: IO[str] | None = None

    def acquire(self) -> None:
        """Take the lock at once, or raise StageBusyError naming the holder. Creates the folder;
        an unwritable folder raises OSError (with the path) from `mkdir` or `open`."""
        self.dir.mkdir(parents=True, exist_ok=True)
        handle = self.path.open("a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip()
            handle.close()
            raise StageBusyError(f"{self.dir}: in use by another run ({describe_holder(holder)}); wait for it "
                                 f"to end or choose another run.name") from None
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps(holder_record()) + "\n")
        handle.flush()
        self._handle = handle
        _HELD.append(handle)

    def release(self) -> None:
        if self._handle is not None:
            _HELD.remove(self._handle)
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None


def holder_record() -> dict[str, str | int | None]:
    """Who holds a lock: host, pid, Slurm job id (None outside Slurm), start time (UTC)."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def describe_holder(text: str) -> str:
    """The lock file's holder record as words, e.g. 'host n1, pid 42, Slurm job 7, since ...'."""
    try:
        record = json.loads(text)
    except json.JSONDecodeError:
        return "holder unknown"
    job = f", Slurm job {record['slurm_job_id']}" if record.get("slurm_job_id") else ""
    return f"host {record.get('host')}, pid {record.get('pid')}{job}, since {record.get('since')}"
