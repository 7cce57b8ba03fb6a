"""A fault-injecting TCP proxy on loopback, in front of the S3 and GCS protocol servers the tests run.

Point a client at ``proxy.url`` instead of the server and switch faults on and off while it works:

- ``blackout("refuse")``: every new connection is reset as soon as it is accepted, and the open ones
  are cut (reset); ``blackout("silent")``: new connections are accepted and never answered (a
  store that hangs), the open ones are cut. ``blackout(None)`` ends it; held connections are reset.
- ``reset_every = k``: every k-th connection is reset after ``reset_after_bytes`` bytes have passed
  it (0: at once), i.e. in the middle of a request or a response (a connection that carries fewer
  bytes ends normally, and is not counted as reset).
- ``latency_s``: added before each chunk is passed on (a slow link).

Counters (``stats()``): connections accepted, forwarded, reset by ``reset_every``, refused or held
during a blackout, cut when a blackout began, and the seconds spent in blackout.
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator
from urllib.parse import urlparse

MODES = ("refuse", "silent")


def _reset(sock: socket.socket) -> None:
    """Close with an RST (linger 0), not a FIN: the peer sees 'connection reset'."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


@dataclass(eq=False)
class _Pair:
    """One client connection and its upstream connection."""

    client: socket.socket
    upstream: socket.socket
    reset_at: int | None  # bytes after which both are reset (a faulted connection), or None
    passed: int = 0
    finished: int = 0  # directions that ended with EOF
    dead: bool = False
    tripped: bool = False  # the reset was decided (by one direction's pump: the other must not count it again)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def kill(self) -> bool:
        """Reset both sides; False if it was already dead."""
        with self.lock:
            if self.dead:
                return False
            self.dead = True
        _reset(self.client)
        _reset(self.upstream)
        return True


@dataclass
class ProxyStats:
    connections: int = 0
    forwarded: int = 0
    resets: int = 0
    refused: int = 0
    held: int = 0
    cut: int = 0
    blackout_s: float = 0.0


class FaultProxy:
    """Listens on 127.0.0.1 (a free port) and forwards to ``upstream`` (``http://HOST:PORT``)."""

    def __init__(self, upstream: str, *, reset_every: int = 0, reset_after_bytes: int = 0, latency_s: float = 0.0):
        parsed = urlparse(upstream)
        self.upstream = (parsed.hostname, parsed.port)
        self.reset_every, self.reset_after_bytes, self.latency_s = reset_every, reset_after_bytes, latency_s
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=128)
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._lock = threading.Lock()
        self._stats = ProxyStats()
        self._pairs: set[_Pair] = set()
        self._held: list[socket.socket] = []
        self._mode: str | None = None
        self._blackout_since: float | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._accept, name="fault-proxy", daemon=True)
        self._thread.start()

    # --- controls ----------------------------------------------------------------------------
    def blackout(self, mode: str | None = "refuse") -> None:
        """Start a blackout (``refuse`` or ``silent``), or end it (None)."""
        if mode is not None and mode not in MODES:
            raise ValueError(f"blackout mode {mode!r}: choose one of {MODES} or None")
        with self._lock:
            now = time.monotonic()
            if self._blackout_since is not None:
                self._stats.blackout_s += now - self._blackout_since
            self._blackout_since = now if mode is not None else None
            self._mode = mode
            pairs = list(self._pairs) if mode is not None else []
            held, self._held = (self._held, []) if mode is None else ([], self._held)
        for pair in pairs:  # the open connections are cut
            if pair.kill():
                with self._lock:
                    self._stats.cut += 1
        for sock in held:  # the connections held silent get their answer at last: a reset
            _reset(sock)

    @contextlib.contextmanager
    def blacked_out(self, mode: str = "refuse") -> Iterator[None]:
        self.blackout(mode)
        try:
            yield
        finally:
            self.blackout(None)

    def stats(self) -> ProxyStats:
        with self._lock:
            stats = ProxyStats(**vars(self._stats))
            if self._blackout_since is not None:
                stats.blackout_s += time.monotonic() - self._blackout_since
            return stats

    def close(self) -> None:
        self.blackout(None)
        with self._lock:
            self._closed = True
            pairs = list(self._pairs)
        with contextlib.suppress(OSError):
            self._listener.close()
        for pair in pairs:
            pair.kill()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- the work ----------------------------------------------------------------------------
    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                if self._closed:
                    _reset(client)
                    return
                self._stats.connections += 1
                number, mode = self._stats.connections, self._mode
                if mode == "refuse":
                    self._stats.refused += 1
                elif mode == "silent":
                    self._stats.held += 1
                    self._held.append(client)
                faulted = mode is None and self.reset_every > 0 and number % self.reset_every == 0
            if mode == "refuse":
                _reset(client)
            elif mode is None:
                threading.Thread(target=self._connect, args=(client, faulted), daemon=True).start()

    def _connect(self, client: socket.socket, faulted: bool) -> None:
        if faulted and self.reset_after_bytes <= 0:
            self._count_reset()
            _reset(client)
            return
        try:
            upstream = socket.create_connection(self.upstream, timeout=10)
            upstream.settimeout(None)
        except OSError:
            _reset(client)
            return
        pair = _Pair(client, upstream, self.reset_after_bytes if faulted else None)
        with self._lock:
            if self._mode is not None or self._closed:  # a blackout began meanwhile
                cut = True
            else:
                cut = False
                self._pairs.add(pair)
                self._stats.forwarded += 1
        if cut:
            pair.kill()
            return
        for src, dst in ((client, upstream), (upstream, client)):
            threading.Thread(target=self._pump, args=(pair, src, dst), daemon=True).start()

    def _pump(self, pair: _Pair, src: socket.socket, dst: socket.socket) -> None:
        try:
            while not pair.dead:
                ready, _, _ = select.select([src], [], [], 0.2)
                if pair.dead:
                    return
                if not ready:
                    continue
                data = src.recv(65536)
                if not data:  # this direction is done: pass the half-close on
                    dst.shutdown(socket.SHUT_WR)
                    with pair.lock:
                        pair.finished += 1
                        both = pair.finished == 2
                    if both:
                        self._forget(pair, reset=False)
                    return
                if self.latency_s:
                    time.sleep(self.latency_s)
                with pair.lock:
                    if pair.tripped:
                        return
                    pair.passed += len(data)
                    trip = pair.reset_at is not None and pair.passed >= pair.reset_at
                    pair.tripped = trip
                if trip:  # the faulted connection dies in the middle of its traffic
                    head = len(data) - (pair.passed - pair.reset_at)
                    with contextlib.suppress(OSError):
                        dst.sendall(data[:max(head, 0)])
                    self._count_reset()
                    self._forget(pair, reset=True)
                    return
                dst.sendall(data)
        except (OSError, ValueError):  # a peer reset, or the pair was cut: reset the other side too
            self._forget(pair, reset=True)

    def _count_reset(self) -> None:
        with self._lock:
            self._stats.resets += 1

    def _forget(self, pair: _Pair, reset: bool) -> None:
        with self._lock:
            self._pairs.discard(pair)
        if reset:
            pair.kill()
        else:
            with pair.lock:
                pair.dead = True
            for sock in (pair.client, pair.upstream):
                with contextlib.suppress(OSError):
                    sock.close()
