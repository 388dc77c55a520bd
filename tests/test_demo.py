"""``redis-batcher demo``: end to end in subprocesses, on its own throwaway server and on a given one."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from typing import Any

import pytest
import redis

from redis_batcher import demo, demo_report, wake
from redis_batcher.testing import RedisServer
from tests.conftest import subprocess_env

DEMO_TIMEOUT = 60


def run_demo_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = subprocess_env()
    env.pop("REDIS_URL", None)  # the demo must not pick up anybody's Redis by itself
    env["COLUMNS"] = "120"
    return subprocess.run(
        [sys.executable, "-m", "redis_batcher", "demo", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=DEMO_TIMEOUT,
    )


def summary_value(output: str, metric: str) -> str:
    """The value cell of a row of the summary table (printed after the live progress)."""
    table = output.partition("demo summary")[2]
    match = re.search(rf"^\W*{re.escape(metric)}\s*│\s*(.+?)\s*│$", table, re.MULTILINE)
    assert match, f"no {metric!r} row in the summary:\n{output}"
    return match.group(1)


def check_summary(result: subprocess.CompletedProcess[str], items: int) -> None:
    output = result.stdout
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{output}\nstderr:\n{result.stderr}"
    assert "demo summary" in output
    assert summary_value(output, "items") == f"{items:,}"
    assert summary_value(output, "added") == f"{items:,}"
    assert summary_value(output, "delivered") == f"{items:,}"
    assert summary_value(output, "lost") == "0"
    assert summary_value(output, "duplicates") == "0"
    flushes = int(summary_value(output, "flushes").replace(",", ""))
    assert items / 100 <= flushes <= items
    for metric in ("mean batch size", "wall time", "throughput", "latency p50", "latency p99"):
        assert re.search(r"\d", summary_value(output, metric)), metric
    assert f"demo OK: {items:,} of {items:,} items delivered" in output


@pytest.mark.slow
def test_demo_on_a_throwaway_server() -> None:
    started = time.monotonic()
    result = run_demo_cli("--items", "3000")
    elapsed = time.monotonic() - started
    check_summary(result, 3000)
    assert elapsed < 20, f"the demo took {elapsed:.1f} s"
    # the throwaway server is gone
    match = re.search(r"throwaway redis-server redis://127\.0\.0\.1:(\d+)/0", result.stdout)
    assert match, result.stdout
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", int(match.group(1))), timeout=1).close()


@pytest.mark.slow
def test_demo_on_a_given_server_touches_only_demo_keys(redis_server: RedisServer) -> None:
    client = redis.Redis(host="127.0.0.1", port=redis_server.port)
    try:
        client.set("app:sentinel", "keep me")
        client.hset("app:hash", mapping={"a": "1"})
        client.sadd(demo.IDS_KEY, 10**9)  # stale state of an earlier run: cleaned before running
        result = run_demo_cli("--redis-url", redis_server.url, "--items", "2000", "--producers", "2")
        check_summary(result, 2000)
        assert client.get("app:sentinel") == b"keep me"
        assert client.hgetall("app:hash") == {b"a": b"1"}
        assert list(client.scan_iter(match=demo.DEMO_KEYS_PATTERN)) == []
    finally:
        client.delete("app:sentinel", "app:hash")
        client.close()


def processes_mentioning(text: str) -> list[str]:
    """Command lines of running processes that contain ``text`` (Linux /proc)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline and int(pid) != os.getpid():
            found.append(cmdline)
    return found


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs /proc to look for leftover processes")
def test_ctrl_c_stops_producers_worker_and_cleans_up(redis_server: RedisServer) -> None:
    """SIGINT to the whole process group (Ctrl-C): exit 130, no worker or producer left connected."""
    client = redis.Redis(host="127.0.0.1", port=redis_server.port)
    channel = demo.batcher.get_processor(demo.PROCESSOR_NAME).keys.channels[0]
    # reset SIGINT to the default in case this test runs with it ignored (a background job)
    launcher = (
        "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
        "os.execv(sys.argv[1], sys.argv[1:])"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", launcher, sys.executable, "-m", "redis_batcher", "demo",
         "--redis-url", redis_server.url, "--items", "5000000"],
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 20
        while not client.hget(demo.COUNTERS_KEY, "flushes"):  # producers and worker are running
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the demo did not start delivering"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    try:
        assert proc.returncode == 130, f"stdout:\n{stdout}\nstderr:\n{stderr}"
        assert "interrupted" in stdout
        assert "Traceback" not in stdout + stderr
        assert wake.subscribers(client, channel) == 0
        assert [c for c in processes_mentioning(redis_server.url) if "redis_batcher" in c] == []
        assert list(client.scan_iter(match=demo.DEMO_KEYS_PATTERN)) == []
    finally:
        client.close()
        try:  # whatever the outcome, leave nothing of the demo running
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_worker_module_reads_its_config_from_the_environment() -> None:
    env = subprocess_env()
    env.update({
        demo.ENV_URL: "redis://127.0.0.1:1/0",  # nothing listens there: importing must not connect
        demo.ENV_MAX_BATCH_SIZE: "7",
        demo.ENV_FLUSH_INTERVAL: "0.25",
    })
    code = (
        "import redis_batcher.demo as d; c = d.deliver.config; "
        "print(d.batcher.url, c.max_batch_size, c.flush_interval)"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["redis://127.0.0.1:1/0", "7", "0.25"]


def test_summary_and_redact() -> None:
    s = demo_report.Summary(items=10, added=10, delivered=11, unique=10, flushes=2, wall_time=2.0,
                            latencies=[float(v) for v in range(1, 101)])
    assert (s.lost, s.duplicates, s.mean_batch_size, s.throughput) == (0, 1, 5.5, 5.0)
    assert (s.percentile(50), s.percentile(99), s.percentile(100)) == (50.0, 99.0, 100.0)
    assert demo_report.Summary(1, 1, 0, 0, 0, 0.0, []).percentile(50) is None
    assert demo.redact("redis://:secret@127.0.0.1:7000/0") == "redis://:***@127.0.0.1:7000/0"
    assert demo.redact("redis://user:pw@host/1") == "redis://user:***@host/1"
    assert demo.redact("redis://127.0.0.1:7000/0") == "redis://127.0.0.1:7000/0"


def test_a_signal_while_a_server_starts_never_leaves_it_running(monkeypatch: pytest.MonkeyPatch) -> None:
    # SIGTERM arriving inside Popen (as the handler of a stopped benchmark raises SystemExit):
    # the server is recorded first, so start() stops it on the way out
    from redis_batcher.testing import servers as embedded

    started: list[subprocess.Popen[bytes]] = []
    real_popen = subprocess.Popen

    def popen(*args: Any, **kwargs: Any) -> subprocess.Popen[bytes]:
        proc = real_popen(*args, **kwargs)
        started.append(proc)
        os.kill(os.getpid(), signal.SIGTERM)  # its handler runs before this returns
        return proc

    monkeypatch.setattr(embedded.subprocess, "Popen", popen)
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        with pytest.raises(SystemExit):
            embedded.RedisServer().start()
        assert len(started) == 1 and started[0].poll() is not None  # stopped, not left running
    finally:
        signal.signal(signal.SIGTERM, previous)
        for proc in started:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
