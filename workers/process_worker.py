"""Any local worker in a process of its own, without Ray.

Two hf engines in one process share its GIL: the Python work between their
kernels takes turns, so a policy that keeps both models busy at once (a draft
made while the large model verifies, a step drafted while it judges) gains
nothing, and each call gets slower while the other model runs. ``ProcessWorker``
builds the worker (from a factory, as the Ray actor does) in a child Python
process and forwards the protocol to it over a socket pair:

- one pickled message each way per call; the child serves every call at once
  (each its own task), so concurrent requests still batch in the backend;
- a call cancelled here is cancelled there (the backend drops the request);
- a child that fails to build its worker, or dies, fails every call in flight and
  every later one with a ``WorkerError`` naming the model; a parent that dies
  closes the socket, and the child exits.

The child is a fresh interpreter (``python -m workers.process_worker``), not a
fork (a forked process would inherit torch's thread pools) and not
``multiprocessing``'s spawn (which re-runs the parent's main script). Writes go
through a thread of their own in the parent, so a large request never blocks its
event loop, which keeps reading answers; the child answers from its event loop
(a thread hop there, next to a busy engine thread, costs more than the write).
"""

from __future__ import annotations

import asyncio
import itertools
import pickle
import queue
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from workers.protocol import Worker, WorkerError, forwarding

#: How long ``close`` lets the child shut its engine down before killing it.
CLOSE_GRACE_S = 30.0
_BUILD = -1  # the message id of the child's answer to building its worker


class _Sender:
    """Sends messages on ``conn`` from a thread of its own, in order."""

    def __init__(self, conn: Connection):
        self._conn, self._queue = conn, queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="reasonspec-sender", daemon=True)
        self._thread.start()

    def put(self, message: Any) -> None:
        self._queue.put(message)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=CLOSE_GRACE_S)

    def _run(self) -> None:
        while (message := self._queue.get()) is not None:
            try:
                self._conn.send(message)
            except (OSError, ValueError):  # the other side is gone: its reader reports that
                return


def _sendable(error: BaseException) -> BaseException:
    """``error`` if it survives pickling (its type and message then reach the caller), else a WorkerError."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:  # noqa: BLE001 -- any unpicklable exception
        return WorkerError(f"{type(error).__name__}: {error}")


@forwarding("_call")
class ProcessWorker:
    """The Worker protocol on a worker that ``factory`` builds in a child process.

    ``factory`` must pickle (a module-level function bound with ``functools.partial``).
    ``name`` appears in every error (e.g. ``"small model evals/arith2/models/small"``).
    The constructor returns at once: the child builds the worker meanwhile, and
    the first call waits for it.
    """

    def __init__(self, factory: Callable[[], Worker], *, name: str):
        self.name = name
        ours, theirs = socket.socketpair()
        with theirs:
            self._proc = subprocess.Popen([sys.executable, "-m", "workers.process_worker", str(theirs.fileno())],
                                          pass_fds=[theirs.fileno()])
        self._conn = Connection(ours.detach())
        self._sender = _Sender(self._conn)
        self._sender.put(factory)
        self._ids = itertools.count()
        self._pending: dict[int, asyncio.Future] = {}
        self._built: asyncio.Future | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._dead: str | None = None

    @property
    def pid(self) -> int:
        return self._proc.pid

    def _attach(self) -> None:
        """Read the child's answers on the running event loop (the first call's)."""
        if self._loop is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._built = self._loop.create_future()
        self._pending[_BUILD] = self._built
        self._loop.add_reader(self._conn.fileno(), self._on_readable)

    def _on_readable(self) -> None:
        try:
            while self._conn.poll():
                cid, ok, value = self._conn.recv()
                fut = self._pending.pop(cid, None)
                if fut is None or fut.done():  # cancelled meanwhile
                    continue
                if ok:
                    fut.set_result(value)
                else:
                    fut.set_exception(value)
                    if cid == _BUILD:
                        self._fail(f"could not build its worker: {type(value).__name__}: {value}")
        except (EOFError, OSError):
            self._fail(f"its worker process exited (code {self._proc.poll()})")

    def _fail(self, why: str) -> None:
        """Mark the child gone: every call in flight fails with a WorkerError saying ``why``."""
        if self._dead is None:
            self._dead = why
            if self._loop is not None:
                self._loop.remove_reader(self._conn.fileno())
        pending, self._pending = self._pending, {}
        for fut in pending.values():
            if fut is not None and not fut.done():
                fut.set_exception(WorkerError(f"{self.name}: {why}"))
                fut.exception()  # the build's future may have no reader: never "exception never retrieved"

    async def _call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        self._attach()
        if self._dead is not None:
            raise WorkerError(f"{self.name}: {self._dead}")
        if not self._built.done():
            await asyncio.shield(self._built)
        cid = next(self._ids)
        fut = self._loop.create_future()
        self._pending[cid] = fut
        self._sender.put(("call", cid, name, args, kwargs))
        try:
            return await fut
        except asyncio.CancelledError:
            if self._pending.pop(cid, None) is not None and self._dead is None:
                self._sender.put(("cancel", cid))
            raise

    async def close(self) -> None:
        """Shut the worker down in the child (its engine ends cleanly), then end the child; idempotent."""
        if self._dead is None and self._loop is not None:
            try:
                await asyncio.wait_for(self._call("close"), CLOSE_GRACE_S)
            except (WorkerError, asyncio.TimeoutError):
                pass
        if self._dead is None:
            self._fail("it was closed")
        self._sender.close()
        self._conn.close()
        try:
            await asyncio.to_thread(self._proc.wait, CLOSE_GRACE_S)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            await asyncio.to_thread(self._proc.wait)


# ------------------------------------------------------------------ the child


async def _child(conn: Connection) -> None:
    loop = asyncio.get_running_loop()
    try:
        worker = conn.recv()()  # the factory, then the worker it builds
    except BaseException as e:  # noqa: BLE001 -- whatever stops the build is the caller's error
        _reply(conn, (_BUILD, False, _sendable(e)))
        return
    _reply(conn, (_BUILD, True, None))
    tasks: dict[int, asyncio.Task] = {}
    done = loop.create_future()

    async def serve(cid: int, name: str, args: tuple, kwargs: dict) -> None:
        try:
            if name == "close":
                await worker.close()
                _reply(conn, (cid, True, None))
                done.set_result(None)
                return
            _reply(conn, (cid, True, await getattr(worker, name)(*args, **kwargs)))
        except asyncio.CancelledError:
            pass
        except Exception as e:  # noqa: BLE001 -- the call's error is the caller's
            _reply(conn, (cid, False, _sendable(e)))
        finally:
            tasks.pop(cid, None)

    def on_readable() -> None:
        try:
            while conn.poll():
                kind, cid, *rest = conn.recv()
                if kind == "call":
                    tasks[cid] = loop.create_task(serve(cid, *rest))
                elif (task := tasks.get(cid)) is not None:  # "cancel"
                    task.cancel()
        except (EOFError, OSError):  # the parent is gone
            loop.remove_reader(conn.fileno())
            if not done.done():
                done.set_result(None)

    loop.add_reader(conn.fileno(), on_readable)
    await done
    loop.remove_reader(conn.fileno())
    for task in list(tasks.values()):
        task.cancel()


def _reply(conn: Connection, message: Any) -> None:
    """Answer the parent from the child's event loop (the parent reads all the time: a write never waits long)."""
    try:
        conn.send(message)
    except (OSError, ValueError):  # the parent is gone: the reader sees it and ends the child
        pass


def main(fd: int) -> None:
    conn = Connection(fd)
    try:
        asyncio.run(_child(conn))
    finally:
        conn.close()


if __name__ == "__main__":
    main(int(sys.argv[1]))
