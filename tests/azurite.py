"""A real Azure Blob server for the tests: Azurite (Microsoft's emulator, from npm) in its own
process on 127.0.0.1, with an account whose key is a planted secret the tests look for
everywhere afterwards.

The environment is what a user's would be, read by delta-rs, polars and obstore alike:
AZURE_STORAGE_ACCOUNT_NAME / AZURE_STORAGE_ACCOUNT_KEY, plus AZURE_STORAGE_USE_EMULATOR and
AZURITE_BLOB_STORAGE_URL, object_store's switch to an emulator at a given address.

Azurite is found at $AZURITE_BLOB (a path to `azurite-blob`), else where `make test` installs it
(`<venv>/azurite/node_modules/.bin/azurite-blob`), else on PATH. Missing, the tests skip, or
fail under SELM_REQUIRE_OPTIONAL=1 (as `make test` runs): CI cannot pass by skipping them.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import shutil
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from email.utils import formatdate
from pathlib import Path

import pytest

from s3server import PROXY, Proxy, free_port, wait_for_port

ACCOUNT = "selmtest"
CONTAINER = "selm-tests"
# A valid account key (Azure keys are base64) that exists only in this test run.
SECRET = base64.b64encode(f"planted-azure-key-{uuid.uuid4().hex}".encode()).decode()
INSTALL = "make test (npm install --prefix .venv/azurite azurite@3.37.0)"


def azurite_binary() -> str:
    candidates = [os.environ.get("AZURITE_BLOB", ""),
                  str(Path(sys.prefix) / "azurite" / "node_modules" / ".bin" / "azurite-blob"),
                  shutil.which("azurite-blob") or ""]
    found = next((c for c in candidates if c and Path(c).is_file()), None)
    if found is None:
        reason = f"needs Azurite: {INSTALL}"
        if os.environ.get("SELM_REQUIRE_OPTIONAL") == "1":
            pytest.fail(f"Azurite is required here (SELM_REQUIRE_OPTIONAL=1): {reason}")
        pytest.skip(reason)
    return found


def azure_env(endpoint: str) -> dict[str, str]:
    return {
        "AZURE_STORAGE_ACCOUNT_NAME": ACCOUNT,
        "AZURE_STORAGE_ACCOUNT_KEY": SECRET,
        "AZURE_STORAGE_USE_EMULATOR": "true",
        "AZURITE_BLOB_STORAGE_URL": endpoint,
    }


def create_container(endpoint: str, name: str) -> None:
    """Create a container: one request signed with the account key (Shared Key), which is
    all an Azure SDK would do here."""
    date, version = formatdate(usegmt=True), "2021-08-06"
    to_sign = (f"PUT\n{chr(10) * 11}x-ms-date:{date}\nx-ms-version:{version}\n"
               f"/{ACCOUNT}/{ACCOUNT}/{name}\nrestype:container")
    signature = base64.b64encode(hmac.new(base64.b64decode(SECRET), to_sign.encode(),
                                          hashlib.sha256).digest()).decode()
    request = urllib.request.Request(
        f"{endpoint}/{ACCOUNT}/{name}?restype=container", method="PUT",
        headers={"x-ms-date": date, "x-ms-version": version, "Content-Length": "0",
                 "Authorization": f"SharedKey {ACCOUNT}:{signature}"})
    urllib.request.urlopen(request, timeout=10).close()


@dataclass
class Azurite:
    endpoint: str
    process: subprocess.Popen[bytes]
    log: Path
    secret: str = SECRET
    bucket: str = CONTAINER

    def objects(self) -> dict[str, bytes]:
        """Every blob in the test container: the store as the server holds it."""
        import obstore
        from obstore.store import AzureStore

        store = AzureStore(CONTAINER, account_name=ACCOUNT, account_key=SECRET,
                           use_emulator=True)
        keys = [meta["path"] for chunk in obstore.list(store) for meta in chunk]
        return {key: bytes(obstore.get(store, key).bytes()) for key in keys}


@pytest.fixture(scope="module")
def azurite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Azurite]:
    """Azurite's blob service for this module, with the Azure environment set to reach it."""
    binary = azurite_binary()
    from helpers import require

    require("obstore", "'selm[cloud]'")
    port = free_port()
    folder = tmp_path_factory.mktemp("azurite")
    log = folder / "server.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [binary, "--blobHost", "127.0.0.1", "--blobPort", str(port),
             "--inMemoryPersistence", "--skipApiVersionCheck", "--silent"],
            stdout=out, stderr=subprocess.STDOUT, cwd=folder,
            env={**os.environ, "AZURITE_ACCOUNTS": f"{ACCOUNT}:{SECRET}"})
    endpoint = f"http://127.0.0.1:{port}"
    with pytest.MonkeyPatch.context() as mp:
        for key in list(os.environ):
            if key.startswith(("AZURE_", "AZURITE_")):
                mp.delenv(key)
        for key, value in azure_env(endpoint).items():
            mp.setenv(key, value)
        try:
            wait_for_port(port)
            create_container(endpoint, CONTAINER)
            yield Azurite(endpoint, process, log)
        finally:
            stop(process)


def stop(process: subprocess.Popen[bytes]) -> None:
    """Node may hold SIGTERM while connections stay open: then it is killed."""
    process.terminate()
    try:
        process.wait(5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)


@pytest.fixture
def az_uri(azurite: Azurite) -> str:
    """A fresh store URI in the test container."""
    return f"az://{CONTAINER}/{uuid.uuid4().hex[:12]}/store"


@pytest.fixture
def azure_proxy(azurite: Azurite, monkeypatch: pytest.MonkeyPatch) -> Iterator[Proxy]:
    """tests/cutproxy.py in front of Azurite, and the environment pointed at it."""
    port = free_port()
    target = azurite.endpoint.rsplit(":", 1)[1]
    process = subprocess.Popen([sys.executable, str(PROXY), str(port), target])
    try:
        wait_for_port(port)
        monkeypatch.setenv("AZURITE_BLOB_STORAGE_URL", f"http://127.0.0.1:{port}")
        yield Proxy(f"http://127.0.0.1:{port}", process)
    finally:
        process.terminate()
        process.wait(10)
