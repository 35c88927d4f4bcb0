"""Running the web app under uvicorn, with the listening socket made so responses are not
held back by Nagle's algorithm.

`uvicorn --workers N` binds its listener with protocol 0; the sockets it accepts inherit
that, and asyncio sets TCP_NODELAY only on sockets that say IPPROTO_TCP (Kludex/uvicorn#3149).
With Nagle left on, a response's body (written after its headers) waits for the client's
delayed ACK: about 40 ms on every keep-alive request that closely follows another, which is
each `next` after a `submit` on the labeling API (bench/README.md: paced `next` p50 57 ms at
the client against 16 ms inside the server; 18 ms with this listener). One worker is not
affected: uvicorn then lets asyncio create the socket, which sets the option itself.
"""

from __future__ import annotations

import socket
from typing import Any

APP = "app.main:create_app"


def tcp_listener(host: str, port: int) -> socket.socket:
    """A listening socket created as IPPROTO_TCP, for IPv4 or IPv6 `host`."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


def run(host: str, port: int, workers: int = 1, **options: Any) -> None:
    """Serve the app like `uvicorn app.main:create_app --factory`, on a `tcp_listener` when
    there are several worker processes. `options` go to uvicorn.Config."""
    import uvicorn
    from uvicorn.supervisors import Multiprocess

    config = uvicorn.Config(APP, factory=True, host=host, port=port, workers=workers, **options)
    if workers <= 1:
        uvicorn.Server(config).run()
        return
    Multiprocess(config, sockets=[tcp_listener(host, port)]).run()
