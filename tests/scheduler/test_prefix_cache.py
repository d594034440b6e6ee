"""Prefix caching in the scheduler, with plain integers for tokens: which blocks are shared, when,
and when the cache is forgotten."""
from kevlard.scheduler.request import Request
from kevlard.scheduler.scheduler import Scheduler


def make(num_blocks=16, replicated_stages=0, num_pipelines=1):
    return Scheduler(num_pipelines, num_blocks, 4, 64, 8, 8, True, replicated_stages)


def req(rid, tokens, max_tokens=3):
    return Request(id=rid, prompt_token_ids=list(tokens), max_tokens=max_tokens, stop_token_ids=frozenset({99}),
                   arrival=float(rid))


def step(s, pipeline=0, token=7):
    plan = s.schedule(pipeline)
    assert plan is not None
    return plan, s.update_from_output(plan.step_id, {c.req_id: token for c in plan.chunks if c.sample})


SYSTEM = [11, 12, 13, 14, 15, 16, 17, 18]  # two full blocks of 4


def test_a_request_sharing_full_blocks_computes_only_the_rest():
    s = make()
    s.add(req(1, SYSTEM + [1, 2, 3]))
    _, updates = step(s)
    assert updates[0].num_cached_tokens == 0
    s.add(req(2, SYSTEM + [4, 5]))
    plan, updates = step(s)
    chunk = next(c for c in plan.chunks if c.req_id == 2)
    assert (chunk.start, chunk.token_ids) == (8, (4, 5))
    assert updates[[u.req_id for u in updates].index(2)].num_cached_tokens == 8
    assert s.requests[2].block_ids[:2] == s.requests[1].block_ids[:2]  # the very same blocks


def test_the_last_prompt_token_is_always_computed_by_the_request_itself():
    s = make()
    s.add(req(1, SYSTEM))
    step(s)
    s.add(req(2, SYSTEM))  # fully cached, but its first output needs the last position's hidden state
    plan, _ = step(s)
    chunk = next(c for c in plan.chunks if c.req_id == 2)
    assert (chunk.start, chunk.num_tokens) == (4, 4)
    assert s.requests[2].block_ids[0] == s.requests[1].block_ids[0]
    assert s.requests[2].block_ids[1] != s.requests[1].block_ids[1]  # never writes a shared block


def test_different_earlier_tokens_never_match_even_with_an_equal_block():
    s = make()
    s.add(req(1, [1, 2, 3, 4] + [5, 6, 7, 8] + [9]))
    step(s)
    s.add(req(2, [0, 2, 3, 4] + [5, 6, 7, 8] + [9]))
    plan, _ = step(s)
    assert next(c for c in plan.chunks if c.req_id == 2).start == 0


def test_blocks_stay_cached_after_their_request_ends_and_are_reused_when_space_runs_out():
    s = make(num_blocks=4)
    s.add(req(1, SYSTEM + [1], max_tokens=1))
    step(s)
    assert s.num_running() == 0
    blocks = s.blocks[0]
    assert blocks.num_cached_blocks == 2 and blocks.num_free_blocks == 4  # cached, yet evictable
    s.add(req(2, SYSTEM + [2], max_tokens=1))
    plan, _ = step(s)
    assert plan.chunks[0].start == 8  # hit after the first request ended
    s.add(req(3, list(range(30, 43)), max_tokens=1))  # needs all 4 blocks: the cache gives way
    plan, _ = step(s)
    assert (plan.chunks[0].start, plan.chunks[0].num_tokens) == (0, 13)
    assert blocks.num_cached_blocks == 3  # request 3's own full blocks


def test_with_replication_blocks_are_shared_only_once_every_stage_holds_a_replica():
    s = make(replicated_stages=2)
    s.add(req(1, SYSTEM + [1, 2, 3], max_tokens=10))
    step(s)
    s.add(req(2, SYSTEM + [4]))
    plan, _ = step(s)
    assert next(c for c in plan.chunks if c.req_id == 2).start == 0  # nothing replicated yet
    s.on_replica_ack(0, 0, ((1, 0, 0, 11),))
    s.add(req(3, SYSTEM + [5]))
    plan, _ = step(s)
    assert next(c for c in plan.chunks if c.req_id == 3).start == 0  # stage 1 not yet
    s.on_replica_ack(0, 1, ((1, 0, 0, 11),))
    s.add(req(4, SYSTEM + [6]))
    plan, _ = step(s)
    assert next(c for c in plan.chunks if c.req_id == 4).start == 8
    # its replica watermark starts at the shared blocks: a failover resumes it from there
    assert s.requests[4].replicated == {0: 8, 1: 8}
    resumed = dict((rid, (how, n)) for rid, how, n in s.resume_after_failover(0, 1))
    assert resumed[4] == ("replica", 1) and s.requests[4].num_computed_tokens == 8


def test_replica_acks_that_come_before_the_steps_result_still_share_the_blocks():
    """A source ships (and acks) what a step wrote as soon as it wrote it, before the step's result
    reaches the daemon; a short request may end before any later ack: its prompt's blocks are
    shared all the same, once the result is in."""
    s = make(replicated_stages=2)
    s.add(req(1, SYSTEM + [1], max_tokens=2))
    plan = s.schedule(0)
    s.on_replica_ack(0, 0, ((1, 0, 0, 9),))
    s.on_replica_ack(0, 1, ((1, 0, 0, 9),))
    s.update_from_output(plan.step_id, {1: 7})
    step(s)  # its last token: it ends without another ack
    assert s.num_running() == 0
    s.add(req(2, SYSTEM + [2]))
    plan, _ = step(s)
    assert next(c for c in plan.chunks if c.req_id == 2).start == 8


def test_a_failover_keeps_the_cache_but_claims_no_replica_where_there_is_none():
    s = make(replicated_stages=2)
    s.add(req(1, SYSTEM + [1], max_tokens=10))
    step(s)
    s.on_replica_ack(0, 0, ((1, 0, 0, 9),))
    s.on_replica_ack(0, 1, ((1, 0, 0, 9),))
    # stage 1 fails: its buddy's replica, which holds every published block, serves from now on
    s.pause(0)
    s.resume_after_failover(0, 1)
    s.forget_replicas(0, 1)
    s.activate(0)
    s.add(req(2, SYSTEM + [2]))
    plan, _ = step(s)
    assert next(c for c in plan.chunks if c.req_id == 2).start == 8
    assert s.requests[2].replicated == {0: 8}  # stage 1 has no replica any more


def test_a_new_replica_holder_starts_the_cache_anew_so_that_later_requests_replicate_again():
    """After the holder of stage 1 changed, the new one never got the cached system prompt's blocks
    (only what running requests wrote is backfilled). A request that shared them would begin with
    no replica at stage 1, and its acks, which start past the shared blocks, would never count: a
    failure would replay it whole. The cache starts anew instead, and such a request resumes."""
    s = make(replicated_stages=2)
    s.add(req(1, SYSTEM + [1], max_tokens=2))
    step(s)
    s.on_replica_ack(0, 0, ((1, 0, 0, 9),))
    s.on_replica_ack(0, 1, ((1, 0, 0, 9),))
    step(s)  # request 1 ends; its prompt's blocks stay in the cache
    s.new_replica_holder(0, 1)
    s.add(req(2, SYSTEM + [2], max_tokens=10))
    plan, _ = step(s)
    chunk = next(c for c in plan.chunks if c.req_id == 2)
    assert chunk.start == 0  # not shared: the new holder does not have those blocks
    for stage in (0, 1):  # what the sources ack for what the step wrote
        s.on_replica_ack(0, stage, ((2, 0, chunk.start, chunk.start + chunk.num_tokens),))
    assert s.requests[2].replicated == {0: 9, 1: 9}
    resumed = dict((rid, (how, n)) for rid, how, n in s.resume_after_failover(0, 1))
    assert resumed[2] == ("replica", 0)
    # and once replicated everywhere, its blocks are shared again
    s.add(req(3, SYSTEM + [3]))
    plan, _ = step(s)
    assert next(c for c in plan.chunks if c.req_id == 3).start == 8


def test_a_hand_back_forgets_the_cache_but_running_requests_keep_their_blocks():
    s = make()
    s.add(req(1, SYSTEM + [1], max_tokens=10))
    step(s)
    shared = s.requests[1].block_ids[:2]
    s.drop_prefix_cache(0)
    s.add(req(2, SYSTEM + [2]))
    plan, _ = step(s)
    assert next(c for c in plan.chunks if c.req_id == 2).start == 0
    assert s.requests[1].block_ids[:2] == shared
    assert not set(shared) & set(s.requests[2].block_ids)


def test_shared_blocks_are_moved_once():
    s = make()
    s.add(req(1, SYSTEM + [1], max_tokens=10))
    step(s)
    s.add(req(2, SYSTEM + [2], max_tokens=10))
    step(s)
    ids = s.block_ids_of(0)
    assert len(ids) == len(set(ids)) == 4  # 2 shared + 1 each
