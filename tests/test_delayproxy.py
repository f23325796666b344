"""The bench's delay proxy (devtools/delayproxy.py) as a link: what it must not add besides its delay."""

from __future__ import annotations

import socket

from devtools.delayproxy import DelayProxy


def test_the_delay_proxy_sends_small_chunks_without_waiting_for_the_peers_ack() -> None:
    # With Nagle on, a small chunk written while the last one is unacknowledged waits for the peer's
    # delayed ACK (40 ms): half of the bench's short calls through the proxy paid it, over no real link.
    # asyncio turns Nagle off only for sockets whose proto is IPPROTO_TCP, and an accepted one's is 0.
    with socket.create_server(("127.0.0.1", 0)) as listener, DelayProxy(0) as proxy:
        port = proxy.forward(listener.getsockname())
        with socket.create_connection(("127.0.0.1", port)) as client:
            upstream, _ = listener.accept()
            with upstream:
                client.sendall(b"x")
                assert upstream.recv(1) == b"x"  # both of the proxy's sockets are connected
                sides = [side for connection in proxy._connections for side in (connection.client, connection.upstream)]
                assert len(sides) == 2
                for side in sides:
                    sock = side.transport.get_extra_info("socket")
                    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
