"""Pushing a snapshot: the repo's files, a dry run that `datasets` loads, and pushes to a local
stand-in for the Hub (a stdlib HTTP server on 127.0.0.1 that answers the requests
huggingface_hub makes) that check what arrived and that the token shows up nowhere."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import re
import threading
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import polars as pl
import pytest
import yaml

from helpers import chain_rows
from selm_data import open_store
from selm_data.errors import SelmError
from selm_data.manifest import BUNDLED_DATA, load_manifest
from selm_data.publish.card import CARD_FILE, size_category
from selm_data.publish.hub import dry_run, push, repo_files
from selm_data.publish.provenance import LINEAGE_FILE, redact, scrub
from selm_data.publish.snapshot import export
from selm_data.store.schema import TABLES
from selm_data.store.store import RunInfo, Store

TOKEN = "hf_" + "Zq7xW" * 7  # shaped like a Hub token: 3 + 35 characters
REPO = Path(__file__).resolve().parents[3]
SHARDS = ["data/train-00000-of-00001.parquet"]
BUNDLED = "ultrafeedback_binarized_1000.jsonl"


# --- a store with one exported snapshot --------------------------------------------------------


def build_store(root: Path, *, source: str | None = None) -> Store:
    """Iteration 2: 7 pairs with margins 0, 0.5, ..., 3.0; the first a tie; pairs 1 and 2 chose
    y_ref. Built by a run that recorded the demo manifest (plus a secret-shaped field), exported
    by another run as `iter2`."""
    manifest = load_manifest(REPO / "manifests" / "demo.yaml")
    recipe = json.loads(manifest.canonical_json())
    recipe["generation"]["server"] = {"base_url": "https://bob:pw-4711@judge.example/v1",
                                      "api_key_env": "OPENAI_API_KEY"}
    recipe["hf_token"] = "plain-secret-value"
    build_run = RunInfo.new("selm-data build --iter 2", manifest_hash=manifest.hash(),
                            manifest_json=json.dumps(recipe, sort_keys=True))
    store = open_store(root, create=True, run=build_run)
    rows = chain_rows(2, 7)
    for prompt in rows["prompts"]:
        prompt["source"] = source or str(BUNDLED_DATA / BUNDLED)
    ref_of = {r["prompt_id"]: r["response_id"] for r in rows["responses"]
              if r["origin"] == "policy"}
    for k, pair in enumerate(rows["pairs"]):
        pair.update(margin=0.5 * k, is_tie=k == 0)
        if k in (1, 2):
            pair.update(chosen_id=ref_of[pair["prompt_id"]], chosen_origin="policy")
    for table in ("prompts", "responses", "judgments", "pairs"):
        store.append(table, rows[table])
    export(open_store(root, run=RunInfo.new("selm-data export --iter 2")), 2, name="iter2")
    return store


@pytest.fixture
def built(tmp_path: Path) -> Store:
    return build_store(tmp_path / "store")


# --- a stand-in Hub -------------------------------------------------------------------------


def git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class StandInHub:
    """Just the Hub endpoints that create_repo and create_commit of a dataset repo call.

    Files go inline in the commit ("regular" upload mode), except names ending in
    `lfs_suffixes`, which go through the LFS batch API with the basic transfer (a PUT). Every
    request is kept in `requests`; `reject` answers every request with that status and an
    error that echoes the request's headers, as a careless server might."""

    def __init__(self, *, lfs_suffixes: tuple[str, ...] = (), reject: int | None = None):
        self.requests: list[dict[str, Any]] = []
        self.repos: dict[str, dict[str, Any]] = {}
        self.lfs_blobs: dict[str, bytes] = {}
        self.lfs_suffixes = lfs_suffixes
        self.reject = reject
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> StandInHub:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()

    def add_repo(self, repo_id: str, *, private: bool) -> None:
        self.repos[repo_id] = {"private": private, "files": {}, "modes": {}, "commits": []}

    # routes: (method, pattern) -> handler(match, body) -> (status, json)
    def route(self, method: str, path: str, body: bytes) -> tuple[int, dict]:
        routes = [
            ("POST", r"/api/repos/create", self.create_repo),
            ("GET", r"/api/datasets/(?P<repo>[^/]+/[^/]+)(/revision/(?P<rev>[^/]+))?",
             self.repo_info),
            ("POST", r"/api/validate-yaml", self.validate_yaml),
            ("POST", r"/api/datasets/(?P<repo>[^/]+/[^/]+)/preupload/(?P<rev>[^/]+)",
             self.preupload),
            ("POST", r"/api/datasets/(?P<repo>[^/]+/[^/]+)/commit/(?P<rev>[^/]+)", self.commit),
            ("POST", r"/datasets/(?P<repo>[^/]+/[^/]+)\.git/info/lfs/objects/batch",
             self.lfs_batch),
            ("PUT", r"/lfs-upload/(?P<oid>[0-9a-f]{64})", self.lfs_upload),
            ("POST", r"/lfs-verify", self.lfs_verify),
        ]
        for verb, pattern, handler in routes:
            match = re.fullmatch(pattern, path)
            if verb == method and match:
                return handler(match, body)
        return 404, {"error": f"the stand-in has no {method} {path}"}

    def create_repo(self, match: re.Match, body: bytes) -> tuple[int, dict]:
        payload = json.loads(body)
        assert payload["type"] == "dataset"
        repo_id = f"{payload['organization']}/{payload['name']}"
        if repo_id in self.repos:
            return 409, {"error": "You already created this dataset repo"}
        private = payload.get("visibility") == "private" or payload.get("private") is True
        self.add_repo(repo_id, private=private)
        return 200, {"url": f"{self.url}/datasets/{repo_id}", "name": repo_id}

    def repo_info(self, match: re.Match, body: bytes) -> tuple[int, dict]:
        repo = self.repos.get(match["repo"])
        if repo is None:
            return 404, {"error": "Repository not found"}
        sha = repo["commits"][-1]["oid"] if repo["commits"] else None
        return 200, {"id": match["repo"], "private": repo["private"], "sha": sha,
                     "siblings": [{"rfilename": f} for f in sorted(repo["files"])]}

    def validate_yaml(self, match: re.Match, body: bytes) -> tuple[int, dict]:
        content = json.loads(body)["content"]
        front = content.split("---\n")[1]
        yaml.safe_load(front)  # a card whose metadata does not parse fails here
        return 200, {"errors": [], "warnings": []}

    def preupload(self, match: re.Match, body: bytes) -> tuple[int, dict]:
        repo = self.repos[match["repo"]]
        files = []
        for f in json.loads(body)["files"]:
            mode = "lfs" if f["path"].endswith(self.lfs_suffixes) else "regular"
            old = repo["files"].get(f["path"])
            oid = None
            if old is not None:
                oid = hashlib.sha256(old).hexdigest() if mode == "lfs" else git_blob_oid(old)
            files.append({"path": f["path"], "uploadMode": mode, "shouldIgnore": False,
                          "oid": oid})
        return 200, {"files": files}

    def commit(self, match: re.Match, body: bytes) -> tuple[int, dict]:
        repo = self.repos[match["repo"]]
        lines = [json.loads(line) for line in body.decode().splitlines() if line]
        assert lines[0]["key"] == "header"
        files, lfs = {}, []
        for line in lines[1:]:
            value = line["value"]
            if line["key"] == "file":
                assert value["encoding"] == "base64"
                files[value["path"]] = base64.b64decode(value["content"])
            elif line["key"] == "lfsFile":
                blob = self.lfs_blobs.get(value["oid"])
                if blob is None or len(blob) != value["size"]:
                    return 400, {"error": f"LFS object {value['oid']} was not uploaded"}
                files[value["path"]] = blob
                lfs.append(value["path"])
            else:
                return 400, {"error": f"the stand-in does not do {line['key']}"}
        oid = hashlib.sha1(body).hexdigest()
        repo["commits"].append({"oid": oid, "revision": match["rev"], "files": files,
                                "lfs": lfs, **lines[0]["value"]})
        repo["files"].update(files)
        return 200, {"commitUrl": f"{self.url}/datasets/{match['repo']}/commit/{oid}",
                     "commitOid": oid, "pullRequestUrl": None}

    def lfs_batch(self, match: re.Match, body: bytes) -> tuple[int, dict]:
        payload = json.loads(body)
        assert payload["operation"] == "upload"
        objects = [{"oid": o["oid"], "size": o["size"], "authenticated": True, "actions": {
            "upload": {"href": f"{self.url}/lfs-upload/{o['oid']}"},
            "verify": {"href": f"{self.url}/lfs-verify"}}} for o in payload["objects"]]
        return 200, {"transfer": "basic", "objects": objects}

    def lfs_upload(self, match: re.Match, body: bytes) -> tuple[int, dict]:
        if hashlib.sha256(body).hexdigest() != match["oid"]:
            return 400, {"error": "content does not match its oid"}
        self.lfs_blobs[match["oid"]] = body
        return 200, {}

    def lfs_verify(self, match: re.Match, body: bytes) -> tuple[int, dict]:
        payload = json.loads(body)
        return (200, {}) if payload["oid"] in self.lfs_blobs else (404, {"error": "missing"})

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self) -> None:
                body = self._body()
                path = urlsplit(self.path).path
                headers = {k.lower(): v for k, v in self.headers.items()}
                with hub.lock:
                    hub.requests.append({"method": self.command, "path": path,
                                         "headers": headers, "body": body})
                    if hub.reject is not None:
                        echo = ", ".join(f"{k}: {v}" for k, v in headers.items())
                        status, answer = hub.reject, {"error": f"rejected; you sent {echo}"}
                    else:
                        status, answer = hub.route(self.command, path, body)
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if status >= 400:
                    self.send_header("X-Error-Message", answer["error"][:300])
                self.end_headers()
                self.wfile.write(data)

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while size := int(self.rfile.readline().strip(), 16):
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                    self.rfile.readline()
                    return b"".join(chunks)
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            do_GET = do_POST = do_PUT = _serve

            def log_message(self, format: str, *args: Any) -> None:
                pass  # quiet: the test reads `hub.requests`

        return Handler


@pytest.fixture
def hub_env(monkeypatch, tmp_path):
    """huggingface_hub pointed at nothing real: online, no saved login, debug logs kept."""
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.utils import logging as hf_logging

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_DEBUG", True)  # logs each request as a curl command
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-login" / "token"))
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(self.format(record))

    logger = logging.getLogger("huggingface_hub")
    handler, verbosity = Keep(logging.DEBUG), hf_logging.get_verbosity()
    logger.addHandler(handler)
    hf_logging.set_verbosity_debug()
    yield huggingface_hub, records
    hf_logging.set_verbosity(verbosity)
    logger.removeHandler(handler)


def store_text(store: Store) -> str:
    """Every value of every table, and the raw bytes of every file under the store."""
    parts = [repr(store.scan(t).collect().to_dicts()) for t in TABLES]
    parts += [p.read_bytes().decode("latin-1") for p in store.root.rglob("*") if p.is_file()]
    return "\n".join(parts)


def card_front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


# --- the files ------------------------------------------------------------------------------


def test_repo_files_are_shards_card_and_lineage(built):
    files = repo_files(built, "iter2", repo_id="org/selm-iter2")
    assert list(files) == [*SHARDS, CARD_FILE, LINEAGE_FILE]
    assert files[SHARDS[0]] == built.root / "exports" / "iter2" / SHARDS[0]
    card = files[CARD_FILE].decode()
    meta = card_front_matter(card)
    assert meta["configs"] == [{"config_name": "default",
                                "data_files": [{"split": "train", "path": "data/train-*"}]}]
    assert (meta["license"], meta["size_categories"]) == ("mit", ["n<1K"])
    assert meta["task_categories"] == ["text-generation"] and "dpo" in meta["tags"]
    lineage = json.loads(files[LINEAGE_FILE])
    snap = built.scan("snapshots").filter(pl.col("name") == "iter2").collect().row(0, named=True)
    assert lineage["content_hash"] == snap["content_hash"]
    assert lineage["table_versions"] == {v["table"]: v["version"] for v in snap["table_versions"]}
    assert lineage["filters"] == {"drop_ties": False, "min_margin": None}
    assert lineage["sources"] == [{"source": f"bundled:{BUNDLED}", "revision": None,
                                   "split": "train", "prompts": 7, "license": "mit",
                                   "origin": lineage["sources"][0]["origin"]}]
    assert "UltraFeedback" in lineage["sources"][0]["origin"]
    # chain_rows: one policy, greedy, max 64 tokens; the two y_ref that won, plus 5 that are
    # the pairs' y_ref only (ref_id): 7 policy responses in all.
    assert [(p["policy"], p["fingerprint"], p["temperature"], p["max_tokens"], p["seeded"],
             p["responses"]) for p in lineage["policies"]] == [
        ("tiny-llama", "f00d", 0.0, 64, False, 7)]
    assert lineage["rankers"] == [{"ranker": "test-ranker", "version": None, "rankings": 7}]
    assert lineage["rules"] == ["best_worst"]
    commands = [r["command"] for r in lineage["runs"]]
    assert commands == ["selm-data build --iter 2", "selm-data export --iter 2"]
    assert lineage["export_run_id"] == snap["run_id"]
    [manifest] = lineage["manifests"]
    assert manifest["manifest"]["source"]["bundled"] == BUNDLED
    assert manifest["run_ids"] == [lineage["runs"][0]["run_id"]]


def test_statistics_worked_by_hand(built):
    stats = json.loads(repo_files(built, "iter2")[LINEAGE_FILE])["statistics"]
    # margins 0, 0.5, ..., 3.0: quartiles by linear interpolation at positions 1.5, 3, 4.5
    assert stats["margin"] == {"min": 0.0, "p25": 0.75, "median": 1.5, "p75": 2.25,
                               "max": 3.0, "mean": 1.5}
    assert (stats["rows"], stats["prompts"], stats["ties"]) == (7, 7, 1)
    assert (stats["ref_chosen"], stats["ref_rejected"]) == (2, 0)
    assert stats["chosen_origins"] == {"dataset_chosen": 5, "policy": 2}
    assert stats["rejected_origins"] == {"dataset_rejected": 7}


def test_card_states_what_how_lineage_manifest_and_statistics(built):
    card = repo_files(built, "iter2", repo_id="org/selm-iter2")[CARD_FILE].decode()
    for heading in ("## Columns", "## How it was made", "## Statistics", "## Lineage",
                    "## Manifest", "## License"):
        assert heading in card
    snap = built.scan("snapshots").collect().row(0, named=True)
    assert snap["content_hash"] in card and "`tiny-llama`" in card and "`test-ranker`" in card
    assert 'load_dataset("org/selm-iter2", split="train")' in card
    assert "| y_ref chosen | 2 (28.6%) |" in card
    assert "| 0.0000 | 0.7500 | 1.5000 | 2.2500 | 3.0000 | 1.5000 |" in card
    manifest = yaml.safe_load(card.split("```yaml\n")[1].split("```")[0])
    assert manifest["policy"]["model"] == "bundled:smollm2-135m-instruct"
    # a manifest holds the names of key variables, which stay; values shaped like secrets go
    assert manifest["generation"]["server"] == {"base_url": "https://***@judge.example/v1",
                                                "api_key_env": "OPENAI_API_KEY"}
    assert manifest["hf_token"] == "***"
    assert "pw-4711" not in card and "plain-secret-value" not in card


def test_unknown_source_license_is_unknown_and_said_so(tmp_path):
    store = build_store(tmp_path / "store", source="/home/someone/data/prefs.jsonl")
    files = repo_files(store, "iter2")
    card = files[CARD_FILE].decode()
    assert card_front_matter(card)["license"] == "unknown"
    assert "could not tell the license" in card and "`prefs.jsonl`" in card
    assert "/home/someone" not in card  # a local path shows by its file name only
    given = repo_files(store, "iter2", license="cc-by-4.0")[CARD_FILE].decode()
    assert card_front_matter(given)["license"] == "cc-by-4.0"


def test_unknown_or_modified_snapshot_is_refused(built):
    with pytest.raises(SelmError, match=r"no snapshot named 'nope'; known: iter2"):
        repo_files(built, "nope")
    shard = built.root / "exports" / "iter2" / SHARDS[0]
    shard.chmod(0o644)
    shard.write_bytes(shard.read_bytes() + b"x")
    with pytest.raises(SelmError, match="was modified"):
        repo_files(built, "iter2")


def test_scrub_and_redact():
    assert scrub(f"Authorization: Bearer {TOKEN}") == "Authorization: Bearer ***"
    assert scrub("authorization: bearer abc.def-123456") == "authorization: ***"
    assert scrub(f"token {TOKEN} and sk-{'a' * 24}") == "token *** and ***"
    assert scrub("x my-own-secret y", ["my-own-secret"]) == "x *** y"
    assert redact({"max_tokens": 5, "api_key": "k", "api_key_env": "KEY", "token": "",
                   "n": [{"password": "p"}]}) == {
        "max_tokens": 5, "api_key": "***", "api_key_env": "KEY", "token": "",
        "n": [{"password": "***"}]}
    assert [size_category(n) for n in (999, 1000, 60_000, 2_000_000)] == [
        "n<1K", "1K<n<10K", "10K<n<100K", "1M<n<10M"]


# --- dry run --------------------------------------------------------------------------------


def test_dry_run_writes_exactly_the_files_and_datasets_loads_them(built, tmp_path):
    from datasets import load_dataset

    out = tmp_path / "dry"
    written = dry_run(built, "iter2", out, repo_id="org/selm-iter2")
    files = repo_files(built, "iter2", repo_id="org/selm-iter2")
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == \
        sorted(files) == sorted(p.relative_to(out).as_posix() for p in written)
    for rel, content in files.items():
        expected = content if isinstance(content, bytes) else content.read_bytes()
        assert (out / rel).read_bytes() == expected
    ds = load_dataset(str(out), cache_dir=str(tmp_path / "cache"))
    assert list(ds) == ["train"] and ds["train"].num_rows == 7
    assert {"prompt", "chosen", "rejected", "reference", "margin"} <= set(ds["train"].column_names)
    with pytest.raises(SelmError, match="new or empty folder"):
        dry_run(built, "iter2", out)


# --- push -----------------------------------------------------------------------------------


def test_push_to_the_stand_in_commits_everything_once_and_leaks_no_token(
        built, tmp_path, hub_env, monkeypatch, capfd):
    _, logs = hub_env
    monkeypatch.setenv("HF_TOKEN", TOKEN)  # huggingface_hub's own resolution finds it
    expected = {rel: c if isinstance(c, bytes) else c.read_bytes()
                for rel, c in repo_files(built, "iter2", repo_id="org/selm-iter2").items()}
    dry = tmp_path / "dry"
    dry_run(built, "iter2", dry, repo_id="org/selm-iter2")
    versions = built.versions()
    with StandInHub() as hub:
        result = push(built, "iter2", "org/selm-iter2", endpoint=hub.url)
    repo = hub.repos["org/selm-iter2"]
    assert repo["private"] is True and result.private is True and result.created
    [commit] = repo["commits"]
    assert commit["files"] == expected  # everything, in one commit, byte for byte
    assert {rel: (dry / rel).read_bytes() for rel in expected} == expected
    assert result.commit_oid == commit["oid"] and result.commit_url.endswith(commit["oid"])
    assert result.files == list(expected)
    assert "iter2" in commit["summary"] and commit["revision"] == "main"
    create = next(r for r in hub.requests if r["path"] == "/api/repos/create")
    payload = json.loads(create["body"])
    assert payload.get("visibility") == "private" or payload.get("private") is True
    routes = [(r["method"], r["path"]) for r in hub.requests]
    assert routes == [("POST", "/api/repos/create"), ("POST", "/api/validate-yaml"),
                      ("POST", "/api/datasets/org/selm-iter2/preupload/main"),
                      ("POST", "/api/datasets/org/selm-iter2/commit/main")]
    assert all(r["headers"]["authorization"] == f"Bearer {TOKEN}" for r in hub.requests)
    # the token went into the Authorization header and nowhere else
    out, err = capfd.readouterr()
    assert logs and any("curl" in line for line in logs)
    for where, text in (("files", b"".join(expected.values()).decode("latin-1")),
                        ("logs", "\n".join(logs)), ("stdout", out), ("stderr", err),
                        ("store", store_text(built)), ("result", repr(result))):
        assert TOKEN not in text, where
    assert built.versions() == versions  # a push writes nothing to the store


# huggingface_hub's own LFS PUT passes a file to httpx as `data=`, which httpx deprecates.
@pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")
def test_push_again_is_a_no_op_and_lfs_uploads_arrive(built, hub_env, monkeypatch):
    hf, _ = hub_env
    # The real Hub stores .parquet through LFS; without hf_xet's storage protocol (which needs
    # a real CAS server) huggingface_hub uses the LFS batch API with a basic PUT.
    monkeypatch.setattr(hf._commit_api, "is_xet_available", lambda: False)
    with StandInHub(lfs_suffixes=(".parquet",)) as hub:
        first = push(built, "iter2", "org/x", token=TOKEN, endpoint=hub.url)
        again = push(built, "iter2", "org/x", token=TOKEN, endpoint=hub.url)
    [commit] = hub.repos["org/x"]["commits"]
    assert commit["lfs"] == SHARDS
    shard = (built.root / "exports" / "iter2" / SHARDS[0]).read_bytes()
    assert commit["files"][SHARDS[0]] == shard == next(iter(hub.lfs_blobs.values()))
    assert (again.commit_oid, again.created) == (first.commit_oid, False)


def test_private_push_into_an_existing_public_repo_is_refused(built, hub_env):
    with StandInHub() as hub:
        hub.add_repo("org/open", private=False)
        with pytest.raises(SelmError, match=r"exists and is public.*--public"):
            push(built, "iter2", "org/open", token=TOKEN, endpoint=hub.url)
        assert hub.repos["org/open"]["commits"] == []
        result = push(built, "iter2", "org/open", private=False, token=TOKEN, endpoint=hub.url)
    assert (result.created, result.private) == (False, False)
    assert len(hub.repos["org/open"]["commits"]) == 1


@pytest.mark.parametrize("status, hint", [(401, "refused the token"), (403, "cannot write")])
def test_hub_errors_never_carry_the_token(built, hub_env, status, hint, capfd):
    _, logs = hub_env
    secret = "custom-secret-not-shaped-like-a-token"  # masked by value, not by pattern
    with StandInHub(reject=status) as hub, pytest.raises(SelmError) as caught:
        push(built, "iter2", "org/x", token=secret, endpoint=hub.url)
    assert any(secret in r["headers"].get("authorization", "") for r in hub.requests)
    text = "".join(traceback.format_exception(caught.value))
    assert hint in text and str(status) in text and "pushing snapshot iter2" in text
    assert caught.value.__cause__ is None and caught.value.__context__ is None
    out, err = capfd.readouterr()
    for where, seen in (("error", text), ("logs", "\n".join(logs)), ("stdout", out),
                        ("stderr", err)):
        assert secret not in seen, where


def test_push_needs_a_token_and_a_repo_id(built, hub_env):
    with pytest.raises(SelmError, match="ORG/NAME"):
        push(built, "iter2", "no-namespace", token=TOKEN)
    with pytest.raises(SelmError, match="no Hugging Face token: set HF_TOKEN"):
        push(built, "iter2", "org/x")
