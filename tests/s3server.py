"""A real S3-compatible server for the tests: moto's server mode in its own process on
127.0.0.1, and a TCP proxy in front of it that can refuse connections (failure injection).

Separate processes, not threads: delta-rs and pyarrow block in native code, and a server
thread in the test's own interpreter can then stall with them.

The environment is what a user's would be: AWS_* variables read by delta-rs, polars, pyarrow
and boto3 alike. The secret key is a planted value that tests look for everywhere afterwards.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

PROXY = Path(__file__).with_name("cutproxy.py")
BUCKET = "selm-tests"
SECRET = f"planted-secret-{uuid.uuid4().hex}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


@dataclass
class S3Server:
    endpoint: str
    env: dict[str, str]  # the AWS_* variables a process needs to reach it
    process: subprocess.Popen[bytes]

    def objects(self) -> dict[str, bytes]:
        """Every object in the test bucket: the store as the server holds it."""
        import boto3

        client = boto3.client("s3", endpoint_url=self.endpoint)
        out = {}
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
            for obj in page.get("Contents", []):
                out[obj["Key"]] = client.get_object(Bucket=BUCKET, Key=obj["Key"])["Body"].read()
        return out


def aws_env(endpoint: str) -> dict[str, str]:
    return {
        "AWS_ACCESS_KEY_ID": "selm-test-key-id",
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_REGION": "us-east-1",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ALLOW_HTTP": "true",
    }


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """moto's S3 server for this module, with the AWS_* environment set to reach it."""
    pytest.importorskip("moto", reason="install the test extra: pip install 'selm[test]'")
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "server.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=out, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    env = aws_env(endpoint)
    with pytest.MonkeyPatch.context() as mp:
        for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_S3_ALLOW_UNSAFE_RENAME"):
            mp.delenv(key, raising=False)
        for key, value in env.items():
            mp.setenv(key, value)
        try:
            wait_for_port(port)
            import boto3

            boto3.client("s3").create_bucket(Bucket=BUCKET)
            yield S3Server(endpoint, env, process)
        finally:
            process.terminate()
            process.wait(10)


@pytest.fixture
def s3_uri(s3_server: S3Server) -> str:
    """A fresh store URI in the test bucket."""
    return f"s3://{BUCKET}/{uuid.uuid4().hex[:12]}/store"


@dataclass
class Proxy:
    """A TCP proxy to the server; `cut()` resets every connection and refuses new ones
    (the server dropping requests), `mend()` forwards again."""

    endpoint: str
    process: subprocess.Popen[bytes]

    def cut(self) -> None:
        self.process.send_signal(signal.SIGUSR1)
        time.sleep(0.2)

    def cut_at_next_commit(self) -> None:
        self.process.send_signal(signal.SIGHUP)
        time.sleep(0.2)

    def lose_next_commit_reply(self) -> None:
        self.process.send_signal(signal.SIGALRM)
        time.sleep(0.2)

    def mend(self) -> None:
        self.process.send_signal(signal.SIGUSR2)
        time.sleep(0.2)


@pytest.fixture
def proxy(s3_server: S3Server) -> Iterator[Proxy]:
    port = free_port()
    target = s3_server.endpoint.rsplit(":", 1)[1]
    process = subprocess.Popen([sys.executable, str(PROXY), str(port), target])
    try:
        wait_for_port(port)
        yield Proxy(f"http://127.0.0.1:{port}", process)
    finally:
        process.terminate()
        process.wait(10)


def child_env(**extra: str) -> dict[str, str]:
    """The environment for a subprocess: ours (with AWS_*), our code first on the path."""
    root = str(Path(__file__).resolve().parents[1])
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": root + (os.pathsep + path if path else ""), **extra}
