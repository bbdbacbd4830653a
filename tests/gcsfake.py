"""A scripted GCS server for the tests: `python gcsfake.py PORT`, objects in memory.

No GCS emulator installable here speaks the API that object_store (obstore, delta-rs, polars)
uses on gs://: its XML API (PUT/GET/HEAD/DELETE of `/<bucket>/<object>` and a bucket listing
`?list-type=2`). fake-gcs-server answers its uploads with "invalid uploadType" (its XML
support is an unmerged pull request) and gcp-storage-emulator sends no ETag and no listing.
Neither honoured put-if-absent either when tried on its JSON API (a second
`uploadType=media&ifGenerationMatch=0` of one name answered 200 and replaced it). So this is
the subset object_store needs, written from GCS's XML API documentation:

- PUT with ``x-goog-if-generation-match: 0`` creates only if absent, else 412 Precondition
  Failed: GCS's put-if-absent, which selm's leases and delta-rs's commits rely on.
- Every write gets a new generation (``x-goog-generation``) and Last-Modified; GET and HEAD
  answer with ETag and Last-Modified; GET honours ``Range``.

It is a stand-in that lets the tests run selm's GCS code end to end; passing here shows that
selm drives object_store's GCS client correctly, not that real GCS behaves as written here.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit
from xml.sax.saxutils import escape

import pytest

from s3server import PROXY, Proxy, free_port, wait_for_port

objects: dict[tuple[str, str], tuple[bytes, float, int]] = {}  # (bucket, key) -> data, mtime, gen
lock = threading.Lock()
generation = iter(range(1, 1 << 62))


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out apart: no 40 ms delayed-ACK stall

    def log_message(self, *args: object) -> None:
        pass

    def _target(self) -> tuple[str, str, dict[str, list[str]]]:
        parts = urlsplit(self.path)
        bucket, _, key = parts.path.lstrip("/").partition("/")
        return unquote(bucket), unquote(key), parse_qs(parts.query)

    def _reply(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None
               ) -> None:
        self.send_response(status)
        headers = {"Content-Length": str(len(body)), **(headers or {})}  # HEAD: the object's
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _meta(self, data: bytes, mtime: float, gen: int) -> dict[str, str]:
        return {"ETag": f'"{hashlib.md5(data).hexdigest()}"', "x-goog-generation": str(gen),
                "Last-Modified": formatdate(mtime, usegmt=True)}

    def do_PUT(self) -> None:
        auth = self.headers.get("Authorization", "")
        if auth:  # the bearer token object_store sends, kept where the test can read it
            objects[("seen", "authorization")] = (auth.encode(), time.time(), 0)
        bucket, key, _ = self._target()
        data = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        match = self.headers.get("x-goog-if-generation-match")
        with lock:
            current = objects.get((bucket, key))
            if match is not None and (current[2] if current else 0) != int(match):
                return self._reply(412, b"<Error><Code>PreconditionFailed</Code></Error>")
            entry = (data, time.time(), next(generation))
            objects[(bucket, key)] = entry
        self._reply(200, headers=self._meta(*entry))

    def do_GET(self) -> None:
        bucket, key, query = self._target()
        if not key:
            return self._list(bucket, query)
        with lock:
            entry = objects.get((bucket, key))
        if entry is None:
            return self._reply(404, b"<Error><Code>NoSuchKey</Code></Error>")
        data, headers = entry[0], self._meta(*entry)
        wanted = self.headers.get("Range")
        if wanted and wanted.startswith("bytes="):
            first, _, last = wanted[6:].partition("-")
            start = int(first) if first else max(len(data) - int(last), 0)
            end = min(int(last), len(data) - 1) if first and last else len(data) - 1
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            return self._reply(206, data[start:end + 1], headers)
        self._reply(200, data, headers)

    def do_HEAD(self) -> None:
        bucket, key, _ = self._target()
        with lock:
            entry = objects.get((bucket, key))
        if entry is None:
            return self._reply(404)
        self._reply(200, headers={**self._meta(*entry), "Content-Length": str(len(entry[0]))})

    def do_DELETE(self) -> None:
        bucket, key, _ = self._target()
        with lock:
            found = objects.pop((bucket, key), None)
        self._reply(204 if found else 404)

    def _list(self, bucket: str, query: dict[str, list[str]]) -> None:
        prefix = query.get("prefix", [""])[0]
        delimiter = query.get("delimiter", [""])[0]
        after = query.get("start-after", [""])[0]
        with lock:
            keys = sorted((k, v) for (b, k), v in objects.items()
                          if b == bucket and k.startswith(prefix) and k > after)
        contents, prefixes = [], set()
        for key, (data, mtime, _) in keys:
            rest = key[len(prefix):]
            if delimiter and delimiter in rest:
                prefixes.add(prefix + rest.split(delimiter, 1)[0] + delimiter)
                continue
            stamp = datetime.fromtimestamp(mtime, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3]
            etag = hashlib.md5(data).hexdigest()
            contents.append(f"<Contents><Key>{escape(key)}</Key><LastModified>{stamp}Z"
                            f"</LastModified><Size>{len(data)}</Size><ETag>&quot;{etag}&quot;"
                            "</ETag></Contents>")
        common = "".join(f"<CommonPrefixes><Prefix>{escape(p)}</Prefix></CommonPrefixes>"
                         for p in sorted(prefixes))
        body = (f'<?xml version="1.0" encoding="UTF-8"?><ListBucketResult><Name>{bucket}</Name>'
                f"<Prefix>{escape(prefix)}</Prefix><KeyCount>{len(contents)}</KeyCount>"
                f"<IsTruncated>false</IsTruncated>{''.join(contents)}{common}</ListBucketResult>")
        self._reply(200, body.encode(), {"Content-Type": "application/xml"})


# --- the fixtures: the server in its own process, the environment pointed at it -------------

BUCKET = "selm-tests"
SECRET = f"planted-gcs-secret-{uuid.uuid4().hex}"


@dataclass
class GcsFake:
    endpoint: str
    process: subprocess.Popen[bytes]
    secret: str = SECRET
    bucket: str = BUCKET

    def objects(self) -> dict[str, bytes]:
        """Every object in the test bucket: the store as the server holds it."""
        import obstore
        from obstore.store import from_url

        store = from_url(f"gs://{BUCKET}")
        keys = [meta["path"] for chunk in obstore.list(store) for meta in chunk]
        return {key: bytes(obstore.get(store, key).bytes()) for key in keys}


def service_account(folder: Path, endpoint: str) -> Path:
    """A service-account file as object_store's own tests use for a local server: its
    `gcs_base_url` points at the server, `disable_oauth` sends no token. The private key is a
    planted secret (never sent, since oauth is off) that must be found nowhere."""
    path = folder / f"service-account-{uuid.uuid4().hex[:6]}.json"
    path.write_text(json.dumps({"gcs_base_url": endpoint, "disable_oauth": True,
                                "client_email": "selm-tests@example.iam.gserviceaccount.com",
                                "private_key_id": "k1", "private_key": SECRET}))
    return path


@pytest.fixture(scope="module")
def gcs_fake(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GcsFake]:
    from helpers import require

    require("obstore", "'selm[cloud]'")
    folder = tmp_path_factory.mktemp("gcsfake")
    port = free_port()
    process = subprocess.Popen([sys.executable, __file__, str(port)])
    endpoint = f"http://127.0.0.1:{port}"
    with pytest.MonkeyPatch.context() as mp:
        for key in list(os.environ):
            if key.startswith("GOOGLE_"):
                mp.delenv(key)
        mp.setenv("GOOGLE_SERVICE_ACCOUNT", str(service_account(folder, endpoint)))
        # a credential in the environment as a user's would be; with oauth off it is not sent
        mp.setenv("GOOGLE_BEARER_TOKEN", SECRET)
        try:
            wait_for_port(port)
            yield GcsFake(endpoint, process)
        finally:
            process.terminate()
            process.wait(10)


@pytest.fixture
def gs_uri(gcs_fake: GcsFake) -> str:
    return f"gs://{BUCKET}/{uuid.uuid4().hex[:12]}/store"


@pytest.fixture
def gcs_proxy(gcs_fake: GcsFake, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
              ) -> Iterator[Proxy]:
    """tests/cutproxy.py in front of the server, and the service account pointed at it."""
    port = free_port()
    process = subprocess.Popen([sys.executable, str(PROXY), str(port),
                                gcs_fake.endpoint.rsplit(":", 1)[1]])
    try:
        wait_for_port(port)
        endpoint = f"http://127.0.0.1:{port}"
        monkeypatch.setenv("GOOGLE_SERVICE_ACCOUNT", str(service_account(tmp_path, endpoint)))
        yield Proxy(endpoint, process)
    finally:
        process.terminate()
        process.wait(10)


if __name__ == "__main__":
    ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
