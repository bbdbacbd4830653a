"""Stores at az:// and gs:// URIs: the same guarantees as on S3 (test_object_store.py) through
the other lease and file client (obstore); time travel and the lease tests run on all three
(S3 too): appends, verify, export and the training copy of a
snapshot, the maintenance commands, leases with heartbeat and expiry, a commit cut by a proxy,
and a planted credential that must appear nowhere.

Azure runs against Azurite, Microsoft's emulator (tests/azurite.py). GCS runs against a
scripted server of this repository (tests/gcsfake.py), since no installable emulator speaks
the API object_store uses: passing on it shows that selm and object_store drive GCS's API as
documented, not that GCS itself behaves so.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from typer.testing import CliRunner

from helpers import chain_rows
from s3server import child_env
from selm_data import LeaseHeldError, StoreError, open_store, verify
from selm_data.publish.snapshot import export, local_folder, snapshot_row
from selm_data.store.location import parse_location
from selm_data.store.store import RunInfo, command_line

WORKER = Path(__file__).with_name("store_worker.py")
CHAIN = ("prompts", "responses", "judgments", "pairs")


def new_store(uri: str, command: str = "pytest cloud"):
    return open_store(uri, create=True, run=RunInfo.new(command))


@dataclass
class Cloud:
    uri: str  # a fresh store
    server: Any  # azurite.Azurite or gcsfake.GcsFake: .objects(), .secret, .bucket
    proxy: str  # the name of its cutproxy fixture


@pytest.fixture(params=["az", "gs"])
def cloud(request: pytest.FixtureRequest) -> Cloud:
    if request.param == "az":
        return Cloud(request.getfixturevalue("az_uri"), request.getfixturevalue("azurite"),
                     "azure_proxy")
    return Cloud(request.getfixturevalue("gs_uri"), request.getfixturevalue("gcs_fake"),
                 "gcs_proxy")


@pytest.fixture(params=["s3", "az", "gs"])
def object_uri(request: pytest.FixtureRequest) -> str:
    """A fresh store on each object store: the lease tests are one protocol with two clients
    (boto3 on S3, obstore on Azure and GCS), checked the same way on all three."""
    return str(request.getfixturevalue(f"{request.param}_uri"))


def worker(*args: str, ttl: float = 3.0) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, str(WORKER), *args], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=child_env(SELM_LEASE_TTL_S=str(ttl)))


def test_abfss_names_its_container_where_a_user_goes():
    uri = "abfss://data@account.dfs.core.windows.net/selm/store"
    assert parse_location(uri).uri == uri
    with pytest.raises(StoreError, match="credentials"):
        parse_location("abfss://data:hunter2@account.dfs.core.windows.net/store")


def test_append_scan_verify_export(cloud, tmp_path, monkeypatch):
    uri = cloud.uri
    monkeypatch.setenv("SELM_CACHE", str(tmp_path / "cache"))
    store = new_store(uri)
    rows = chain_rows(1, 6)
    for table in CHAIN:
        assert store.append(table, rows[table]).added == len(rows[table])
    again = store.append("prompts", rows["prompts"])  # idempotent: nothing twice
    assert (again.added, again.skipped) == (0, 6)
    assert pl.scan_delta(store.table_uri("pairs")).collect().height == 6  # polars, by itself
    assert verify(store) == []

    snap = export(store, 1, name="it1")
    assert snap.created and snap.row_count == 6 and str(snap.path) == f"{uri}/exports/it1"
    reopened = open_store(uri)
    assert verify(reopened) == []
    folder = local_folder(reopened, snapshot_row(reopened, "it1"))
    assert pl.read_parquet(folder / "data").height == 6
    assert str(folder).startswith(str(tmp_path / "cache"))
    # what `selm-train train --snapshot URI@it1` reads (training itself: tests/selm_train, S3)
    from selm_train.data import read_examples, resolve_snapshot

    ref = resolve_snapshot(f"{uri}@it1")
    assert ref.store == uri and ref.folder == folder and len(read_examples(ref)) == 6

    # verify reads the blobs themselves: a snapshot file changed there is found
    import obstore
    from obstore.store import from_url

    key = f"{uri.split('/', 3)[3]}/exports/it1/{snap.files[0]}"
    obstore.put(from_url(uri.split("/", 3)[0] + "//" + cloud.server.bucket), key, b"changed")
    assert any(p.check == "snapshot files" for p in verify(reopened))
    assert [p for p in tmp_path.iterdir() if p.name.startswith(("az", "gs"))] == []


def test_cli_init_verify_optimize_vacuum_status(cloud, tmp_path, monkeypatch):
    uri = cloud.uri
    from selm_data.cli import app

    monkeypatch.chdir(tmp_path)
    for args, expect in ((["init"], ""), (["verify"], "consistent"),
                         (["optimize", "--table", "runs"], "runs"),
                         (["vacuum", "--retention-hours", "0"], "would remove"),
                         (["status"], "")):
        result = CliRunner().invoke(app, [*args, "--store", uri])
        assert result.exit_code == 0 and expect in result.output, (args, result.output)
    assert list(tmp_path.iterdir()) == []  # nothing became a local folder
    assert f"{uri.split('/', 3)[3]}/selm-store.json" in cloud.server.objects()


def test_time_travel(object_uri):
    uri = object_uri
    store = new_store(uri)
    rows = chain_rows(1, 4)
    first = store.append("prompts", rows["prompts"][:2]).version
    store.append("prompts", rows["prompts"][2:])
    assert store.scan("prompts", version=first).collect().height == 2
    assert store.scan("prompts").collect().height == 4


# --- leases: put-if-absent blobs (If-None-Match: *) with heartbeat and expiry -------------


def test_two_claimants_of_one_shard_only_one_builds(object_uri):
    uri = object_uri
    store = new_store(uri)
    first = worker("claim", uri, "build/iter=1/shard=0-of-2", "4", "0")
    assert first.stdout.readline().startswith("claimed"), first.stderr.read()
    second = worker("claim", uri, "build/iter=1/shard=0-of-2", "0", "100")
    _, err = second.communicate(timeout=60)
    assert second.returncode == 3, err
    assert "already being done by run" in err and "pid" in err
    assert first.wait(60) == 0
    assert store.scan("prompts").collect().height == 10  # only the holder wrote
    with store.claim("build/iter=1/shard=0-of-2") as lease:  # released: free at once
        assert lease.taken_over is None


def test_claimants_racing_for_one_shard_at_once_exactly_one_wins(object_uri, tmp_path):
    uri = object_uri
    new_store(uri)
    go = tmp_path / "go"
    racers = [worker("claim", uri, "build/iter=1/shard=1-of-2", "3", "0", str(go))
              for _ in range(4)]
    for r in racers:
        assert r.stdout.readline() == "ready\n"
    go.touch()
    codes = [r.wait(120) for r in racers]
    assert sorted(codes) == [0, 3, 3, 3], [r.stderr.read() for r in racers]
    assert open_store(uri).scan("prompts").collect().height == 10


def test_a_builder_killed_mid_chunk_is_taken_over_after_expiry(object_uri):
    uri = object_uri
    """Killed between two committed chunks: not taken over before the expiry (a live-looking
    lease is never doubled), then taken over; the chunks stored are skipped, none doubled."""
    store = new_store(uri)
    first = worker("claimwrite", uri, "build/iter=1/shard=0-of-1", "5", ttl=2.0)
    for _ in range(2):
        line = first.stdout.readline()
        assert line.startswith("done"), line + first.stderr.read()
    first.kill()
    first.wait()
    with pytest.raises(LeaseHeldError, match="worker chunks"):
        store.claim("build/iter=1/shard=0-of-1")
    time.sleep(3.5)  # the ttl (2 s) after its last heartbeat, and a margin for clock resolution
    second = worker("claimwrite", uri, "build/iter=1/shard=0-of-1", "5", ttl=2.0)
    out, err = second.communicate(timeout=120)
    assert second.returncode == 0, err
    assert "took over from run" in out
    prompts = open_store(uri).scan("prompts").collect()
    assert prompts.height == 50 and prompts["prompt_id"].n_unique() == 50
    assert verify(open_store(uri)) == []


def test_a_live_holder_keeps_its_lease_past_the_ttl(object_uri):
    uri = object_uri
    store = new_store(uri)
    live = worker("claim", uri, "work/live", "7", "0", ttl=2.0)
    assert live.stdout.readline().startswith("claimed")
    time.sleep(5)  # two and a half ttls: only the heartbeat keeps it
    with pytest.raises(LeaseHeldError):
        store.claim("work/live")
    assert live.wait(60) == 0


def test_an_append_costs_six_lease_requests(cloud, monkeypatch):
    """The table lock around an uncontended append: list, read the last holder, create, list
    again, delete the older generation, and one write to release (bench/README.md has S3's).
    Counted at obstore's calls on lease objects."""
    import obstore

    calls: list[str] = []

    def counted(name):
        real = getattr(obstore, name)

        def call(store, path=None, *args, **kwargs):
            if "_leases/" in str(path):
                calls.append(name)
            return real(store, path, *args, **kwargs)
        return call

    store = new_store(cloud.uri)
    rows = chain_rows(1, 21)["prompts"]
    store.append("prompts", rows[:1])  # the run's record, and the server clock's first probe
    for name in ("list", "get", "put", "delete", "head", "list_with_delimiter"):
        monkeypatch.setattr(obstore, name, counted(name))
    for i in range(1, 21):
        store.append("prompts", rows[i:i + 1])
    print(f"{cloud.uri.split(':')[0]}: {len(calls) / 20:.2f} lease requests an append",
          {name: calls.count(name) for name in set(calls)})
    assert len(calls) == 20 * 6


# --- failure injection: the connection cut as the commit goes up --------------------------


def test_a_dropped_commit_leaves_the_last_version_and_the_rerun_completes(cloud, request,
                                                                          monkeypatch):
    uri = cloud.uri
    proxy = request.getfixturevalue(cloud.proxy)
    monkeypatch.setenv("SELM_LEASE_TTL_S", "2")  # the table lock whose release was cut
    store = new_store(uri)
    rows = chain_rows(1, 10)["prompts"]
    good = store.append("prompts", rows[:5]).version
    proxy.cut_at_next_commit()  # the data files go up, the commit's PUT is reset
    with pytest.raises(StoreError, match=f"unchanged at version {good}") as e:
        store.append("prompts", rows)
    assert cloud.server.secret not in str(e.value)
    proxy.mend()
    again = open_store(uri)
    assert again.version("prompts") == good
    assert again.scan("prompts").collect().height == 5 and verify(again) == []
    rerun = again.append("prompts", rows)
    assert (rerun.added, rerun.skipped) == (5, 5)
    assert verify(again) == []


# --- no credential anywhere ---------------------------------------------------------------


def test_planted_credential_is_nowhere(cloud, caplog, capfd, monkeypatch):
    """Azure: the account key, which signs every request. GCS: a bearer token in the
    environment and the service account's private key (the scripted server needs no token,
    so neither is sent)."""
    uri, secret = cloud.uri, cloud.server.secret
    caplog.set_level(logging.DEBUG)
    store = new_store(uri, command=command_line(["build", f"--hf-token={secret}"]))
    rows = chain_rows(1, 3)
    for table in CHAIN:
        store.append(table, rows[table])
    export(store, 1, name="it1")
    with store.claim("work/secret"):
        pass
    with pytest.raises(StoreError) as missing:  # an error from the server: no such container
        open_store(uri.replace(cloud.server.bucket, "no-such-container"))
    objects = cloud.server.objects()
    assert objects and not [k for k, v in objects.items() if secret.encode() in v]
    assert secret not in str(missing.value) and "no-such-container" in str(missing.value)
    assert secret not in caplog.text
    out, err = capfd.readouterr()
    assert secret not in out and secret not in err


def test_scrub_removes_azure_and_gcs_secrets_also_url_encoded(monkeypatch):
    from selm_data.store.location import scrub

    monkeypatch.setenv("AZURE_STORAGE_ACCOUNT_KEY", "a+b/c=d" * 4)
    monkeypatch.setenv("GOOGLE_SERVICE_ACCOUNT_KEY", '{"private_key": "-----BEGIN x"}')
    message = ("PUT http://h/c/x?sv=2022&sig=Zm9v%2Bbar%3D failed for key a%2Bb%2Fc%3Dd"
               + "a%2Bb%2Fc%3Dd" * 3 + ' and {"private_key": "-----BEGIN x"}')
    cleaned = scrub(message)
    assert "Zm9v" not in cleaned and "a%2Bb" not in cleaned and "BEGIN" not in cleaned
    assert cleaned.startswith("PUT http://h/c/x?sv=2022&sig=***")


@pytest.mark.slow
def test_a_real_build_exports_and_verifies(cloud, tmp_path, tiny_lm, tiny_rm):
    """The builder, unchanged, on tiny models built on the spot, into the store at a URI."""
    uri = cloud.uri
    from helpers import manifest_dict
    from selm_data.builder.iteration import build
    from selm_data.manifest import Manifest

    m = Manifest.model_validate(manifest_dict(tmp_path, tiny_lm, tiny_rm, store=uri))
    store = open_store(m.store, create=True, run=RunInfo.new("pytest cloud build"))
    report = build(m, 1, store)
    assert (report.prompts, report.pairs, report.failed) == (12, 12, [])
    assert build(m, 1, open_store(uri)).generated == 0  # resumed: nothing twice
    assert export(store, 1).row_count == 12 and verify(open_store(uri)) == []
