"""A link's state from its sockets' connection events (one socket per candidate server
key): the sequences libzmq produces for a peer that accepts our key, refuses it, or
cannot be reached."""

from __future__ import annotations

from kvnode.agent.peers.links import Link, PeerStats


def _link(sockets: int = 1) -> Link:
    return Link("tcp://peer:7470", [object()] * sockets, PeerStats())  # type: ignore[list-item]


def _feed(link: Link, events: list[tuple[int, str]]) -> list[str]:
    changes = []
    for index, event in events:
        new = link.transport(index, event)
        if new is not None:
            changes.append(new)
    return changes


def test_refused_handshakes_do_not_flap_to_unreachable() -> None:
    link = _link()
    # A peer that refuses our key: connect, handshake fails, closed, retry, again.
    cycle = [(0, "connected"), (0, "refused"), (0, "closed"), (0, "retried")]
    assert _feed(link, cycle * 5) == ["refused"]
    assert link.stats.state == "refused"


def test_unreachable_then_up() -> None:
    link = _link()
    assert _feed(link, [(0, "retried"), (0, "retried")]) == ["unreachable"]
    assert _feed(link, [(0, "connected"), (0, "ok")]) == ["up"]
    assert _feed(link, [(0, "closed")]) == ["connecting"]


def test_one_candidate_key_accepted_is_enough() -> None:
    link = _link(sockets=2)  # a key rotation: our old and new server keys
    changes = _feed(link, [(0, "connected"), (0, "refused"), (1, "connected"), (1, "ok")])
    assert changes == ["refused", "up"] and link.stats.state == "up"
    # The accepted one going away leaves the refusal standing.
    assert _feed(link, [(1, "closed")]) == ["refused"]


def test_a_link_to_ourselves_stays_self() -> None:
    link = _link()
    link.stats.state = "self"
    assert _feed(link, [(0, "connected"), (0, "ok"), (0, "retried")]) == []
