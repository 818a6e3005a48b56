"""Issue: performance. The front door's connection ages (``service.max_connection_age_s``): which
answer asks the client to reconnect (the reconnection itself: tests/e2e/test_connections.py)."""

from __future__ import annotations

import time

from protocols.guard import AGE_JITTER, ConnectionAges

AGE_S = 0.05
PAST_AGE_S = AGE_S * (1 + AGE_JITTER) * 1.2
"""Longer than any connection's jittered age."""
PEER = ("10.0.0.1", 50000)


def test_a_connection_is_closed_once_past_its_age_then_counts_afresh() -> None:
    ages = ConnectionAges(AGE_S)
    assert not ages.expired(PEER)
    assert not ages.expired(PEER)
    time.sleep(PAST_AGE_S)
    assert ages.expired(PEER)
    assert not ages.expired(PEER), "the reconnected peer is a new connection"


def test_connections_age_apart_and_no_age_or_no_peer_never_closes() -> None:
    ages = ConnectionAges(AGE_S)
    assert not ages.expired(PEER)
    time.sleep(PAST_AGE_S)
    assert not ages.expired(("10.0.0.1", 50001)), "a newer connection keeps its own age"
    assert ages.expired(PEER)
    assert not ConnectionAges(AGE_S).expired(None), "a peer ASGI does not name (a Unix socket)"
    never = ConnectionAges(None)
    never.expired(PEER)
    time.sleep(PAST_AGE_S)
    assert not never.expired(PEER)


def test_the_table_forgets_connections_its_clients_closed() -> None:
    ages = ConnectionAges(AGE_S)
    for port in range(1000):
        ages.expired(("10.0.0.2", port))
    time.sleep(PAST_AGE_S + AGE_S)
    ages.expired(PEER)
    assert list(ages.due) == [PEER]
