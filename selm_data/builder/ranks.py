"""Ranks are shards: a build under a launcher, one shard per rank, meeting only in the store.

Rank r of k builds shard r/k (`Shard.take`: every k-th prompt of the iteration's portion, in
source order, from the r-th, so shard sizes differ by at most one) under the shard's lease,
exactly as `selm-data build --shard r/k` by hand. No process group is set up. When a rank ends
it writes its record, its `BuildReport` or its error, to
``<store>/_builds/iter=N/shard=i-of-k.json``, tagged with the launch's id (the same in every
rank of one launch, see `launcher.detect`); rank 0, after its own shard, waits for the other
records of this launch by reading those files, and prints one merged report.

Crash and restart. Ids are content-derived and every build first reads what its iteration
already holds, so relaunching builds only what is missing, with any number of ranks: with k'
ranks the prompts are cut into k' new shards (the prompt at position p of the portion goes to
shard p mod k'), each new shard reads the whole iteration's finished work and skips it. Nothing
is built twice and nothing already committed is lost; a dead rank's lease is taken over by
whoever claims it next.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from typing import TypeVar

import polars as pl

from selm_data.builder.iteration import BuildReport, Shard, portion_of
from selm_data.errors import SelmError
from selm_data.generation.launcher import Launch
from selm_data.manifest import Manifest
from selm_data.sources.dataset import load_source
from selm_data.store.store import Store

BUILDS_DIR = "_builds"
R = TypeVar("R")
POLL_SECONDS = 1.0


def shard_for(requested: str | None, launch: Launch) -> Shard:
    """The shard this process builds: `--shard i/k` when given, else rank/world of its launcher.

    Raises:
        SelmError: `--shard` disagrees with the launcher's rank and world size.
    """
    if requested is None:
        return Shard(launch.rank, launch.world)
    shard = Shard.parse(requested)
    if launch.world > 1 and shard != Shard(launch.rank, launch.world):
        raise SelmError(
            f"--shard {requested} disagrees with {launch.launcher}, which started this process "
            f"as rank {launch.rank} of {launch.world} (shard {launch.rank}/{launch.world}): "
            "leave --shard out under a launcher (each rank builds its own shard), or run "
            "without the launcher to pick shards by hand")
    return shard


@dataclass(frozen=True)
class ShardRecord:
    """What one rank left for the others: its report, or why it failed."""

    shard: str  # i-of-k
    rank: int
    host: str
    launch_id: str
    finished: str  # ISO time
    error: str | None = None  # None: built
    report: dict | None = None  # the BuildReport's fields


def record_path(job: str, shard: Shard) -> str:
    """Where a shard's record of `job` lies, relative to the store (a folder or an
    object-store URI). `job` is also the prefix of the shard's lease: "build/iter=2"."""
    return f"{BUILDS_DIR}/{job.removeprefix('build/')}/shard={shard}.json"


def _write_record(store: Store, path: str, record: ShardRecord) -> None:
    """Written to a side file and moved into place: a reader sees all of it or none (a
    rename on a disk; on an object store the PUT of the copy is whole)."""
    store.fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    tmp = f"{path}.{socket.gethostname()}.{os.getpid()}.tmp"
    with store.fs.open_output_stream(tmp) as out:
        out.write(json.dumps(asdict(record), sort_keys=True).encode())
    store.fs.move(tmp, path)


def read_record(store: Store, path: str) -> ShardRecord | None:
    try:
        with store.fs.open_input_stream(path) as f:
            data = json.loads(f.read().decode("utf-8"))
        return ShardRecord(**{f.name: data.get(f.name) for f in fields(ShardRecord)})
    except (OSError, json.JSONDecodeError, TypeError):  # pyarrow's errors are OSErrors
        return None


def _forget_record(store: Store, path: str) -> None:
    with suppress(OSError):  # absent: nothing to forget
        store.fs.delete_file(path)


def build_rank(store: Store, iteration: int, shard: Shard, launch: Launch,
               run: Callable[[], BuildReport]) -> BuildReport:
    """Run this rank's build (`run`) and leave its record for rank 0, also when it fails.

    Raises:
        SelmError: the build failed; names the rank, shard and host, and what to do.
    """
    return run_rank(store, f"build/iter={iteration}", shard, launch, run, asdict)


def run_rank(store: Store, job: str, shard: Shard, launch: Launch, run: Callable[[], R],
             summary: Callable[[R], dict]) -> R:
    """Run this rank's part of `job` and leave its record (`summary` of what `run` returns,
    or the error) for rank 0, also when it fails.

    Raises:
        SelmError: `run` failed; names the rank, shard and host, and what to do.
    """
    path = record_path(job, shard)
    _forget_record(store, path)  # an earlier launch's record of this shard is not this one's
    host = socket.gethostname()

    def record(**kw: object) -> ShardRecord:
        return ShardRecord(str(shard), launch.rank, host, launch.launch_id,
                           datetime.now(UTC).isoformat(timespec="seconds"), **kw)  # type: ignore[arg-type]

    try:
        report = run()
    except Exception as e:
        reason = str(e) if isinstance(e, SelmError) else f"{type(e).__name__}: {e}"
        _write_record(store, path, record(error=reason))
        raise SelmError(
            f"rank {launch.rank} of {launch.world} (shard {shard}, host {host}) failed: "
            f"{reason}. What it committed stays in the store: fix the cause and rerun the same "
            "command, with any number of ranks, to build what is missing") from e
    _write_record(store, path, record(report=summary(report)))
    return report


def wait_for_ranks(store: Store, iteration: int, launch: Launch, *,
                   say: Callable[[str], None] = lambda _: None,
                   poll: float = POLL_SECONDS) -> list[ShardRecord]:
    """Rank 0's wait for every shard's build record of this launch (see `wait_for_job`)."""
    return wait_for_job(store, f"build/iter={iteration}", launch, say=say, poll=poll)


def wait_for_job(store: Store, job: str, launch: Launch, *,
                 say: Callable[[str], None] = lambda _: None,
                 poll: float = POLL_SECONDS) -> list[ShardRecord]:
    """Rank 0's wait for every shard's record of `job` in this launch, read from the store (no
    collective). Stops early when a shard's lease holder died on this host without a record.
    Says which shards it still waits for, once a minute."""
    shards = [Shard(i, launch.world) for i in range(launch.world)]
    last_said = time.monotonic()
    while True:
        found = {s: read_record(store, record_path(job, s)) for s in shards}
        mine = {s: r for s, r in found.items() if r is not None and r.launch_id == launch.launch_id}
        missing = [s for s in shards if s not in mine]
        if not missing:
            return [mine[s] for s in shards]
        dead = _dead_shards(store, job, missing)
        if dead:
            return [mine[s] for s in shards if s in mine] + [
                ShardRecord(str(s), s.index, "?", launch.launch_id, "", error="its rank died "
                            "while working (lease left behind); rerun to finish it")
                for s in dead]
        if time.monotonic() - last_said > 60:
            say(f"waiting for shard(s) {', '.join(str(s) for s in missing)} (still building, "
                "or their ranks never started: run every rank under one launcher)")
            last_said = time.monotonic()
        time.sleep(poll)


def _dead_shards(store: Store, job: str, shards: list[Shard]) -> list[Shard]:
    """Shards whose lease was left by a holder that died (known for holders on this host)."""
    stale = {holder.work for holder, state in store.leases() if state == "stale"}
    return [s for s in shards if f"{job}/shard={s}" in stale]


def merge(records: list[ShardRecord], iteration: int) -> tuple[BuildReport, list[ShardRecord]]:
    """One report of every shard that finished (counts summed, failures listed), and the
    records of the shards that did not."""
    done = [r for r in records if r.error is None and r.report is not None]
    failed = [r for r in records if r not in done]
    k = len(records)
    policies = sorted({r.report["policy"] for r in done if r.report})
    merged = BuildReport(iteration, f"all {k} (merged)", policy=", ".join(policies) or "?")
    for r in done:
        assert r.report is not None
        one = BuildReport(**r.report)
        for f in fields(BuildReport):
            if f.name in ("iteration", "shard", "policy"):
                continue
            if f.name in ("source_rows", "quarantined", "duplicates"):  # the same in every shard
                setattr(merged, f.name, getattr(one, f.name))
            elif f.name in ("failed", "unranked"):
                getattr(merged, f.name).extend(tuple(x) for x in getattr(one, f.name))
            else:
                setattr(merged, f.name, getattr(merged, f.name) + getattr(one, f.name))
    return merged, failed


def shard_progress(store: Store) -> pl.DataFrame:
    """Per build lease (one per shard of an iteration): its state and holder, the shard's
    prompts stored, responses generated and pairs made so far; for `selm-data status`."""
    rows = []
    portions: dict[tuple[str | None, int], list[str] | None] = {}  # by (manifest, iteration)
    for holder, state in store.leases():
        parts = dict(p.split("=", 1) for p in holder.work.split("/")[1:] if "=" in p)
        if not holder.work.startswith("build/") or "iter" not in parts or "shard" not in parts:
            continue
        iteration = int(parts["iter"])
        index, _, count = parts["shard"].partition("-of-")
        shard = Shard(int(index), int(count))
        key = (_recorded_manifest(store, holder.run_id), iteration)
        if key not in portions:
            portions[key] = _portion_ids(*key)
        ids = portions[key]
        counts = (_counts(store, iteration, set(shard.take(ids))) if ids is not None
                  else dict.fromkeys(("prompts", "generated", "pairs")))
        rows.append({"iteration": iteration, "shard": str(shard), "state": state, **counts,
                     "holder": f"pid {holder.pid} on {holder.host} since {holder.since}"})
    return pl.DataFrame(rows) if rows else pl.DataFrame()


def _recorded_manifest(store: Store, run_id: str) -> str | None:
    """The manifest a run recorded in `runs` (None if it recorded none)."""
    recorded = (store.scan("runs").filter(pl.col("run_id") == run_id).select("manifest")
                .collect()["manifest"].to_list())
    return recorded[0] if recorded else None


def _portion_ids(manifest_json: str | None, iteration: int) -> list[str] | None:
    """The iteration's prompt ids in source order, cut from the source of the manifest that
    the shard's builder recorded (a shard is a position in the portion, which only the source
    knows); None when that run recorded no manifest or its source cannot be read here."""
    if manifest_json is None:
        return None
    try:
        manifest = Manifest.model_validate_json(manifest_json)
        return [pid for pid, _ in portion_of(manifest, load_source(manifest.source), iteration)]
    except (SelmError, OSError, ValueError):
        return None


def _counts(store: Store, iteration: int, members: set[str]) -> dict[str, int]:
    """How far a shard has come, counted from the tables (the store, not the rank, says)."""
    it = pl.col("iteration") == iteration

    def count(table: str, *where: pl.Expr) -> int:
        lf = store.scan(table).filter(it)
        for w in where:
            lf = lf.filter(w)
        ids = lf.select("prompt_id").collect()["prompt_id"].to_list()
        return sum(pid in members for pid in ids)

    return {"prompts": count("prompts"),
            "generated": count("responses", pl.col("origin") == "policy",
                               pl.col("status") == "ok"),
            "pairs": count("pairs")}
