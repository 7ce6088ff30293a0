"""Local stand-ins for the services a deployment uses, started and stopped by the project itself.

- ``LocalS3``: an S3-compatible endpoint on localhost (moto in server mode, what s3fs's own
  tests use), for the tests, the object-store benchmark and trying a bucket-backed project;
- ``LocalPostgres``: a PostgreSQL server from the system packages (``initdb`` / ``pg_ctl``,
  run as the ``postgres`` user when we are root, which PostgreSQL refuses to run as), in a
  data folder of its own, for the Dagster instance's run, event-log and schedule storage;
- ``LocalRedis``: a Redis server from the system packages, the celery broker;
- ``CeleryWorkers``: ``dagster-celery`` workers that run the steps of runs whose executor is
  celery.

Each runs as child processes on a free port, is waited for until it answers, and is always
stopped (terminated, then killed) on the way out::

    with LocalS3() as s3:
        s3.make_bucket("pool")
        os.environ.update(s3.env)  # AWS_ENDPOINT_URL and dummy credentials

``python -m curation_assets.services start|stop|status`` (``make services``) keeps a Postgres
and a Redis running for development, idempotently, and says where they listen. moto comes
with the ``dev`` extra, the celery and Postgres clients with ``cluster``; nothing here is
imported by the pipeline.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
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
        """Upload every file under ``local`` to ``s3://bucket/prefix`` (concurrently); the file count."""
        import s3fs

        fs = s3fs.S3FileSystem(
            endpoint_url=self.endpoint, key="testing", secret="testing", skip_instance_cache=True
        )
        files = sorted(p for p in Path(local).rglob("*") if p.is_file())
        base = url.removeprefix("s3://").rstrip("/")
        fs.put([str(p) for p in files], [f"{base}/{p.relative_to(local).as_posix()}" for p in files])
        return len(files)

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


# ----------------------------------------------------------------------------- PostgreSQL


class ServiceError(RuntimeError):
    """A local service that cannot be started (a binary missing, a port that never answers)."""


def find_binary(name: str, package: str, versioned: str | None = None) -> str:
    """A server binary on PATH, else under a versioned folder (Debian: /usr/lib/postgresql/<v>/bin)."""
    candidates = sorted(Path("/").glob(versioned), reverse=True) if versioned else []
    found = shutil.which(name) or (str(candidates[0]) if candidates else None)
    if not found:
        raise ServiceError(
            f"{name} is not installed: install the system package {package} (`make services` does)"
        )
    return found


def _as_service_user(command: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: run it as the ``postgres`` system user then."""
    if os.geteuid() != 0:
        return command
    return ["runuser", "-u", "postgres", "--", *command]


def _wait_for_port(port: int, process: subprocess.Popen | None, what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise ServiceError(f"{what} exited at start (code {process.returncode})")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.1)
    raise ServiceError(f"{what} did not answer on 127.0.0.1:{port} in {START_TIMEOUT_S:.0f} s")


class LocalPostgres:
    """A PostgreSQL server on ``127.0.0.1:<port>`` with a ``dagster`` database, trust auth (local only)."""

    def __init__(self, folder: str | os.PathLike[str] | None = None, port: int | None = None):
        # PostgreSQL runs as its own user, who must reach the folder: not below a root-only temp dir
        self.owned = folder is None  # a temporary folder of ours: removed when the server stops
        self.folder = Path(folder) if folder else Path(tempfile.mkdtemp(prefix="curation-pg-"))
        self.port = port or free_port()
        self.data = self.folder / "data"
        self.pg_ctl = find_binary("pg_ctl", "postgresql", "usr/lib/postgresql/*/bin/pg_ctl")
        self.bin = Path(self.pg_ctl).resolve().parent

    @property
    def url(self) -> str:
        return f"postgresql://curation@127.0.0.1:{self.port}/dagster"

    def _run(self, *command: str) -> None:
        subprocess.run(_as_service_user(list(command)), check=True, capture_output=True, timeout=120)

    def start(self) -> LocalPostgres:
        self.folder.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(self.folder, "postgres", "postgres")
        if not (self.data / "PG_VERSION").is_file():
            self._run(
                str(self.bin / "initdb"), "-D", str(self.data), "-U", "curation", "--auth=trust", "-E", "UTF8"
            )
        if not self.running():
            options = f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c fsync=off"
            self._run(
                self.pg_ctl,
                "-D",
                str(self.data),
                "-o",
                options,
                "-l",
                str(self.folder / "log"),
                "-w",
                "start",
            )
        _wait_for_port(self.port, None, "postgres")
        client = ["-h", "127.0.0.1", "-p", str(self.port), "-U", "curation"]
        exists = "SELECT 1 FROM pg_database WHERE datname = 'dagster'"
        found = subprocess.run(
            [str(self.bin / "psql"), *client, "-d", "postgres", "-tAc", exists],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout.strip()
        if found != "1":
            subprocess.run(
                [str(self.bin / "createdb"), *client, "dagster"], check=True, capture_output=True, timeout=60
            )
        return self

    def running(self) -> bool:
        result = subprocess.run(
            _as_service_user([self.pg_ctl, "-D", str(self.data), "status"]), capture_output=True, timeout=30
        )
        return result.returncode == 0

    def stop(self) -> None:
        if (self.data / "postmaster.pid").is_file():
            subprocess.run(
                _as_service_user([self.pg_ctl, "-D", str(self.data), "-m", "fast", "-w", "stop"]),
                capture_output=True,
                timeout=60,
            )
        if self.owned:
            shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> LocalPostgres:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ----------------------------------------------------------------------------- Redis


class LocalRedis:
    """A Redis server on ``127.0.0.1:<port>``, nothing persisted (a broker, not a database)."""

    def __init__(self, port: int | None = None, log_file: str | os.PathLike[str] | None = None):
        self.port = port or free_port()
        self.server = find_binary("redis-server", "redis-server")
        self.log_file = log_file
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def command(self) -> list[str]:
        return [
            self.server,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ]

    def start(self) -> LocalRedis:
        self.process = subprocess.Popen(self.command(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_for_port(self.port, self.process, "redis-server")
        return self

    def stop(self) -> None:
        _stop(self.process)
        self.process = None

    def __enter__(self) -> LocalRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _stop(process: subprocess.Popen | None, timeout: float = 20.0) -> None:
    """Terminate a child (and its process group when it leads one), then kill it if it lingers."""
    if process is None or process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM) if _leads_group(process) else process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL) if _leads_group(process) else process.kill()
        process.wait(timeout)


def _leads_group(process: subprocess.Popen) -> bool:
    with contextlib.suppress(ProcessLookupError):
        return os.getpgid(process.pid) == process.pid
    return False


# ----------------------------------------------------------------------------- celery workers


class CeleryWorkers:
    """``count`` dagster-celery workers on ``broker``, each its own process group (its pool children
    are stopped with it). They inherit this process's environment (instance, store, projects)."""

    def __init__(self, broker: str, count: int = 2, concurrency: int = 1, log_folder: Path | None = None):
        self.broker, self.count, self.concurrency = broker, count, concurrency
        self.log_folder = log_folder
        self.processes: list[subprocess.Popen[bytes]] = []

    def start(self) -> CeleryWorkers:
        folder = self.log_folder or Path(tempfile.mkdtemp(prefix="curation-celery-"))
        folder.mkdir(parents=True, exist_ok=True)
        config = folder / "celery.yaml"
        config.write_text(json.dumps({"execution": {"config": self.executor_config()}}))
        logs = [folder / f"worker-{index}.log" for index in range(self.count)]
        # dagster-celery starts the `celery` command by name: the one beside this interpreter
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        for index, path in enumerate(logs):
            with open(path, "ab") as log:  # the child keeps its own copy of the descriptor
                self.processes.append(
                    subprocess.Popen(
                        [
                            sys.executable,
                            "-m",
                            "dagster_celery.cli",
                            "worker",
                            "start",
                            "-A",
                            "dagster_celery.app",
                            "-y",
                            str(config),
                            "-n",
                            f"curation-{index}",
                            "-l",
                            "INFO",
                            "--",
                            "--concurrency",
                            str(self.concurrency),
                        ],
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,  # its own process group: stop() takes its children too
                        env=env,
                    )
                )
        try:
            self._wait_ready(logs)
        except ServiceError:
            self.stop()
            raise
        return self

    def _wait_ready(self, logs: list[Path]) -> None:
        """Until every worker logs that it is ready (connected to the broker, consuming)."""
        deadline = time.monotonic() + 2 * START_TIMEOUT_S
        while time.monotonic() < deadline:
            for process, log in zip(self.processes, logs, strict=True):
                if process.poll() is not None:
                    tail = log.read_text(errors="replace").strip().splitlines()[-3:]
                    raise ServiceError(f"celery worker exited at start: {' | '.join(tail)}")
            if all(" ready." in log.read_text(errors="replace") for log in logs):
                return
            time.sleep(0.25)
        raise ServiceError(
            f"celery workers not ready in {2 * START_TIMEOUT_S:.0f} s (logs: {logs[0].parent})"
        )

    def executor_config(self) -> dict:
        from curation_assets.assets.project import celery_config

        return {**celery_config(self.broker), "backend": self.broker}

    def pids(self) -> list[int]:
        return [p.pid for p in self.processes if p.poll() is None]

    def stop(self) -> None:
        for process in self.processes:
            _stop(process)
        self.processes = []

    def __enter__(self) -> CeleryWorkers:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ----------------------------------------------------------------------------- make services


def _state_file(home: Path) -> Path:
    return home / "services" / "services.json"


def main(argv: Sequence[str] | None = None) -> int:
    """``start``: a Postgres and a Redis for development (kept running; again: nothing to do),
    ``stop``: stop them, ``status``: say where they listen."""
    from curation_assets.config import curation_home

    parser = argparse.ArgumentParser(prog="python -m curation_assets.services")
    parser.add_argument("action", choices=["start", "stop", "status"])
    args = parser.parse_args(argv)
    home = curation_home()
    state_path = _state_file(home)
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    postgres_folder = home / "services" / "postgres"
    if args.action == "start":
        postgres = LocalPostgres(postgres_folder, port=state.get("postgres_port") or 55432)
        postgres.start()
        redis_port = state.get("redis_port") or 56379
        if not _answers(redis_port):
            redis = LocalRedis(redis_port)
            subprocess.Popen(
                redis.command(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
            )
            _wait_for_port(redis_port, None, "redis-server")
        state = {
            "postgres_port": postgres.port,
            "redis_port": redis_port,
            "postgres_url": postgres.url,
            "redis_url": f"redis://127.0.0.1:{redis_port}/0",
        }
        state_path.parent.mkdir(parents=True, exist_ok=True)
        state_path.write_text(json.dumps(state, indent=2))
    elif args.action == "stop":
        if state:
            LocalPostgres(postgres_folder, port=state["postgres_port"]).stop()
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", state["redis_port"]), 2) as s,
            ):
                s.sendall(b"SHUTDOWN NOSAVE\r\n")
        print("services stopped")
        return 0
    if not state:
        print("no services started here (make services)")
        return 1
    for name in ("postgres", "redis"):
        up = _answers(state[f"{name}_port"])
        print(f"{name:<9}{'up  ' if up else 'down'}  {state[f'{name}_url']}")
    if all(_answers(state[f"{name}_port"]) for name in ("postgres", "redis")):
        print(
            f"use them: curate init-instance --postgres {state['postgres_url']}; "
            f"CURATION_CELERY_BROKER={state['redis_url']}"
        )
    return 0


def _answers(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        return True
    return False


if __name__ == "__main__":
    sys.exit(main())
