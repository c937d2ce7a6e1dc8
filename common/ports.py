"""A port held for a server that binds it later, race-free.

Picking a free port (bind to 0, read the port, close) and then starting the server on it races with every
other process on the machine: between the close and the server's bind, another bind(0) or an outgoing
connection may be given the same port. A reservation instead keeps the port bound, with SO_REUSEADDR and
without listening, for as long as it is held. Linux then gives the port to no bind(0) or connect() and
refuses it to any bind without SO_REUSEADDR, while a listener that sets SO_REUSEADDR (asyncio and aiohttp
do by default, as do Go's net package and c10d's TCPStore) binds it as usual: the server it is held for,
also when it restarts on the same port. Not listening, the reservation takes no connections: one to a
server that is down is refused, as it would be without it.
"""

from __future__ import annotations

import socket

# Connections a listening socket's kernel queue holds until the server's loop accepts them. A burst of
# clients (or a gateway opening one connection per request of a burst) overflows a smaller queue, and a
# connection refused there waits a SYN retransmission: a second or more. uvicorn's default.
LISTEN_BACKLOG = 2048


class PortReservation:
    """A free TCP port of `host` (`.port`), held until `close()` (or the end of a `with` block)."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, 0))
        self.host = host
        self.port: int = self._sock.getsockname()[1]

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> PortReservation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
