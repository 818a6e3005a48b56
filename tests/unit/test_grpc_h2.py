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
        [listener] = grpc_h2.listeners("127.0.0.1", 0)
        port = listener.getsockname()[1]
        await server.start([listener])
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


def test_listeners_join_one_reuseport_group_on_every_address() -> None:
    """A worker's listeners (made by its parent before the fork) are bound and listening with
    ``SO_REUSEPORT``, so a second worker's join the same port; an empty host is every address."""
    first = grpc_h2.listeners("127.0.0.1", 0)
    port = first[0].getsockname()[1]
    second = grpc_h2.listeners("127.0.0.1", port)
    try:
        for sock in first + second:
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
            assert not sock.getblocking()
        socket.create_connection(("127.0.0.1", port)).close()  # the kernel takes it before anyone accepts
    finally:
        for sock in first + second:
            sock.close()
    every = grpc_h2.listeners("", 0)
    try:
        assert {sock.getsockname()[0] for sock in every} >= {"0.0.0.0"}
    finally:
        for sock in every:
            sock.close()
