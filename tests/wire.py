"""A TCP relay between a test's client and server that counts the bytes each way (what a
network link would carry, to see that compression changes it), and can cut each connection
after so many bytes towards the client, as a flaky wide-area link does."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from types import TracebackType


class CountingRelay:
    """Listens on a free loopback port and relays each connection to `target_port`. The
    relay's peer, for the server, is still loopback: compression must be asked for."""

    def __init__(self, target_port: int, cut_after: int | None = None,
                 on_cut: Callable[[], object] | None = None) -> None:
        self.target = ("127.0.0.1", target_port)
        self.cut_after = cut_after  # bytes towards the client after which a connection is cut
        # called at the first cut, before either end sees it: what happens at the server while
        # the client is cut off (the run changes) is done when the client reconnects
        self.on_cut = on_cut
        self.cuts = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.to_client = 0  # bytes from the server to the client
        self.to_server = 0
        self._lock = threading.Lock()
        self._closed = False
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True, name="relay-accept").start()

    @property
    def location(self) -> str:
        return f"grpc://127.0.0.1:{self.port}"

    def reset(self) -> None:
        with self._lock:
            self.to_client = self.to_server = 0

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.target)
            with self._lock:
                self._sockets += [client, server]
            for src, dst, downstream in ((client, server, False), (server, client, True)):
                threading.Thread(target=self._pump, args=(src, dst, downstream),
                                 daemon=True, name="relay-pump").start()

    def _pump(self, src: socket.socket, dst: socket.socket, downstream: bool) -> None:
        sent = 0
        try:
            while data := src.recv(1 << 16):
                if downstream and self.cut_after is not None and sent + len(data) > self.cut_after:
                    dst.sendall(data[: self.cut_after - sent])  # up to the cut, mid-message
                    with self._lock:
                        self.cuts += 1
                        first = self.cuts == 1
                    if first and self.on_cut is not None:
                        self.on_cut()
                    break
                dst.sendall(data)
                sent += len(data)
                with self._lock:
                    if downstream:
                        self.to_client += len(data)
                    else:
                        self.to_server += len(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._closed = True
        self.listener.close()
        with self._lock:
            for s in self._sockets:
                s.close()

    def __enter__(self) -> CountingRelay:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
