"""Local stand-ins for the services a deployment uses, started and stopped by the project itself.

``LocalS3``: an S3-compatible endpoint on localhost (moto in server mode, what s3fs's own
tests use), for the tests, the object-store benchmark and trying a bucket-backed project
on one machine. It runs as a child process on a free port, is waited for until it answers,
and is always stopped (terminated, then killed) on the way out::

    with LocalS3() as s3:
        s3.make_bucket("pool")
        os.environ.update(s3.env)  # AWS_ENDPOINT_URL and dummy credentials

moto comes with the ``dev`` extra; nothing here is imported by the pipeline.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

START_TIMEOUT_S = 30.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LocalS3:
    """moto's S3 server on ``127.0.0.1:<free port>``; ``env`` points boto/s3fs at it."""

    def __init__(self, log_file: str | os.PathLike[str] | None = None):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log_file = Path(log_file) if log_file else None
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def start(self) -> LocalS3:
        sink = open(self.log_file, "ab") if self.log_file else subprocess.DEVNULL  # noqa: SIM115
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=sink,
                stderr=subprocess.STDOUT,
            )
        finally:
            if sink is not subprocess.DEVNULL:
                sink.close()
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the local S3 server exited at start (code {self.process.returncode})")
            with contextlib.suppress(urllib.error.URLError, ConnectionError, TimeoutError):
                urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=1).close()
                return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(
            f"the local S3 server did not answer on {self.endpoint} in {START_TIMEOUT_S:.0f} s"
        )

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.process = None

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, **_credentials(self.env))

    def make_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return f"s3://{name}"

    def upload_tree(self, local: str | os.PathLike[str], url: str) -> int:
        """Upload every file under ``local`` to ``s3://bucket/prefix``; returns the file count."""
        client = self.client()
        bucket, _, prefix = url.removeprefix("s3://").partition("/")
        count = 0
        for path in sorted(p for p in Path(local).rglob("*") if p.is_file()):
            key = "/".join(part for part in (prefix.rstrip("/"), path.relative_to(local).as_posix()) if part)
            client.upload_file(str(path), bucket, key)
            count += 1
        return count

    def __enter__(self) -> LocalS3:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _credentials(env: dict[str, str]) -> dict[str, str]:
    return {
        "aws_access_key_id": env["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": env["AWS_SECRET_ACCESS_KEY"],
        "region_name": env["AWS_DEFAULT_REGION"],
    }
