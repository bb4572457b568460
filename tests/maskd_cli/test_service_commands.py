"""``maskd serve``'s own socket for several API processes."""

from __future__ import annotations

import socket

from maskd_cli.service_commands import _tcp_listener


def test_the_shared_listener_hands_out_connections_with_nagle_off() -> None:
    """With Nagle on, an answer written as headers then body waits for the client's delayed
    ACK: 40 ms a request (seen with uvicorn's own socket for --workers 2: 226 req/s at 10
    connections, against 1,486 with this one)."""
    listener = _tcp_listener("127.0.0.1", 0)
    try:
        assert listener.proto == socket.IPPROTO_TCP
        listener.listen(1)
        with socket.create_connection(listener.getsockname()[:2]):
            accepted, _ = listener.accept()
            with accepted:
                assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
                assert accepted.proto == socket.IPPROTO_TCP
    finally:
        listener.close()
