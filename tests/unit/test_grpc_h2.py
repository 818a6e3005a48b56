"""``protocols/grpc_h2.py`` in process, over a real socket: what the e2e tests cannot see from outside."""

from __future__ import annotations

import asyncio
import gc
import socket
import weakref

from protocols import grpc_h2

AGE_S = 30.0


def test_a_closed_connection_is_let_go_not_kept_by_its_age_timer() -> None:
    """A client that opens a connection per call must not leave each one alive for its age (30 s by
    default): closing cancels the timers, and nothing else holds the connection."""
    async def run() -> None:
        server = grpc_h2.Server(grpc_h2.Registry(), max_message_bytes=1 << 20, max_age_s=AGE_S, grace_s=5.0)
        await server.start("127.0.0.1", 0)
        port = server._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        theirs = socket.create_connection(("127.0.0.1", port))
        while not server.connections:
            await asyncio.sleep(0.01)
        [protocol] = server.connections
        assert protocol.peer.startswith("ipv4:127.0.0.1:")
        timers = list(protocol._timers)
        assert timers and not timers[0].cancelled(), "the age is armed"
        alive = weakref.ref(protocol)
        theirs.close()
        for _ in range(10):  # the loop sees the peer's close and calls connection_lost
            await asyncio.sleep(0.01)
        assert all(t.cancelled() for t in timers) and not server.connections
        del protocol
        gc.collect()
        assert alive() is None
        await server.stop()

    asyncio.run(run())
