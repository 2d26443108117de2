"""Scheduler-side logic of the connector with a fake agent: prefix rules, the
all-ranks rule, PENDING handling, failures, step planning, and lookups answered from a
real shared index (writer in the test, reader in the scheduler)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from kvnode.connector.config import ConnectorConfig
from kvnode.connector.keys import Namespace, chunk_keys
from kvnode.connector.scheduler import SchedulerSide, combine
from kvnode.errors import AgentUnavailable
from kvnode.ipc.protocol import Lookup
from kvnode.ipc.shmindex import ShmIndexWriter

C = 256
BS = 128
HIT, MISS, PENDING = Lookup.HIT, Lookup.MISS, Lookup.PENDING


def make_ns(tp_size: int = 1) -> list[Namespace]:
    base = Namespace(
        model="m",
        dtype="float32",
        kv_layout="cpu",
        block_shape=(2, 2, BS, 64),
        block_size=BS,
        chunk_tokens=C,
        tp_size=tp_size,
        tp_rank=0,
        pp_rank=0,
    )
    return [base.with_rank(r) for r in range(tp_size)]


@dataclass
class Req:
    request_id: str
    all_token_ids: list[int]
    kv_transfer_params: dict[str, Any] | None = None
    lora_request: Any = None
    cache_salt: str | None = None
    mm_features: list[Any] = field(default_factory=list)
    prompt_embeds: Any = None
    num_prompt_tokens: int = 0

    def __post_init__(self) -> None:
        self.num_prompt_tokens = self.num_prompt_tokens or len(self.all_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)


class FakeClient:
    def __init__(self) -> None:
        self.state: dict[bytes, int] = {}
        self.calls = 0

    def lookup(self, keys: list[bytes], promote: bool = True) -> list[int]:
        self.calls += 1
        return [self.state.get(k, MISS) for k in keys]


class FakeLink:
    def __init__(self) -> None:
        self.client = FakeClient()
        self.down = False

    def call(self, fn: Any) -> Any:
        if self.down:
            raise AgentUnavailable("down")
        return fn(self.client)


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def side(tp_size: int = 1, **cfg: Any) -> tuple[SchedulerSide, FakeLink, Clock]:
    link, clock = FakeLink(), Clock()
    s = SchedulerSide(ConnectorConfig(chunk_tokens=C, **cfg), link, BS, clock=clock)
    s.set_namespaces(make_ns(tp_size))
    return s, link, clock


def tokens(n: int, seed: int = 0) -> list[int]:
    return [(i * 7 + seed) % 1000 + 2 for i in range(n)]


def cache(link: FakeLink, ns: Namespace, toks: list[int], chunks: range, state: int = HIT) -> None:
    keys = chunk_keys(ns, toks, C)
    for c in chunks:
        link.client.state[keys[c]] = state


def test_longest_cached_prefix_in_whole_chunks() -> None:
    s, link, _ = side()
    toks = tokens(1000)
    cache(link, s.namespaces[0], toks, range(2))
    assert s.get_num_new_matched_tokens(Req("a", toks), 0) == (512, False)
    assert link.client.calls == 1


def test_gap_stops_the_prefix() -> None:
    s, link, _ = side()
    toks = tokens(1100)
    cache(link, s.namespaces[0], toks, range(0, 1))
    cache(link, s.namespaces[0], toks, range(2, 4))
    assert s.get_num_new_matched_tokens(Req("a", toks), 0) == (256, False)


def test_never_the_last_prompt_token() -> None:
    s, link, _ = side()
    toks = tokens(3 * C)  # chunk-aligned prompt: the last chunk holds the last token
    cache(link, s.namespaces[0], toks, range(3))
    assert s.get_num_new_matched_tokens(Req("a", toks), 0) == (2 * C, False)
    assert s.get_num_new_matched_tokens(Req("b", toks[: C + 1]), 0) == (C, False)
    assert s.get_num_new_matched_tokens(Req("c", toks[:C]), 0) == (0, False)


def test_beyond_vllm_computed_tokens_and_partial_first_chunk() -> None:
    s, link, _ = side()
    toks = tokens(1000)
    cache(link, s.namespaces[0], toks, range(3))
    req = Req("a", toks)
    # vLLM has 3 blocks (384 tokens) locally: the agent serves 384..768.
    assert s.get_num_new_matched_tokens(req, 3 * BS) == (384, False)
    s.update_state_after_alloc(req, 384)
    blocks = list(range(10, 18))
    loads, saves = s.build_step([("a", 768, 1000 - 768)], lambda rid: blocks)
    ops = loads["a"]
    assert [(op.index, op.block_ids, op.block_offset) for op in ops] == [
        (1, (13,), 1),
        (2, (14, 15), 0),
    ]
    # Loaded chunks are not saved again; nothing else is complete.
    assert "a" not in saves
    # Everything already computed by vLLM: nothing to ask.
    assert s.get_num_new_matched_tokens(Req("b", toks), 768) == (0, False)


def test_all_ranks_rule() -> None:
    s, link, _ = side(tp_size=2)
    toks = tokens(1100)
    cache(link, s.namespaces[0], toks, range(4))
    cache(link, s.namespaces[1], toks, range(1))
    assert s.get_num_new_matched_tokens(Req("a", toks), 0) == (C, False)
    assert link.client.calls == 1  # one batched lookup for both ranks
    cache(link, s.namespaces[1], toks, range(4))
    assert s.get_num_new_matched_tokens(Req("b", toks), 0) == (4 * C, False)


def test_combine() -> None:
    assert combine([[HIT, HIT, PENDING, HIT], [HIT, MISS, HIT, PENDING]]) == [
        HIT,
        MISS,
        PENDING,
        PENDING,
    ]


def test_pending_asks_again_until_the_deadline() -> None:
    s, link, clock = side(prefetch_deadline_ms=500)
    toks = tokens(1100)
    cache(link, s.namespaces[0], toks, range(1))
    cache(link, s.namespaces[0], toks, range(1, 3), PENDING)
    req = Req("a", toks)
    assert s.get_num_new_matched_tokens(req, 0) == (None, False)
    clock.t += 0.2
    assert s.get_num_new_matched_tokens(req, 0) == (None, False)
    cache(link, s.namespaces[0], toks, range(1, 2))  # chunk 1 promoted
    clock.t += 0.2
    assert s.get_num_new_matched_tokens(req, 0) == (None, False)
    clock.t += 0.2  # past the deadline: take what is readable
    assert s.get_num_new_matched_tokens(req, 0) == (2 * C, False)
    # PENDING that is all promoted in time: no wait at all.
    cache(link, s.namespaces[0], toks, range(2, 4))
    assert s.get_num_new_matched_tokens(Req("b", toks), 0) == (4 * C, False)


def test_agent_down_is_a_miss() -> None:
    s, link, _ = side()
    toks = tokens(1000)
    cache(link, s.namespaces[0], toks, range(3))
    link.down = True
    assert s.get_num_new_matched_tokens(Req("a", toks), 0) == (0, False)
    assert s.stats.lookup_errors == 1


def test_inactive_until_workers_report_layout() -> None:
    link = FakeLink()
    s = SchedulerSide(ConnectorConfig(chunk_tokens=C), link, BS)
    assert s.get_num_new_matched_tokens(Req("a", tokens(1000)), 0) == (0, False)
    assert link.client.calls == 0


def test_opt_out_and_extras_separate_namespaces() -> None:
    s, link, _ = side()
    toks = tokens(1000)
    cache(link, s.namespaces[0], toks, range(3))
    assert s.get_num_new_matched_tokens(
        Req("a", toks, kv_transfer_params={"kvnode.skip": True}), 0
    ) == (0, False)
    assert s.get_num_new_matched_tokens(Req("b", toks, cache_salt="tenant-1"), 0) == (0, False)
    assert s.get_num_new_matched_tokens(Req("c", toks), 0) == (3 * C, False)


def test_lookup_is_side_effect_free() -> None:
    s, link, _ = side()
    toks = tokens(1000)
    cache(link, s.namespaces[0], toks, range(2))
    before = dict(link.client.state)
    for _ in range(3):
        assert s.get_num_new_matched_tokens(Req("a", toks), 0) == (512, False)
    assert link.client.state == before


def test_save_plan_follows_prefill_progress() -> None:
    s, link, _ = side()
    toks = tokens(700)
    req = Req("a", toks)
    assert s.get_num_new_matched_tokens(req, 0) == (0, False)
    s.update_state_after_alloc(req, 0)
    blocks = list(range(20, 26))
    # Chunked prefill: 300 tokens, then the rest. Chunk 0 completes in step 1,
    # chunk 1 in step 2; the tail (700 - 512) is never a full chunk.
    loads, saves = s.build_step([("a", 0, 300)], lambda rid: blocks)
    assert not loads
    assert [(op.index, op.block_ids) for op in saves["a"]] == [(0, (20, 21))]
    keys = chunk_keys(s.namespaces[0], toks, C)
    assert saves["a"][0].keys == (keys[0],)
    loads, saves = s.build_step([("a", 300, 400)], lambda rid: blocks)
    assert [(op.index, op.block_ids) for op in saves["a"]] == [(1, (22, 23))]
    # Decode steps save nothing by default.
    req.all_token_ids.extend(tokens(400, seed=3))
    loads, saves = s.build_step([("a", 700, 1)], lambda rid: blocks + list(range(30, 40)))
    assert not saves
    s.request_finished("a")
    assert s.build_step([("a", 701, 1)], lambda rid: blocks) == ({}, {})


def test_save_decode_option() -> None:
    s, link, _ = side(save_decode=True)
    req = Req("a", tokens(300))
    s.get_num_new_matched_tokens(req, 0)
    s.update_state_after_alloc(req, 0)
    blocks = list(range(8))
    _, saves = s.build_step([("a", 0, 300)], lambda rid: blocks)
    assert [op.index for op in saves["a"]] == [0]
    req.all_token_ids.extend(tokens(300, seed=5))
    _, saves = s.build_step([("a", 599, 1)], lambda rid: blocks)
    assert [op.index for op in saves["a"]] == [1]


def test_block_size_must_divide_chunk() -> None:
    from kvnode.errors import ConfigError

    with pytest.raises(ConfigError, match="chunk_tokens"):
        SchedulerSide(ConnectorConfig(chunk_tokens=200), FakeLink(), BS)


def test_save_only_role_still_saves() -> None:
    link, clock = FakeLink(), Clock()
    s = SchedulerSide(ConnectorConfig(chunk_tokens=C), link, BS, load=False, clock=clock)
    s.set_namespaces(make_ns())
    toks = tokens(600)
    cache(link, s.namespaces[0], toks, range(2))
    req = Req("a", toks)
    assert s.get_num_new_matched_tokens(req, 0) == (0, False)
    assert link.client.calls == 0  # no lookups when loads are off
    s.update_state_after_alloc(req, 0)
    _, saves = s.build_step([("a", 0, 600)], lambda rid: list(range(10)))
    assert [op.index for op in saves["a"]] == [0, 1]


# ---------------------------------------------------------------- shared lookup index
@pytest.fixture
def indexed() -> Iterator[tuple[SchedulerSide, FakeLink, ShmIndexWriter]]:
    """A scheduler whose agent publishes a real shared index (writer in this process)."""
    name = f"/kvnode-test-sched-{uuid.uuid4().hex[:12]}"
    writer = ShmIndexWriter(name, 1024, generation=5)
    s, link, _ = side(tp_size=2)
    link.client.index_segment = name  # type: ignore[attr-defined]
    link.client.generation = 5  # type: ignore[attr-defined]
    try:
        yield s, link, writer
    finally:
        s.close()
        writer.close()


def publish(writer: ShmIndexWriter, s: SchedulerSide, toks: list[int], chunks: range) -> None:
    for ns in s.namespaces:
        keys = chunk_keys(ns, toks, C)
        for c in chunks:
            writer.insert(keys[c])


def test_index_answers_hits_and_misses_without_a_round_trip(
    indexed: tuple[SchedulerSide, FakeLink, ShmIndexWriter],
) -> None:
    s, link, writer = indexed
    toks = tokens(1100)
    publish(writer, s, toks, range(3))
    assert s.get_num_new_matched_tokens(Req("a", toks), 0) == (3 * C, False)
    assert s.get_num_new_matched_tokens(Req("b", tokens(1100, seed=9)), 0) == (0, False)
    assert link.client.calls == 0
    assert s.stats.index_lookups == 2 and s.stats.index_round_trips == 0


def test_index_first_miss_ends_the_prefix_and_every_rank_must_hit(
    indexed: tuple[SchedulerSide, FakeLink, ShmIndexWriter],
) -> None:
    s, link, writer = indexed
    toks = tokens(1300)
    publish(writer, s, toks, range(1))
    publish(writer, s, toks, range(2, 4))  # chunk 1 missing: 2 and 3 do not count
    writer.insert(chunk_keys(s.namespaces[0], toks, C)[1])  # on one rank only
    assert s.get_num_new_matched_tokens(Req("a", toks), 0) == (C, False)
    assert link.client.calls == 0


def test_index_miss_with_lower_tiers_asks_the_agent_from_the_miss_on(
    indexed: tuple[SchedulerSide, FakeLink, ShmIndexWriter],
) -> None:
    s, link, writer = indexed
    writer.set_lower_tiers(True)
    toks = tokens(1100)
    publish(writer, s, toks, range(2))
    asked: list[list[bytes]] = []
    lookup = link.client.lookup

    def recording(keys: list[bytes], promote: bool = True) -> list[int]:
        asked.append(list(keys))
        return lookup(keys, promote)

    link.client.lookup = recording  # type: ignore[method-assign]
    for r, ns in enumerate(s.namespaces):
        cache(link, ns, toks, range(2, 4), PENDING if r else HIT)
    req = Req("a", toks)
    assert s.get_num_new_matched_tokens(req, 0) == (None, False)  # chunk 2 promoting
    per_rank = [chunk_keys(ns, toks, C) for ns in s.namespaces]
    assert asked == [[per_rank[0][2], per_rank[0][3], per_rank[1][2], per_rank[1][3]]]
    for ns in s.namespaces:
        cache(link, ns, toks, range(2, 4))
    assert s.get_num_new_matched_tokens(req, 0) == (4 * C, False)
    # Everything in the index: no round trip even with lower tiers.
    asked.clear()
    publish(writer, s, toks, range(4))
    assert s.get_num_new_matched_tokens(Req("b", toks), 0) == (4 * C, False)
    assert asked == [] and s.stats.index_round_trips == 2


def test_stale_hit_is_planned_and_left_to_the_pin(
    indexed: tuple[SchedulerSide, FakeLink, ShmIndexWriter],
) -> None:
    """An entry evicted after the index answered: the load is planned all the same;
    the worker's pin fails and vLLM recomputes (test_connector_worker covers that)."""
    s, link, writer = indexed
    toks = tokens(1000)
    publish(writer, s, toks, range(2))
    req = Req("a", toks)
    assert s.get_num_new_matched_tokens(req, 0) == (2 * C, False)
    for ns in s.namespaces:
        writer.remove(chunk_keys(ns, toks, C)[1])
    s.update_state_after_alloc(req, 2 * C)
    loads, _ = s.build_step([("a", 0, 1000)], lambda rid: list(range(10)))
    assert [op.index for op in loads["a"]] == [0, 1]


def test_unusable_index_falls_back_to_the_agent(
    indexed: tuple[SchedulerSide, FakeLink, ShmIndexWriter],
) -> None:
    s, link, writer = indexed
    toks = tokens(1000)
    for ns in s.namespaces:
        cache(link, ns, toks, range(3))
    link.client.generation = 6  # type: ignore[attr-defined]  # another agent generation
    assert s.get_num_new_matched_tokens(Req("a", toks), 0) == (3 * C, False)
    assert link.client.calls == 1 and s.stats.index_lookups == 0
    link.client.generation = 5  # type: ignore[attr-defined]
    writer.close()  # the agent stopped: its index is closed
    assert s.get_num_new_matched_tokens(Req("b", toks), 0) == (3 * C, False)
    assert link.client.calls == 2 and s.stats.index_errors == 1
    link.client.index_segment = "/kvnode-test-no-such-index"  # type: ignore[attr-defined]
    assert s.get_num_new_matched_tokens(Req("c", toks), 0) == (3 * C, False)
    assert link.client.calls == 3


def test_index_not_consulted_when_the_agent_is_down(
    indexed: tuple[SchedulerSide, FakeLink, ShmIndexWriter],
) -> None:
    s, link, writer = indexed
    toks = tokens(1000)
    publish(writer, s, toks, range(3))
    link.down = True
    assert s.get_num_new_matched_tokens(Req("a", toks), 0) == (0, False)


def test_listed_disk_makes_a_miss_certain_and_asks_only_for_listed_chunks(
    indexed: tuple[SchedulerSide, FakeLink, ShmIndexWriter],
) -> None:
    """With the disk listed (its keys in a second segment), a chunk in neither the
    arena nor the listing ends the prefix without a round trip; a listed one is asked
    about (the agent promotes it). A listing of another agent generation is not
    trusted."""
    from kvnode.ipc.shmindex import LOWER_LISTED, listing_name

    s, link, writer = indexed
    listing = ShmIndexWriter(listing_name(writer.name), 1024, generation=5)
    try:
        writer.set_lower_mode(LOWER_LISTED)
        toks = tokens(1100)
        publish(writer, s, toks, range(1))
        assert s.get_num_new_matched_tokens(Req("a", toks), 0) == (C, False)
        assert link.client.calls == 0 and s.stats.index_listed_misses == 1
        # Chunk 1 on disk for one rank, in the arena for the other: ask the agent.
        per_rank = [chunk_keys(ns, toks, C) for ns in s.namespaces]
        writer.insert(per_rank[0][1])
        listing.insert(per_rank[1][1])
        for ns in s.namespaces:
            cache(link, ns, toks, range(1, 2), PENDING)
        assert s.get_num_new_matched_tokens(Req("b", toks), 0) == (None, False)
        assert link.client.calls == 1 and s.stats.index_round_trips == 1
        # A listing left by an earlier agent (another generation) is not believed.
        listing.close()
        listing = ShmIndexWriter(listing_name(writer.name), 1024, generation=6)
        assert s.get_num_new_matched_tokens(Req("c", tokens(1100, seed=3)), 0) == (0, False)
        assert link.client.calls == 2  # asked: the listing could not be trusted
    finally:
        listing.close()


def test_chunks_the_index_shows_stored_are_not_saved_again(
    indexed: tuple[SchedulerSide, FakeLink, ShmIndexWriter],
) -> None:
    """A request served by vLLM's own prefix cache (a shared system prompt) computes
    nothing kvnode lacks: its chunks that the index holds for every rank are not
    planned, so the worker makes no reserve that the agent would answer EXISTS."""
    s, link, writer = indexed
    toks = tokens(1100)
    publish(writer, s, toks, range(2))  # chunks 0 and 1 stored, on both ranks
    writer.insert(chunk_keys(s.namespaces[0], toks, C)[3])  # chunk 3 on one rank only
    req = Req("a", toks)
    # vLLM's prefix cache covered 1024 tokens: kvnode is asked about the rest only.
    assert s.get_num_new_matched_tokens(req, 1024) == (0, False)
    s.update_state_after_alloc(req, 0)
    _, saves = s.build_step([("a", 1024, 1100 - 1024)], lambda rid: list(range(40)))
    assert sorted({op.index for op in saves["a"]}) == [2, 3]
    assert s.stats.save_chunks_present == 2


def test_corrupt_index_is_a_miss_never_an_error_in_vllm(
    indexed: tuple[SchedulerSide, FakeLink, ShmIndexWriter],
) -> None:
    """A same-user process writes the index's header (a probe length of 2**40, which
    read as given makes a reader allocate terabytes) or its pid word: the scheduler
    answers a miss or asks the agent, and plans saves as usual."""
    import mmap

    import posix_ipc

    from kvnode.ipc import shmindex as S

    s, link, writer = indexed
    toks = tokens(1100)
    publish(writer, s, toks, range(3))
    assert s.get_num_new_matched_tokens(Req("a", toks), 0) == (3 * C, False)
    shm = posix_ipc.SharedMemory(writer.name, 0)
    buf = mmap.mmap(shm.fd, S.HEADER_BYTES, mmap.MAP_SHARED)
    shm.close_fd()
    words = memoryview(buf).cast("Q")
    try:
        for word, value in ((S._PROBE_MAX, 1 << 40), (S._PID, (1 << 64) - 1)):
            saved = words[word]
            words[word] = value
            req = Req(f"r{word}", toks)
            assert s.get_num_new_matched_tokens(req, 0) == (0, False)
            s.update_state_after_alloc(req, 0)
            _, saves = s.build_step([(req.request_id, 0, 1100)], lambda rid: list(range(40)))
            assert sorted({op.index for op in saves[req.request_id]}) == [0, 1, 2, 3]
            words[word] = saved
        assert s.stats.index_errors >= 2 and link.client.calls >= 2  # asked the agent
        assert s.get_num_new_matched_tokens(Req("b", toks), 0) == (3 * C, False)
    finally:
        words.release()
        buf.close()


def test_request_finished_says_whether_saves_were_planned() -> None:
    """Agent mode holds a finished request's blocks only when some step's metadata
    carried its saves: the workers name exactly those requests in get_finished."""
    s, _, _ = side()
    saved, unsaved = Req("a", tokens(700)), Req("b", tokens(100, seed=4))
    for req in (saved, unsaved):
        assert s.get_num_new_matched_tokens(req, 0) == (0, False)
        s.update_state_after_alloc(req, 0)
    blocks = list(range(20, 26))
    _, saves = s.build_step([("a", 0, 700), ("b", 0, 100)], lambda rid: blocks)
    assert set(saves) == {"a"}  # b has no full chunk
    assert s.request_finished("a") is True
    assert s.request_finished("b") is False
    assert s.request_finished("never-seen") is False
