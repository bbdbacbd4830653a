"""Leases on an object store: put-if-absent objects with a heartbeat and an expiry.

Object stores have no `flock`, and a lease cannot be "freed when its holder dies": nobody is
told. So a lease is a sequence of small JSON objects, one per holder (a generation):

    <store>/_leases/<work>/0000000007.json   {"work", "run_id", "pid", "host", "since",
                                              "heartbeat", "ttl_s", "state": held|released}

- The holder is the highest generation. Claiming writes generation n+1 with put-if-absent
  (S3 and Azure ``If-None-Match: *``, GCS ``ifGenerationMatch=0``): of two claimants of the
  same generation exactly one succeeds.
- A claim is allowed only if generation n is released, or expired: its object was last written
  more than its ``ttl_s`` ago. Both times come from the server (the object's Last-Modified, and
  the response's Date on S3 or a measured offset of the server's clock on GCS and Azure, see
  `_Obstore`), so clocks on different hosts never matter.
- The holder rewrites its own object every ttl/3 (the heartbeat). A live holder therefore never
  expires; a killed one expires ttl after its last heartbeat and the next claimant takes over,
  with `taken_over` naming it (its work may be half written; the store's idempotent appends
  make redoing it safe).
- After winning, a claimant lists again: if a higher generation appeared (a racer that had
  read an older listing), the lower one lost and withdraws. Older generations are then deleted,
  so a prefix holds one or two objects however often the work is claimed.
- A holder whose heartbeat could not be written for a whole ttl, or that finds a higher
  generation, has lost the lease: `lost` turns true and the Store refuses its next append.

One protocol, two clients behind `_Objects`: boto3 on S3 (and S3-compatible servers with
conditional writes), which reads credentials the AWS way (environment, profile, SSO, instance
role); obstore on GCS and Azure, which reads them as delta-rs does (`selm_data.store.cloud`).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, replace
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, Protocol, TypeVar
from urllib.parse import urlsplit

from selm_data.errors import LeaseHeldError, StoreError
from selm_data.store import cloud
from selm_data.store.leases import Holder, lease_name
from selm_data.store.location import Location, scrub

DEFAULT_TTL_S = 60.0  # a builder's heartbeat every 20 s; a dead one is taken over after a minute
TABLE_LOCK_TTL_S = 30.0  # per-table append lock: held for one commit, heartbeat keeps it longer
TABLE_LOCK_WAIT_S = 600.0
T = TypeVar("T")


def lease_ttl() -> float:
    """The work-lease expiry: SELM_LEASE_TTL_S, else DEFAULT_TTL_S (tests use a few seconds)."""
    value = os.environ.get("SELM_LEASE_TTL_S")
    try:
        return float(value) if value else DEFAULT_TTL_S
    except ValueError:
        raise StoreError(f"SELM_LEASE_TTL_S={value!r}: give a number of seconds") from None


class _Objects(Protocol):
    """The calls a lease needs, on the objects of one folder per work under `<store>/_leases/`.
    Each call is one request (a delete, one per generation). Times are the server's."""

    def key(self, folder: str, generation: int) -> str: ...

    def generations(self, folder: str) -> tuple[list[int], datetime]:
        """The generations present, ascending, and the server's time now."""
        ...

    def read(self, folder: str, generation: int) -> tuple[Holder | None, datetime] | None:
        """The record and its Last-Modified time, or None if it is gone."""
        ...

    def create(self, folder: str, generation: int, holder: Holder) -> bool:
        """Put-if-absent; False if the generation exists already."""
        ...

    def write(self, folder: str, generation: int, holder: Holder) -> None: ...

    def delete(self, folder: str, generations: list[int]) -> None: ...

    def folders(self) -> list[str]:
        """The lease folders (one per work) under the prefix."""
        ...


def _objects(location: Location) -> _Objects:
    """S3 through boto3; GCS and Azure through obstore (why two: `selm_data.store.cloud`)."""
    if location.scheme == "s3":
        return _S3(location)
    if location.scheme in cloud.OBSTORE_SCHEMES:
        return _Obstore(location)
    raise StoreError(f"{location.uri}: no object leases for {location.scheme}://")


def _generation(key: str) -> int | None:
    name = key.rsplit("/", 1)[-1]
    stem, _, ext = name.partition(".")
    return int(stem) if ext == "json" and stem.isdigit() else None


class _S3:
    """S3 (and S3-compatible servers with conditional writes) through boto3, which reads
    credentials the AWS way (environment, profile, SSO, instance role). Put-if-absent is
    ``If-None-Match: *``; the server's time is each response's Date header."""

    def __init__(self, location: Location):
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

    def key(self, folder: str, generation: int) -> str:
        return f"{self.prefix}/{folder}/{generation:010d}.json"

    def generations(self, folder: str) -> tuple[list[int], datetime]:
        out = self._call("list", self.client.list_objects_v2, Bucket=self.bucket,
                         Prefix=f"{self.prefix}/{folder}/")
        found = (_generation(o["Key"]) for o in out.get("Contents", []))
        return sorted(g for g in found if g is not None), _server_time(out)

    def read(self, folder: str, generation: int) -> tuple[Holder | None, datetime] | None:
        try:
            out = self.client.get_object(Bucket=self.bucket, Key=self.key(folder, generation))
        except self._errors as e:
            if _code(e) in {"NoSuchKey", "404"}:
                return None
            raise _failure("read", e) from None
        return _record(out["Body"].read()), out["LastModified"]

    def create(self, folder: str, generation: int, holder: Holder) -> bool:
        try:
            self.client.put_object(Bucket=self.bucket, Key=self.key(folder, generation),
                                   Body=_body(holder), IfNoneMatch="*")
        except self._errors as e:
            if _code(e) in {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"}:
                return False
            raise _failure("create", e) from None
        return True

    def write(self, folder: str, generation: int, holder: Holder) -> None:
        self._call("write", self.client.put_object, Bucket=self.bucket,
                   Key=self.key(folder, generation), Body=_body(holder))

    def delete(self, folder: str, generations: list[int]) -> None:
        for g in generations:
            self._call("delete", self.client.delete_object, Bucket=self.bucket,
                       Key=self.key(folder, g))

    def folders(self) -> list[str]:
        out = self._call("list", self.client.list_objects_v2, Bucket=self.bucket,
                         Prefix=f"{self.prefix}/", Delimiter="/")
        return [p["Prefix"].rstrip("/").rsplit("/", 1)[1] for p in out.get("CommonPrefixes", [])]

    def _call(self, what: str, fn: Any, **kwargs: Any) -> Any:
        try:
            return fn(**kwargs)
        except self._errors as e:
            raise _failure(what, e) from None


CLOCK_REFRESH_S = 300.0  # how long a measured server-clock offset is trusted
_clock_offsets: dict[str, tuple[float, float]] = {}  # store URI -> (offset s, measured at)


class _Obstore:
    """GCS and Azure Blob through obstore, which reads the same settings as delta-rs.
    Put-if-absent is object_store's ``PutMode.Create``: ``x-goog-if-generation-match: 0`` on
    GCS, ``If-None-Match: *`` on Azure.

    obstore returns no response headers, so there is no Date to read the server's time from.
    Instead the offset of the server's clock from ours is measured once per process and store
    (and every CLOCK_REFRESH_S): put a probe object, read its Last-Modified, take the time we
    sent it. "Now" on the server is then our clock plus that offset, good to the probe's
    round trip and Last-Modified's one second, as a Date header is."""

    def __init__(self, location: Location):
        self.location = location
        self.store = cloud.client(location.uri, purpose="leases")
        self.prefix = "/".join(p for p in (cloud.bucket_path(location.uri), "_leases") if p)

    def key(self, folder: str, generation: int) -> str:
        return f"{self.prefix}/{folder}/{generation:010d}.json"

    def generations(self, folder: str) -> tuple[list[int], datetime]:
        import obstore

        chunks = self._call("list", lambda: list(obstore.list(self.store, f"{self.prefix}/"
                                                                            f"{folder}/")))
        found = (_generation(meta["path"]) for chunk in chunks for meta in chunk)
        return sorted(g for g in found if g is not None), self._now()

    def read(self, folder: str, generation: int) -> tuple[Holder | None, datetime] | None:
        import obstore

        try:
            got = self._call("read", lambda: obstore.get(self.store, self.key(folder, generation)))
        except FileNotFoundError:
            return None
        return _record(bytes(got.bytes())), got.meta["last_modified"]

    def create(self, folder: str, generation: int, holder: Holder) -> bool:
        import obstore
        from obstore.exceptions import AlreadyExistsError, PreconditionError

        try:
            obstore.put(self.store, self.key(folder, generation), _body(holder), mode="create")
        except (AlreadyExistsError, PreconditionError):
            return False
        except Exception as e:  # obstore's errors and OSError subclasses
            raise _failure("create", e) from None
        return True

    def write(self, folder: str, generation: int, holder: Holder) -> None:
        import obstore

        self._call("write", lambda: obstore.put(self.store, self.key(folder, generation),
                                                _body(holder)))

    def delete(self, folder: str, generations: list[int]) -> None:
        import obstore

        for g in generations:
            key = self.key(folder, g)
            with suppress(FileNotFoundError):  # gone already: what a delete wants
                self._call("delete", lambda key=key: obstore.delete(self.store, key))  # type: ignore[misc]

    def folders(self) -> list[str]:
        import obstore

        out = self._call("list", lambda: obstore.list_with_delimiter(self.store,
                                                                     f"{self.prefix}/"))
        return [p.rstrip("/").rsplit("/", 1)[1] for p in out["common_prefixes"]]

    def _now(self) -> datetime:
        measured = _clock_offsets.get(self.location.uri)
        if measured is None or time.monotonic() - measured[1] > CLOCK_REFRESH_S:
            measured = (self._measure_offset(), time.monotonic())
            _clock_offsets[self.location.uri] = measured
        return datetime.fromtimestamp(time.time() + measured[0], UTC)

    def _measure_offset(self) -> float:
        import obstore

        probe = f"{self.prefix}/.clock/{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex}"
        sent = time.time()
        self._call("clock", lambda: obstore.put(self.store, probe, b""))
        back = time.time()
        meta = self._call("clock", lambda: obstore.head(self.store, probe))
        with suppress(Exception):  # a leftover probe is harmless: a few bytes, never read
            obstore.delete(self.store, probe)
        return float(meta["last_modified"].timestamp() - (sent + back) / 2)

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        from obstore.exceptions import NotFoundError

        try:
            return fn()
        except (FileNotFoundError, NotFoundError) as e:
            raise FileNotFoundError(what) from e
        except Exception as e:  # obstore's BaseError and its OSError subclasses
            raise _failure(what, e) from None


def _record(data: bytes) -> Holder | None:
    try:
        record = json.loads(data)
        return Holder(**{k: v for k, v in record.items() if k in Holder.fields()})
    except (ValueError, TypeError, AttributeError):
        return None


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

    def __init__(self, objects: _Objects, generation: int, holder: Holder,
                 taken_over: Holder | None):
        self.folder = lease_name(holder.work)
        self.path = objects.key(self.folder, generation)
        self.holder = holder
        self.taken_over = taken_over
        self._objects = objects
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
        generations, _ = self._objects.generations(self.folder)
        return bool(generations) and generations[-1] == self._generation

    def _beat(self) -> None:
        interval = self.holder.ttl_s / 3
        last_ok = time.monotonic()
        while not self._stop.wait(interval):
            try:
                if not self._still_ours():
                    self._lost = True
                    return
                self._objects.write(self.folder, self._generation, replace(
                    self.holder, heartbeat=datetime.now(UTC).isoformat(timespec="seconds")))
                last_ok = time.monotonic()
            except StoreError:
                if time.monotonic() - last_ok > self.holder.ttl_s:
                    self._lost = True  # others may have taken over by now
                    return

    def release(self) -> None:
        """Mark our generation released: one write, no check first. Had another claimant
        taken over meanwhile, the write only touches our own, older generation, which no
        claimant looks at (the holder is the highest) and the next claim deletes."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join()
        if self._lost:
            return
        with suppress(StoreError):  # else it expires: the next claimant waits one ttl at most
            self._objects.write(self.folder, self._generation,
                                replace(self.holder, state="released"))

    def __enter__(self) -> ObjectLease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def claim(location: Location, work: str, *, run_id: str, command: str,
          ttl_s: float | None = None) -> ObjectLease:
    """Take the lease on `work`, or raise LeaseHeldError naming the live holder. Never waits.

    Uncontended, a claim and its release cost five requests: list, read the last holder,
    create, list again, delete the older generation; and one write at release.
    """
    objects = _objects(location)
    folder = lease_name(work)
    ttl = lease_ttl() if ttl_s is None else ttl_s
    for _ in range(20):  # each retry follows another claimant's success: few are needed
        generations, now = objects.generations(folder)
        previous: Holder | None = None
        if generations:
            found = objects.read(folder, generations[-1])
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
        if not objects.create(folder, generation, holder):
            continue  # another claimant won this generation: look again
        after, _ = objects.generations(folder)
        if after[-1] != generation:  # a racer that read an older listing went higher
            objects.delete(folder, [generation])
            continue
        objects.delete(folder, [g for g in after if g < generation])
        return ObjectLease(objects, generation, holder, previous)
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
    objects = _objects(location)
    out = []
    for folder in objects.folders():
        generations, now = objects.generations(folder)
        found = objects.read(folder, generations[-1]) if generations else None
        if found is None:
            continue
        holder, modified = found
        if holder is None:
            continue
        state = holder.state
        if state == "held" and _expired(holder, modified, now):
            state = "stale"
        out.append((holder, state))
    return out


__all__ = ["DEFAULT_TTL_S", "ObjectLease", "claim", "exclusive", "lease_ttl", "list_leases"]
