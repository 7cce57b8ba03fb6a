"""The fault proxy itself (tests/checkpoint/fault_proxy.py), against an echo server on loopback."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from tests.checkpoint.fault_proxy import FaultProxy


class EchoServer:
    """Sends back whatever it receives, until the client closes."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn):
        with conn:
            try:
                while data := conn.recv(65536):
                    conn.sendall(data)
            except OSError:
                pass

    def close(self):
        self.sock.close()


@pytest.fixture
def echo():
    server = EchoServer()
    yield server
    server.close()


def connect(proxy: FaultProxy, timeout: float = 5) -> socket.socket:
    port = int(proxy.url.rsplit(":", 1)[1])
    return socket.create_connection(("127.0.0.1", port), timeout=timeout)


def round_trip(proxy: FaultProxy, payload: bytes = b"hello store", timeout: float = 5) -> bytes:
    with connect(proxy, timeout) as sock:
        sock.sendall(payload)
        got = b""
        while len(got) < len(payload):
            chunk = sock.recv(65536)
            if not chunk:
                break
            got += chunk
        return got


def assert_reset(sock: socket.socket, payload: bytes = b"x" * 100) -> None:
    """The connection dies: a reset (or, if the RST raced the send, an end of stream), never an answer."""
    try:
        sock.sendall(payload)
        assert sock.recv(65536) == b""
    except (ConnectionResetError, BrokenPipeError):
        pass


def assert_refused(proxy: FaultProxy) -> None:
    """A new connection dies before any answer (the reset may already reach connect())."""
    try:
        sock = connect(proxy)
    except ConnectionResetError:
        return
    with sock:
        assert_reset(sock)


def test_forwards_both_ways(echo):
    with FaultProxy(echo.url) as proxy:
        assert round_trip(proxy, b"a" * 200_000) == b"a" * 200_000
        assert round_trip(proxy) == b"hello store"
        stats = proxy.stats()
    assert (stats.connections, stats.forwarded, stats.resets, stats.refused) == (2, 2, 0, 0)


def test_resets_every_kth_connection(echo):
    with FaultProxy(echo.url, reset_every=3) as proxy:
        for number in range(1, 8):
            if number % 3:
                assert round_trip(proxy) == b"hello store"
            else:
                assert_refused(proxy)
        stats = proxy.stats()
    assert (stats.connections, stats.resets, stats.forwarded) == (7, 2, 5)


def test_a_faulted_connection_dies_in_the_middle_of_its_traffic(echo):
    with FaultProxy(echo.url, reset_every=1, reset_after_bytes=1500) as proxy:  # bytes both ways count
        with connect(proxy) as sock:
            sock.sendall(b"b" * 600)
            got = b""
            while len(got) < 600:
                got += sock.recv(65536)
            assert got == b"b" * 600  # 1200 bytes passed by now: the next chunk trips the reset
            assert_reset(sock, b"c" * 600)
        assert proxy.stats().resets == 1


def test_refusing_blackout_cuts_open_connections_and_refuses_new_ones_until_it_ends(echo):
    with FaultProxy(echo.url) as proxy:
        open_conn = connect(proxy)
        open_conn.sendall(b"before")
        assert open_conn.recv(100) == b"before"
        with proxy.blacked_out("refuse"):
            assert_reset(open_conn)
            for _ in range(3):
                assert_refused(proxy)
            time.sleep(0.2)
        open_conn.close()
        assert round_trip(proxy) == b"hello store"  # the store is back
        stats = proxy.stats()
    assert (stats.cut, stats.refused, stats.forwarded) == (1, 3, 2)
    assert stats.blackout_s >= 0.2


def test_silent_blackout_holds_new_connections_without_an_answer(echo):
    with FaultProxy(echo.url) as proxy:
        proxy.blackout("silent")
        sock = connect(proxy, timeout=0.3)
        sock.sendall(b"anyone?")
        with pytest.raises(socket.timeout):
            sock.recv(100)
        assert proxy.stats().held == 1
        proxy.blackout(None)  # held connections are reset when it ends
        sock.settimeout(5)
        assert_reset(sock)
        sock.close()
        assert round_trip(proxy) == b"hello store"


def test_latency_is_added_to_each_chunk(echo):
    with FaultProxy(echo.url, latency_s=0.2) as proxy:
        started = time.monotonic()
        assert round_trip(proxy) == b"hello store"
        assert time.monotonic() - started >= 0.4  # there and back (a lower bound only)


def test_an_unknown_blackout_mode_is_refused(echo):
    with FaultProxy(echo.url) as proxy, pytest.raises(ValueError, match="blackout mode 'dark'"):
        proxy.blackout("dark")
