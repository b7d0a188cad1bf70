"""`reasonspec serve` against requests that must not wedge it: prompts over the context, half-sent
requests, dropped streams, shutdown while engines work.

A real server process on 127.0.0.1 (the arith SpecReason pair, 2,048-token models), so that
its signals, sockets and log are the real ones; every socket and HTTP call has a timeout.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from orchestrator.config import PACKAGE_ROOT
from orchestrator.prompting import user_message
from orchestrator.server import SHUTDOWN_GRACE_S
from workers.hf_backend import CLOSE_TIMEOUT_S

CONFIG = "arith-v1/specreason"
MODEL = "arith-v1-specreason"
READ_TIMEOUT_S = 2.0  # the server's, shortened for the tests
STARTUP_TIMEOUT_S = 180
#: Shutdown bound: the grace for open requests, closing the engines, and the process's own exit.
SHUTDOWN_BOUND_S = SHUTDOWN_GRACE_S + CLOSE_TIMEOUT_S + 3
PROBLEM = "12 + 7 - 3 + 25"


@dataclass
class Server:
    process: subprocess.Popen
    url: str
    port: int
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> float:
        """``sig``, then the seconds until the process is gone (killed after a bound, to clean up)."""
        t0 = time.perf_counter()
        self.process.send_signal(sig)
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
            return float("inf")
        return time.perf_counter() - t0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(tmp: Path) -> Server:
    port = _free_port()
    log = tmp / f"server-{port}.log"
    cmd = [sys.executable, "-m", "orchestrator.cli", "serve", "--config", CONFIG, "--port", str(port),
           "--read-timeout", str(READ_TIMEOUT_S)]
    with log.open("wb") as fh:
        proc = subprocess.Popen(cmd, cwd=PACKAGE_ROOT, stdout=fh, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    server = Server(proc, f"http://127.0.0.1:{port}", port, log)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            pytest.fail(f"the server exited with {proc.returncode}:\n{server.log_text()[-3000:]}")
        try:
            if httpx.get(f"{server.url}/health", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            server.stop()
            pytest.fail(f"the server did not start within {STARTUP_TIMEOUT_S}s:\n{server.log_text()[-3000:]}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = _start(tmp_path_factory.mktemp("serve"))
    try:
        yield srv
    finally:
        srv.stop()


def _chat(problem: str, **extra: object) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": user_message(problem)}], **extra}


def _answers(server: Server) -> bool:
    r = httpx.post(f"{server.url}/v1/chat/completions", json=_chat(PROBLEM), timeout=60)
    return r.status_code == 200 and "\\boxed{" in r.json()["choices"][0]["message"]["content"]


# ---------------------------------------------------------------- prompts over the context


@pytest.mark.parametrize("content", ["1 + " * 1500 + "1", "1 + " * 15000 + "1", "1" * 900_000],
                         ids=["3k-tokens", "30k-tokens", "900k-characters"])
def test_a_prompt_over_the_context_is_400_context_length_exceeded(server: Server, content: str) -> None:
    t0 = time.perf_counter()
    r = httpx.post(f"{server.url}/v1/chat/completions", json=_chat(content), timeout=30)
    elapsed = time.perf_counter() - t0
    print(f"\n[serve] {len(content)}-character prompt: {r.status_code} in {elapsed:.3f}s")
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "context_length_exceeded" and error["param"] == "messages"
    assert "context is 2048 tokens" in error["message"]
    assert elapsed < 5
    assert _answers(server)  # and the server goes on


# ---------------------------------------------------------------- half-sent requests


def _until_closed(socks: list[socket.socket], since: float, limit: float) -> list[float]:
    """Seconds from ``since`` until the server closed each socket (inf: still open after ``limit``)."""
    closed = [float("inf")] * len(socks)
    open_ = dict(zip(socks, range(len(socks))))
    deadline = since + limit
    while open_ and time.perf_counter() < deadline:
        ready, _, _ = select.select(list(open_), [], [], max(0.0, deadline - time.perf_counter()))
        for s in ready:
            try:
                data = s.recv(65536)
            except ConnectionResetError:
                data = b""
            if not data:  # EOF: closed by the server (a response before it is read and dropped)
                closed[open_.pop(s)] = time.perf_counter() - since
    return closed


def test_stalled_connections_are_closed_and_others_served(server: Server) -> None:
    body = b'{"model": "' + MODEL.encode() + b'", "messages": [{"role": "user", "content": "1 + 1"}]}'
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n" % len(body))
    stalls = {
        "nothing sent": b"",
        "half the headers": head[:40],
        "headers, half the body": head + body[:20],
        "keep-alive, idle after a request": b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n",
    }
    per_kind = 10
    sockets = {name: [socket.create_connection(("127.0.0.1", server.port), timeout=5) for _ in range(per_kind)]
               for name in stalls}
    t0 = time.perf_counter()
    for name, sent in stalls.items():
        for s in sockets[name]:
            s.sendall(sent)
    served: list[bool] = []
    meanwhile = threading.Thread(target=lambda: served.append(_answers(server)), daemon=True)
    meanwhile.start()  # served while the stalled connections wait
    everything = [s for socks in sockets.values() for s in socks]
    closed = dict(zip(everything, _until_closed(everything, t0, READ_TIMEOUT_S + 20)))
    meanwhile.join(60)
    for s in everything:
        s.close()
    for name, socks in sockets.items():
        worst = max(closed[s] for s in socks)
        print(f"\n[serve] {name}: {per_kind} connections, all closed {worst:.2f}s after sending")
        assert worst < READ_TIMEOUT_S + 3, name
    assert served == [True]
    assert _answers(server)
    assert "Traceback" not in server.log_text()  # a closed stalled request is no server error


# ---------------------------------------------------------------- dropped streams


def test_a_dropped_stream_leaves_no_pending_task(tmp_path: Path) -> None:
    """The warning is logged when the abandoned task is garbage-collected: at the latest when the server exits."""
    srv = _start(tmp_path)
    try:
        for _ in range(3):
            with httpx.stream("POST", f"{srv.url}/v1/chat/completions", json=_chat("1 + " * 200 + "1", stream=True),
                              timeout=30) as r:
                assert r.status_code == 200
                next(r.iter_lines())  # the first chunk, then the client goes away
        time.sleep(1)
        assert _answers(srv)
    finally:
        elapsed = srv.stop()
    log = srv.log_text()
    assert "Task was destroyed but it is pending" not in log, log[-3000:]
    assert elapsed < SHUTDOWN_BOUND_S


# ---------------------------------------------------------------- shutdown


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_shutdown_is_prompt_whatever_the_engines_are_doing(tmp_path: Path, sig: signal.Signals) -> None:
    """A signal with long requests (plain and streamed) decoding and a 30k-token prompt sent: gone in seconds."""
    srv = _start(tmp_path)
    n_streams = 4
    streaming = threading.Semaphore(0)

    def request(body: dict) -> None:
        try:
            with httpx.stream("POST", f"{srv.url}/v1/chat/completions", json=body, timeout=120) as r:
                for i, _ in enumerate(r.iter_lines()):
                    if i == 4:  # a few segments in: the engines are decoding this one
                        streaming.release()
        except httpx.HTTPError:
            pass  # the server went away mid-request: expected

    long = "1 + " * 300 + "1"
    bodies = ([_chat("1 + " * 15000 + "1")] + [_chat(long, max_tokens=1600)] * 2
              + [_chat(long, stream=True, max_tokens=1600)] * n_streams)
    threads = [threading.Thread(target=request, args=(b,), daemon=True) for b in bodies]
    for t in threads:
        t.start()
    for _ in range(n_streams):
        assert streaming.acquire(timeout=60), "the streams did not start"
    elapsed = srv.stop(sig)
    for t in threads:
        t.join(10)
    print(f"\n[serve] {sig.name} with {len(bodies)} requests in flight: exited in {elapsed:.2f}s")
    assert elapsed < SHUTDOWN_BOUND_S, srv.log_text()[-3000:]
    assert srv.process.returncode is not None
