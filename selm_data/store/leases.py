"""Leases: which process builds which piece of work.

Several processes (one per GPU, or per node) build one iteration by claiming disjoint work
units, e.g. ``build/iter=2/shard=3-of-8``. A lease is an exclusive `flock` on a file under
``<store>/_leases/``. The kernel drops the lock when its holder exits, however it dies, so a
lease left by a killed process is free again at once and the next claimant takes it over; the
file keeps the last holder's record so the error and the take-over can name it.

Lease files are never deleted: unlinking a locked file would let two processes lock two
different files under one name.

Needs a filesystem with working `flock` (local disks, NFSv4, most cluster filesystems with
locking enabled). Object stores have none: a store at an s3:// URI uses `object_leases`
(put-if-absent objects with a heartbeat and an expiry) behind the same Store.claim.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from pathlib import Path

from selm_data.errors import LeaseHeldError

_SAFE = re.compile(r"[^A-Za-z0-9._=-]+")


@dataclass(frozen=True)
class Holder:
    work: str
    run_id: str
    command: str
    pid: int
    host: str
    since: str  # ISO time the lease was taken
    state: str = "held"  # "held" while the lock is taken, "released" after a clean release
    heartbeat: str = ""  # object-store leases: ISO time of the last heartbeat
    ttl_s: float = 0.0  # object-store leases: expiry after the last heartbeat (0: flock)

    @classmethod
    def fields(cls) -> set[str]:
        """Field names: a record written by another selm version may carry more or fewer."""
        return {f.name for f in fields(cls)}

    def describe(self) -> str:
        return (
            f"run {self.run_id} (pid {self.pid} on {self.host}, since {self.since}, "
            f"command: {self.command})"
        )


def lease_name(work: str) -> str:
    """A name that is safe on every filesystem and distinct for distinct work names."""
    digest = hashlib.sha256(work.encode("utf-8")).hexdigest()[:12]
    return f"{_SAFE.sub('_', work)[:80]}-{digest}"


def lease_path(directory: Path, work: str) -> Path:
    return directory / f"{lease_name(work)}.lease"


def read_holder(path: Path) -> Holder | None:
    try:
        record = json.loads(path.read_text(encoding="utf-8") or "null")
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(record, dict):
        return None
    try:
        return Holder(**{k: v for k, v in record.items() if k in Holder.fields()})
    except TypeError:
        return None


class Lease:
    """An exclusive claim on one work unit; release it, or use it as a context manager."""

    def __init__(self, path: Path, fd: int, holder: Holder, taken_over: Holder | None):
        self.path = path
        self.holder = holder
        # The record of a holder that died without releasing: its work may be half written.
        self.taken_over = taken_over
        self._fd: int | None = fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is None:
            return
        _write_record(self._fd, Holder(**{**asdict(self.holder), "state": "released"}))
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _write_record(fd: int, holder: Holder) -> None:
    # Write, then cut to length: a reader never sees an empty file (records are similar sizes).
    data = json.dumps(asdict(holder), sort_keys=True).encode("utf-8")
    os.pwrite(fd, data, 0)
    os.ftruncate(fd, len(data))
    os.fsync(fd)


@contextmanager
def exclusive(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on `path` for a short critical section, waiting for it if needed.

    The store takes one per table around "check which ids exist, then commit", so two
    processes appending overlapping rows cannot both write them.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def claim(directory: Path, work: str, *, run_id: str, command: str) -> Lease:
    """Take the lease on `work`, or raise LeaseHeldError naming the live holder.

    Fails fast: a held lease is never waited for.
    """
    directory.mkdir(parents=True, exist_ok=True)
    path = lease_path(directory, work)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        current = read_holder(path)
        who = current.describe() if current else "another process (its record is unreadable)"
        raise LeaseHeldError(
            f"work {work!r} is already being done by {who}. Let it finish, or stop that "
            "process: the lease frees itself when its holder exits, even if killed."
        ) from None
    previous = read_holder(path)
    holder = Holder(
        work=work,
        run_id=run_id,
        command=command,
        pid=os.getpid(),
        host=socket.gethostname(),
        since=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    _write_record(fd, holder)
    taken_over = previous if previous is not None and previous.state == "held" else None
    return Lease(path, fd, holder, taken_over)


def list_leases(directory: Path) -> list[tuple[Holder, str]]:
    """Every lease record with its state: held, released, or stale (holder gone).

    Only reads: taking even a shared lock here could make a concurrent claim fail.
    Liveness is known for holders on this host; others are reported as held.
    """
    out: list[tuple[Holder, str]] = []
    if not directory.is_dir():
        return out
    host = socket.gethostname()
    for path in sorted(directory.glob("*.lease")):
        holder = read_holder(path)
        if holder is None:
            continue
        state = holder.state
        if state == "held" and holder.host == host and not _pid_alive(holder.pid):
            state = "stale"
        out.append((holder, state))
    return out


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
