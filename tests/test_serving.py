"""The multi-worker listener: accepted connections must get TCP_NODELAY (app.serving)."""

from __future__ import annotations

import asyncio
import socket

from app import serving


def _nodelay_of_accepted(listener: socket.socket) -> int:
    """Serve on `listener` with asyncio (as uvicorn's workers do), connect once, and read
    TCP_NODELAY of the server side of that connection."""

    async def main() -> int:
        seen: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            sock = writer.get_extra_info("socket")
            seen.set_result(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(on_connect, sock=listener)
        host, port = listener.getsockname()[:2]
        _, writer = await asyncio.open_connection(host, port)
        try:
            return await asyncio.wait_for(seen, 5)
        finally:
            writer.close()
            server.close()

    return asyncio.run(main())


def test_tcp_listener_connections_get_nodelay() -> None:
    listener = serving.tcp_listener("127.0.0.1", 0)
    assert listener.proto == socket.IPPROTO_TCP
    assert _nodelay_of_accepted(listener) == 1


def test_a_protocol_zero_listener_leaves_nagle_on() -> None:
    """What `uvicorn --workers N` binds (the reason app.serving exists): asyncio does not set
    TCP_NODELAY on connections it accepts from it."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    assert _nodelay_of_accepted(listener) == 0
