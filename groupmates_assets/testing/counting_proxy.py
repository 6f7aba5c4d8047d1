"""A TCP proxy on loopback that counts the bytes a server sends its clients: put in front of the S3 server, it
measures what a step really downloads (bodies, headers, listings), whatever client library made the requests.
Used by ``test_s3.py`` (the model cache) and ``bench/bench_s3.py``."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from urllib.parse import urlsplit


class CountingProxy:
    """Forwards every connection to ``target`` (host, port) and counts bytes in each direction."""

    def __init__(self, target: tuple[str, int]):
        self._target = target
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._closed = False
        self.downloaded = 0  # server -> client
        self.uploaded = 0  # client -> server
        self.endpoint_url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._start(self._accept)

    def reset(self) -> None:
        with self._lock:
            self.downloaded = self.uploaded = 0

    def _start(self, target, *args) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(self._target)
            with self._lock:
                self._sockets += [client, server]
            self._start(self._pump, client, server, False)
            self._start(self._pump, server, client, True)

    def _pump(self, source: socket.socket, sink: socket.socket, downstream: bool) -> None:
        try:
            while data := source.recv(1 << 16):
                sink.sendall(data)
                with self._lock:
                    if downstream:
                        self.downloaded += len(data)
                    else:
                        self.uploaded += len(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                sink.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        with self._lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.close()
        for thread in self._threads:
            thread.join(timeout=5)


@contextlib.contextmanager
def counting_proxy(endpoint_url: str) -> Iterator[CountingProxy]:
    """A :class:`CountingProxy` in front of ``endpoint_url`` (``http://host:port``), closed on exit."""
    parts = urlsplit(endpoint_url)
    proxy = CountingProxy((parts.hostname or "127.0.0.1", parts.port or 80))
    try:
        yield proxy
    finally:
        proxy.close()
