"""The store at an s3:// URI, against moto's S3 server on 127.0.0.1 (tests/s3server.py): locations
that must never become local folders, appends, scans, verify, export, leases with heartbeat and
expiry, and a credential planted in the environment that must appear nowhere."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner

from helpers import chain_rows
from s3server import SECRET, child_env
from selm_data import LeaseHeldError, StoreError, open_store, verify
from selm_data.publish.snapshot import export, local_folder, snapshot_row
from selm_data.store.location import parse_location
from selm_data.store.store import RunInfo, command_line

WORKER = Path(__file__).with_name("store_worker.py")
CHAIN = ("prompts", "responses", "judgments", "pairs")


def new_store(uri: str, command: str = "pytest s3"):
    return open_store(uri, create=True, run=RunInfo.new(command))


# --- locations: nothing silently becomes a local folder -----------------------------------


@pytest.mark.parametrize("text", ["s3:", "s3:/bucket/store", "gs:bucket", "S3://bucket/x",
                                  "ftp://host/store", "s3://", "s3://key:secret@bucket/x"])
def test_uri_like_locations_are_refused_not_made_folders(text, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(StoreError) as e:
        open_store(text, create=True)
    assert list(tmp_path.iterdir()) == []  # no folder named "s3:" or anything else
    assert "secret" not in str(e.value)


def test_locations_parse_to_uris_and_folders(tmp_path):
    assert parse_location("s3://bucket/a/store/").uri == "s3://bucket/a/store"
    assert parse_location("gs://b/x").uri == "gs://b/x"
    assert parse_location("az://container/x").uri == "az://container/x"
    assert parse_location(f"file://{tmp_path}/s").local == tmp_path / "s"
    assert parse_location(tmp_path / "s").local == tmp_path / "s"


def test_unsafe_rename_setting_is_refused(monkeypatch):
    monkeypatch.setenv("AWS_S3_ALLOW_UNSAFE_RENAME", "true")
    with pytest.raises(StoreError, match="AWS_S3_ALLOW_UNSAFE_RENAME"):
        parse_location("s3://bucket/store")


def test_cli_keeps_an_s3_store_on_s3(s3_uri, s3_server, tmp_path, monkeypatch):
    from selm_data.cli import app

    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["init", "--store", s3_uri])
    assert result.exit_code == 0, result.output
    assert list(tmp_path.iterdir()) == []  # not a local folder named "s3:"
    prefix = s3_uri.split("/", 3)[3]
    assert f"{prefix}/selm-store.json" in s3_server.objects()
    result = CliRunner().invoke(app, ["verify", "--store", s3_uri])
    assert result.exit_code == 0 and "consistent" in result.output, result.output
    result = CliRunner().invoke(app, ["optimize", "--store", s3_uri, "--table", "runs"])
    assert result.exit_code == 0 and "runs" in result.output, result.output
    result = CliRunner().invoke(app, ["vacuum", "--store", s3_uri, "--retention-hours", "0"])
    assert result.exit_code == 0 and "would remove" in result.output, result.output
    result = CliRunner().invoke(app, ["status", "--store", s3_uri])
    assert result.exit_code == 0, result.output
    assert list(tmp_path.iterdir()) == []


# --- the store at a URI -----------------------------------------------------------------------


def test_append_scan_verify_export_at_s3(s3_uri, s3_server, tmp_path, monkeypatch):
    monkeypatch.setenv("SELM_CACHE", str(tmp_path / "cache"))
    store = new_store(s3_uri)
    rows = chain_rows(1, 6)
    for table in CHAIN:
        assert store.append(table, rows[table]).added == len(rows[table])
    again = store.append("prompts", rows["prompts"])  # idempotent: nothing twice
    assert (again.added, again.skipped) == (0, 6)
    assert store.scan("prompts").collect().height == 6
    # polars reads the table itself, from the same environment
    direct = pl.scan_delta(store.table_uri("pairs")).collect()
    assert direct.height == 6
    assert verify(store) == []

    snap = export(store, 1, name="it1")
    assert snap.created and snap.row_count == 6 and str(snap.path) == f"{s3_uri}/exports/it1"
    assert export(store, 1, name="it1").created is False  # same content: nothing added
    reopened = open_store(s3_uri)
    assert verify(reopened) == []
    folder = local_folder(reopened, snapshot_row(reopened, "it1"))
    assert pl.read_parquet(folder / "data").height == 6
    assert str(folder).startswith(str(tmp_path / "cache"))

    # verify reads the object store: a snapshot file changed there is found
    import boto3

    key = f"{s3_uri.split('/', 3)[3]}/exports/it1/{snap.files[0]}"
    boto3.client("s3").put_object(Bucket=s3_uri.split("/")[2], Key=key, Body=b"changed")
    assert any(p.check == "snapshot files" for p in verify(reopened))


# --- leases without flock (the tests every object store shares: test_cloud_store.py) -------


def worker(*args: str, ttl: float = 3.0) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, str(WORKER), *args], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=child_env(SELM_LEASE_TTL_S=str(ttl)))


def test_a_killed_holder_is_taken_over_after_expiry_and_nothing_is_lost(s3_uri):
    store = new_store(s3_uri)
    dead = worker("hang", s3_uri, "build/iter=1/shard=0-of-1", ttl=2.0)
    line = dead.stdout.readline()
    assert line.startswith("claimed"), dead.stderr.read()
    dead_run = line.split()[1]
    dead.kill()
    dead.wait()
    with pytest.raises(LeaseHeldError, match=dead_run):  # not expired yet: never doubled
        store.claim("build/iter=1/shard=0-of-1")
    time.sleep(3.5)  # the ttl (2 s) after its last heartbeat, and a margin for clock resolution
    with store.claim("build/iter=1/shard=0-of-1") as lease:
        assert lease.taken_over is not None and lease.taken_over.run_id == dead_run
        assert lease.held


def test_status_lists_object_leases(s3_uri):
    store = new_store(s3_uri)
    with store.claim("work/a"):
        states = {h.work: state for h, state in store.leases()}
        assert states["work/a"] == "held"
    states = {h.work: state for h, state in store.leases()}
    assert states["work/a"] == "released"


# --- failure injection: a server that drops requests -------------------------------------


def test_a_dropped_commit_leaves_the_last_version_and_the_rerun_completes(s3_uri, proxy,
                                                                          monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    monkeypatch.setenv("SELM_LEASE_TTL_S", "2")  # the table lock whose release was cut
    store = new_store(s3_uri)
    rows = chain_rows(1, 10)["prompts"]
    good = store.append("prompts", rows[:5]).version
    proxy.cut_at_next_commit()  # the data files go up, the commit's PUT is reset
    with pytest.raises(StoreError, match=f"unchanged at version {good}") as e:
        store.append("prompts", rows)
    assert SECRET not in str(e.value)
    proxy.mend()
    again = open_store(s3_uri)
    assert again.version("prompts") == good
    assert again.scan("prompts").collect().height == 5
    assert verify(again) == []
    rerun = again.append("prompts", rows)
    assert (rerun.added, rerun.skipped) == (5, 5)
    assert again.scan("prompts").collect()["prompt_id"].n_unique() == 10
    assert verify(again) == []


def test_a_commit_whose_reply_is_lost_is_not_doubled(s3_uri, proxy, monkeypatch):
    """The server stores the commit, the reply never arrives: delta-rs retries, finds the
    version taken and commits the same files again at the next version (or the append fails
    and is rerun). Either way each row is stored once: a file added twice is one file."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    monkeypatch.setenv("SELM_LEASE_TTL_S", "2")
    store = new_store(s3_uri)
    rows = chain_rows(1, 10)["prompts"]
    good = store.append("prompts", rows[:5]).version
    proxy.lose_next_commit_reply()
    with contextlib.suppress(StoreError):
        store.append("prompts", rows[5:])
    again = open_store(s3_uri)
    assert again.version("prompts") > good  # the lost reply's commit is there
    again.append("prompts", rows)  # the rerun
    prompts = again.scan("prompts").collect()
    assert prompts.height == 10 and prompts["prompt_id"].n_unique() == 10
    assert verify(again) == []


def test_a_server_gone_mid_append_leaves_the_store_whole(s3_uri, proxy, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    monkeypatch.setenv("SELM_LEASE_TTL_S", "2")
    store = new_store(s3_uri)
    rows = chain_rows(1, 10)["prompts"]
    good = store.append("prompts", rows[:5]).version
    proxy.cut()
    with pytest.raises(StoreError, match=r"run the command again|unchanged at version"):
        store.append("prompts", rows)
    proxy.mend()
    again = open_store(s3_uri)
    assert again.version("prompts") == good and verify(again) == []
    assert again.append("prompts", rows).added == 5
    assert verify(again) == []


# --- no credential anywhere -----------------------------------------------------------------


def test_planted_secret_is_nowhere(s3_uri, s3_server, caplog, capfd):
    caplog.set_level(logging.DEBUG)
    assert os.environ["AWS_SECRET_ACCESS_KEY"] == SECRET
    store = new_store(s3_uri, command=command_line(["build", f"--hf-token={SECRET}"]))
    rows = chain_rows(1, 3)
    for table in CHAIN:
        store.append(table, rows[table])
    export(store, 1, name="it1")
    with store.claim("work/secret"):
        pass
    with pytest.raises(StoreError) as e:  # an error from the object store
        open_store(s3_uri.replace("selm-tests", "no-such-bucket-selm"))
    objects = s3_server.objects()
    assert objects and not [k for k, v in objects.items() if SECRET.encode() in v]
    assert SECRET not in str(e.value)
    assert SECRET not in caplog.text
    out, err = capfd.readouterr()
    assert SECRET not in out and SECRET not in err
    assert not [json.loads(v) for k, v in objects.items() if k.endswith("selm-store.json")
                and "AWS" in v.decode()]


def test_messages_are_scrubbed_of_secrets_the_environment_holds(monkeypatch):
    from selm_data.store.location import scrub

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("SOME_SERVICE_TOKEN", "tok-1234567890")
    message = f"request failed: key {SECRET}, token tok-1234567890, region us-east-1"
    assert scrub(message) == "request failed: key ***, token ***, region us-east-1"


@pytest.mark.slow
def test_a_real_build_exports_and_verifies_at_s3(s3_uri, tmp_path, tiny_lm, tiny_rm):
    """The builder, unchanged, on tiny models built on the spot, into a store at a URI."""
    from helpers import manifest_dict
    from selm_data.builder.iteration import build
    from selm_data.manifest import Manifest

    m = Manifest.model_validate(manifest_dict(tmp_path, tiny_lm, tiny_rm, store=s3_uri))
    store = open_store(m.store, create=True, run=RunInfo.new("pytest s3 build"))
    report = build(m, 1, store)
    assert (report.prompts, report.pairs, report.failed) == (12, 12, [])
    assert build(m, 1, open_store(s3_uri)).generated == 0  # resumed: nothing twice
    snap = export(store, 1)
    assert snap.row_count == 12 and verify(open_store(s3_uri)) == []
    assert [p for p in tmp_path.iterdir() if p.name.startswith("s3")] == []


def test_lineage_diff_and_push_dry_run_read_an_s3_store(s3_uri, tmp_path, monkeypatch):
    from selm_data.publish.diff import diff
    from selm_data.publish.hub import dry_run
    from selm_data.publish.lineage import lineage

    monkeypatch.setenv("SELM_CACHE", str(tmp_path / "cache"))
    store = new_store(s3_uri)
    rows = chain_rows(1, 4)
    for table in CHAIN:
        store.append(table, rows[table])
    export(store, 1, name="it1")
    pair_id = store.scan("pairs").collect()["pair_id"][0]
    assert "it1" in str(lineage(store, pair_id))  # the snapshots holding the pair
    d = diff(store, "it1", 1)
    assert (d.pairs_shared, d.pairs_only_a, d.pairs_only_b) == (4, 0, 0)
    written = dry_run(store, "it1", tmp_path / "push")
    assert (tmp_path / "push" / "README.md").is_file() and written
