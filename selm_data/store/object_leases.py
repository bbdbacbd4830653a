"""Leases on an object store: put-if-absent objects with a heartbeat and an expiry.

Object stores have no `flock`, and a lease cannot be "freed when its holder dies": nobody is
told. So a lease is a sequence of small JSON objects, one per holder (a generation):

    <store>/_leases/<work>/0000000007.json   {"work", "run_id", "pid", "host", "since",
                                              "heartbeat", "ttl_s", "state": held|released}

- The holder is the highest generation. Claiming writes generation n+1 with put-if-absent
  (S3 ``If-None-Match: *``): of two claimants of the same generation exactly one succeeds.
- A claim is allowed only if generation n is released, or expired: its object was last written
  more than its ``ttl_s`` ago. Both times come from the server (the object's Last-Modified and
  the response's Date), so clocks on different hosts never matter.
- The holder rewrites its own object every ttl/3 (the heartbeat). A live holder therefore never
  expires; a killed one expires ttl after its last heartbeat and the next claimant takes over,
  with `taken_over` naming it (its work may be half written; the store's idempotent appends
  make redoing it safe).
- After winning, a claimant lists again: if a higher generation appeared (a racer that had
  read an older listing), the lower one lost and withdraws. Older generations are then deleted,
  so a prefix holds one or two objects however often the work is claimed.
- A holder whose heartbeat could not be written for a whole ttl, or that finds a higher
  generation, has lost the lease: `lost` turns true and the Store refuses its next append.

Only S3 (and S3-compatible servers with conditional writes) is implemented, through boto3,
which reads credentials the AWS way (environment, profile, instance role).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, replace
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlsplit

from selm_data.errors import LeaseHeldError, StoreError
from selm_data.store.leases import Holder, lease_name
from selm_data.store.location import Location, scrub

DEFAULT_TTL_S = 60.0  # a builder's heartbeat every 20 s; a dead one is taken over after a minute
TABLE_LOCK_TTL_S = 30.0  # per-table append lock: held for one commit, heartbeat keeps it longer
TABLE_LOCK_WAIT_S = 600.0


def lease_ttl() -> float:
    """The work-lease expiry: SELM_LEASE_TTL_S, else DEFAULT_TTL_S (tests use a few seconds)."""
    value = os.environ.get("SELM_LEASE_TTL_S")
    try:
        return float(value) if value else DEFAULT_TTL_S
    except ValueError:
        raise StoreError(f"SELM_LEASE_TTL_S={value!r}: give a number of seconds") from None


class _S3:
    """The five calls a lease needs, on one bucket and prefix."""

    def __init__(self, location: Location):
        if location.scheme != "s3":
            raise StoreError(
                f"{location.uri}: writing needs leases (one per append, and one per shard), and "
                "selm implements them on S3 only so far, not yet on GCS or Azure. Reading "
                "works; to write, use an s3:// store (or an S3-compatible endpoint) or a "
                "local folder.")
        try:
            import boto3
            from botocore.config import Config
        except ImportError as e:
            raise StoreError(
                "leases on an s3:// store need boto3: `pip install 'selm[s3]'`") from e
        parts = urlsplit(location.uri)
        self.bucket = parts.netloc
        self.prefix = "/".join(p for p in (parts.path.strip("/"), "_leases") if p)
        # Short timeouts and few retries: a lease call must fail fast, not hang a heartbeat.
        config = Config(connect_timeout=5, read_timeout=10, retries={"max_attempts": 2})
        self.client = boto3.client("s3", config=config)
        from botocore.exceptions import BotoCoreError, ClientError
        self._errors: tuple[type[Exception], ...] = (BotoCoreError, ClientError)

    def key(self, work: str, generation: int) -> str:
        return f"{self.prefix}/{lease_name(work)}/{generation:010d}.json"

    def generations(self, work: str) -> tuple[list[int], datetime]:
        """The generations present, ascending, and the server's time."""
        folder = f"{self.prefix}/{lease_name(work)}/"
        out = self._call("list", self.client.list_objects_v2, Bucket=self.bucket, Prefix=folder)
        gens = sorted(int(o["Key"].rsplit("/", 1)[1].split(".")[0])
                      for o in out.get("Contents", []) if o["Key"].endswith(".json"))
        return gens, _server_time(out)

    def read(self, work: str, generation: int) -> tuple[Holder | None, datetime] | None:
        """The record and its Last-Modified time, or None if it is gone."""
        try:
            out = self.client.get_object(Bucket=self.bucket, Key=self.key(work, generation))
        except self._errors as e:
            if _code(e) in {"NoSuchKey", "404"}:
                return None
            raise _failure("read", e) from None
        try:
            record = json.loads(out["Body"].read())
            holder = Holder(**{k: v for k, v in record.items() if k in Holder.fields()})
        except (ValueError, TypeError):
            holder = None
        return holder, out["LastModified"]

    def create(self, work: str, generation: int, holder: Holder) -> bool:
        """Put-if-absent; False if the generation exists already."""
        try:
            self.client.put_object(Bucket=self.bucket, Key=self.key(work, generation),
                                   Body=_body(holder), IfNoneMatch="*")
        except self._errors as e:
            if _code(e) in {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"}:
                return False
            raise _failure("create", e) from None
        return True

    def write(self, work: str, generation: int, holder: Holder) -> None:
        self._call("write", self.client.put_object, Bucket=self.bucket,
                   Key=self.key(work, generation), Body=_body(holder))

    def delete(self, work: str, generations: list[int]) -> None:
        for g in generations:
            self._call("delete", self.client.delete_object, Bucket=self.bucket,
                       Key=self.key(work, g))

    def works(self) -> list[str]:
        """The lease folders under the prefix."""
        out = self._call("list", self.client.list_objects_v2, Bucket=self.bucket,
                         Prefix=f"{self.prefix}/", Delimiter="/")
        return [p["Prefix"].rstrip("/").rsplit("/", 1)[1] for p in out.get("CommonPrefixes", [])]

    def _call(self, what: str, fn: Any, **kwargs: Any) -> Any:
        try:
            return fn(**kwargs)
        except self._errors as e:
            raise _failure(what, e) from None


def _code(e: Exception) -> str:
    response = getattr(e, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


def _failure(what: str, e: Exception) -> StoreError:
    return StoreError(f"lease {what} on the object store failed: {scrub(str(e))}. Check that "
                      "the store is reachable, then run the command again.")


def _server_time(response: dict[str, Any]) -> datetime:
    date = response.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
    return parsedate_to_datetime(date) if date else datetime.now(UTC)


def _body(holder: Holder) -> bytes:
    return json.dumps(asdict(holder), sort_keys=True).encode("utf-8")


def _expired(holder: Holder | None, modified: datetime, now: datetime) -> bool:
    ttl = holder.ttl_s if holder is not None and holder.ttl_s > 0 else DEFAULT_TTL_S
    return (now - modified).total_seconds() > ttl


class ObjectLease:
    """A claim held on the object store; the same surface as `leases.Lease`."""

    def __init__(self, s3: _S3, generation: int, holder: Holder, taken_over: Holder | None):
        self.path = s3.key(holder.work, generation)
        self.holder = holder
        self.taken_over = taken_over
        self._s3 = s3
        self._generation = generation
        self._stop = threading.Event()
        self._lost = False
        self._thread = threading.Thread(target=self._beat, name=f"lease {holder.work}",
                                        daemon=True)
        self._thread.start()

    @property
    def held(self) -> bool:
        return not self._stop.is_set() and not self._lost

    @property
    def lost(self) -> bool:
        """True once another process may have taken this work over (see the module doc)."""
        return self._lost

    def _still_ours(self) -> bool:
        generations, _ = self._s3.generations(self.holder.work)
        return bool(generations) and generations[-1] == self._generation

    def _beat(self) -> None:
        interval = self.holder.ttl_s / 3
        last_ok = time.monotonic()
        while not self._stop.wait(interval):
            try:
                if not self._still_ours():
                    self._lost = True
                    return
                self._s3.write(self.holder.work, self._generation, replace(
                    self.holder, heartbeat=datetime.now(UTC).isoformat(timespec="seconds")))
                last_ok = time.monotonic()
            except StoreError:
                if time.monotonic() - last_ok > self.holder.ttl_s:
                    self._lost = True  # others may have taken over by now
                    return

    def release(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join()
        if self._lost:
            return
        try:
            if self._still_ours():
                self._s3.write(self.holder.work, self._generation,
                               replace(self.holder, state="released"))
        except StoreError:
            pass  # it expires by itself; the next claimant waits one ttl at most

    def __enter__(self) -> ObjectLease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def claim(location: Location, work: str, *, run_id: str, command: str,
          ttl_s: float | None = None) -> ObjectLease:
    """Take the lease on `work`, or raise LeaseHeldError naming the live holder. Never waits."""
    s3 = _S3(location)
    ttl = lease_ttl() if ttl_s is None else ttl_s
    for _ in range(20):  # each retry follows another claimant's success: few are needed
        generations, now = s3.generations(work)
        previous: Holder | None = None
        if generations:
            found = s3.read(work, generations[-1])
            if found is None:
                continue  # deleted between list and read: look again
            current, modified = found
            if (current is None or current.state == "held") and not _expired(
                    current, modified, now):
                who = current.describe() if current else "another process (unreadable record)"
                raise LeaseHeldError(
                    f"work {work!r} is already being done by {who}. Let it finish, or stop "
                    f"that process: its lease expires {ttl_fmt(current)} after its last "
                    "heartbeat, and the work can then be taken over.")
            previous = current if current is not None and current.state == "held" else None
        generation = (generations[-1] if generations else 0) + 1
        holder = _holder(work, run_id, command, ttl)
        if not s3.create(work, generation, holder):
            continue  # another claimant won this generation: look again
        after, _ = s3.generations(work)
        if after[-1] != generation:  # a racer that read an older listing went higher
            s3.delete(work, [generation])
            continue
        s3.delete(work, [g for g in after if g < generation])
        return ObjectLease(s3, generation, holder, previous)
    raise StoreError(f"could not claim {work!r}: the lease changed hands 20 times while "
                     "trying; run the command again")


def ttl_fmt(holder: Holder | None) -> str:
    ttl = holder.ttl_s if holder is not None and holder.ttl_s > 0 else DEFAULT_TTL_S
    return f"{ttl:g} s"


def _holder(work: str, run_id: str, command: str, ttl: float) -> Holder:
    now = datetime.now(UTC).isoformat(timespec="seconds")
    return Holder(work=work, run_id=run_id, command=command, pid=os.getpid(),
                  host=socket.gethostname(), since=now, heartbeat=now, ttl_s=ttl)


@contextmanager
def exclusive(location: Location, name: str, *, run_id: str, command: str) -> Iterator[None]:
    """Hold the lease `name` for a short critical section, waiting while another holds it."""
    deadline = time.monotonic() + TABLE_LOCK_WAIT_S
    pause = 0.02
    while True:
        try:
            # never longer than a work lease: a lock whose release failed (an outage) frees
            # itself no later than the work it guards would
            lease = claim(location, name, run_id=run_id, command=command,
                          ttl_s=min(TABLE_LOCK_TTL_S, lease_ttl()))
            break
        except LeaseHeldError as e:
            if time.monotonic() > deadline:
                raise StoreError(f"waited {TABLE_LOCK_WAIT_S:g} s for {name}: {e}") from None
            time.sleep(pause)
            pause = min(pause * 2, 0.5)
    with lease:
        yield


def list_leases(location: Location) -> list[tuple[Holder, str]]:
    """Every lease's latest record with its state: held, released, or stale (expired)."""
    s3 = _S3(location)
    out = []
    for folder in s3.works():
        listing = s3._call("list", s3.client.list_objects_v2, Bucket=s3.bucket,
                           Prefix=f"{s3.prefix}/{folder}/")
        keys = sorted(o["Key"] for o in listing.get("Contents", []))
        if not keys:
            continue
        got = s3._call("get", s3.client.get_object, Bucket=s3.bucket, Key=keys[-1])
        try:
            record = json.loads(got["Body"].read())
            holder = Holder(**{k: v for k, v in record.items() if k in Holder.fields()})
        except (ValueError, TypeError):
            continue
        state = holder.state
        if state == "held" and _expired(holder, got["LastModified"], _server_time(listing)):
            state = "stale"
        out.append((holder, state))
    return out


__all__ = ["DEFAULT_TTL_S", "ObjectLease", "claim", "exclusive", "lease_ttl", "list_leases"]
