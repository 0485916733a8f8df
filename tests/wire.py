"""A TCP relay between a client and a server that counts the bytes each way (what a network link
would carry, to see that compression changes it) and cuts connections mid-message, as a flaky
wide-area link does: every connection after so many bytes towards the client (`cut_after`), or
once, the one carrying the n-th byte from now on (`arm(n)`). The tests and the bench (README
"Between sites": a transfer cut at 90 %) use it alike."""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import threading
import time
from collections.abc import Callable
from types import TracebackType

F_SETPIPE_SZ = 1031


class CountingRelay:
    """Listens on a free loopback port and relays each connection to `target_port`. Bytes move
    by splice(2) through a pipe (the kernel copies them; the pump threads wait and copy without
    the GIL), yet a 1 GiB DoGet through it on a 2-core machine took about 1.5x its time direct:
    compare reads that all go through it. The relay's peer, for the server, is still loopback:
    compression must be asked for."""

    CHUNK = 1 << 20

    def __init__(self, target_port: int, cut_after: int | None = None,
                 on_cut: Callable[[], object] | None = None) -> None:
        self.target = ("127.0.0.1", target_port)
        self.cut_after = cut_after  # bytes towards the client after which a connection is cut
        # called at the first cut, before either end sees it: what happens at the server while
        # the client is cut off (the run changes) is done when the client reconnects
        self.on_cut = on_cut
        self.cuts = 0
        self.to_client = 0  # bytes from the server to the client
        self.to_server = 0
        self.cut_time: float | None = None  # perf_counter of the last cut
        self.resumed_time: float | None = None  # first byte towards the client after it
        self._armed: int | None = None  # bytes towards the client until the armed cut
        self._lock = threading.Lock()
        self._closed = False
        self._sockets: list[socket.socket] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True, name="relay-accept").start()

    @property
    def location(self) -> str:
        return f"grpc://127.0.0.1:{self.port}"

    def reset(self) -> None:
        with self._lock:
            self.to_client = self.to_server = 0

    def downstream(self) -> int:
        with self._lock:
            return self.to_client

    def arm(self, cut_after: int) -> None:
        """Cut the connection that carries the `cut_after`-th byte towards the client from now
        on, once."""
        with self._lock:
            self._armed = max(1, cut_after)
            self.cut_time = self.resumed_time = None

    def disarm(self) -> None:
        with self._lock:
            self._armed = None

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.listener.accept()
                server = socket.create_connection(self.target)
            except OSError:
                if self._closed:
                    return
                continue
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._sockets += [client, server]
            for src, dst, down in ((client, server, False), (server, client, True)):
                threading.Thread(target=self._pump, args=(src, dst, down), daemon=True,
                                 name="relay-pump").start()

    def _want(self, down: bool, sent: int) -> int:
        """How much to move next: up to the next cut, so that it falls mid-message exactly."""
        want = self.CHUNK
        if down and self.cut_after is not None:
            want = min(want, self.cut_after - sent)
        with self._lock:
            if down and self._armed is not None:
                want = min(want, self._armed)
        return want

    def _count(self, n: int, down: bool) -> bool:
        """Count n bytes moved; True when they end at the armed cut."""
        with self._lock:
            if not down:
                self.to_server += n
                return False
            self.to_client += n
            if self.cut_time is not None and self.resumed_time is None:
                self.resumed_time = time.perf_counter()
            if self._armed is None:
                return False
            self._armed -= n
            if self._armed > 0:
                return False
            self._armed = None
            return True

    def _cut(self) -> None:
        with self._lock:
            self.cuts += 1
            self.cut_time = time.perf_counter()
            first = self.cuts == 1
        if first and self.on_cut is not None:
            self.on_cut()

    def _pump(self, src: socket.socket, dst: socket.socket, down: bool) -> None:
        splice = getattr(os, "splice", None)
        pipe = os.pipe() if splice is not None else None
        buf = memoryview(bytearray(self.CHUNK))
        sent = 0
        try:
            if pipe is not None:
                with contextlib.suppress(OSError):
                    fcntl.fcntl(pipe[1], F_SETPIPE_SZ, self.CHUNK)
            while True:
                want = self._want(down, sent)
                if want == 0:  # this connection carried cut_after bytes: cut it if it goes on
                    if src.recv_into(buf, 1):
                        self._cut()
                    break
                if pipe is not None:
                    n = splice(src.fileno(), pipe[1], want)
                    moved = 0
                    while moved < n:
                        moved += splice(pipe[0], dst.fileno(), n - moved)
                else:
                    n = src.recv_into(buf, want)
                    dst.sendall(buf[:n])
                sent += n
                if n == 0:
                    break
                if self._count(n, down):
                    self._cut()
                    break
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
            if pipe is not None:
                for fd in pipe:
                    os.close(fd)

    def close(self) -> None:
        self._closed = True
        self.listener.close()
        with self._lock:
            for s in self._sockets:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()

    def __enter__(self) -> CountingRelay:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
