"""The scheduler as a pure state machine, with plain integers for tokens."""
import pytest

from kevlard.scheduler.block_manager import BlockManager
from kevlard.scheduler.request import Request
from kevlard.scheduler.scheduler import Scheduler


def make(num_pipelines=1, num_blocks=16, block_size=4, budget=8, max_running=8, max_waiting=4,
         prefix_caching=True, replicated_stages=0):
    return Scheduler(num_pipelines, num_blocks, block_size, budget, max_running, max_waiting, prefix_caching,
                     replicated_stages)


def req(rid, prompt_len=6, max_tokens=3, arrival=None, eos=frozenset({99})):
    return Request(id=rid, prompt_token_ids=list(range(1, prompt_len + 1)), max_tokens=max_tokens,
                   stop_token_ids=eos, arrival=float(rid if arrival is None else arrival))


def run_step(s, pipeline, token=7):
    plan = s.schedule(pipeline)
    assert plan is not None
    return plan, s.update_from_output(plan.step_id, {c.req_id: token for c in plan.chunks if c.sample})


def test_prefill_is_chunked_under_the_token_budget_and_samples_only_at_the_end():
    s = make(budget=4)
    s.add(req(1, prompt_len=10))
    plan, updates = run_step(s, 0)
    assert [(c.start, c.num_tokens, c.sample) for c in plan.chunks] == [(0, 4, False)]
    assert plan.chunks[0].token_ids == (1, 2, 3, 4)
    assert updates == []
    run_step(s, 0)
    plan, updates = run_step(s, 0)
    assert [(c.start, c.num_tokens, c.sample) for c in plan.chunks] == [(8, 2, True)]
    assert [u.new_token_ids for u in updates] == [[7]]


def test_decode_feeds_the_last_sampled_token_and_finishes_at_max_tokens():
    s = make()
    s.add(req(1, prompt_len=3, max_tokens=3))
    tokens = []
    for t in (11, 12, 13):
        plan, updates = run_step(s, 0, token=t)
        tokens += updates[0].new_token_ids
    assert tokens == [11, 12, 13]
    assert updates[0].finish_reason == "length"
    assert plan.chunks[0].token_ids == (12,) and plan.chunks[0].output_index == 2
    assert s.blocks[0].num_free_blocks == 16 and s.num_running() == 0


def test_stop_token_finishes_with_stop_and_frees_blocks():
    s = make()
    s.add(req(1, max_tokens=10))
    _, updates = run_step(s, 0, token=99)
    assert updates[0].finish_reason == "stop"
    assert s.blocks[0].num_free_blocks == 16


def test_a_request_whose_sampling_failed_ends_alone_and_the_batch_goes_on():
    """The worker reports SAMPLING_FAILED for one request of the batch: that request ends with an
    error and frees its blocks; the other one got its token and keeps running."""
    from kevlard.gpu.sampler import SAMPLING_FAILED

    s = make()
    s.add(req(1, prompt_len=3, max_tokens=5))
    s.add(req(2, prompt_len=3, max_tokens=5))
    plan = s.schedule(0)
    assert {c.req_id for c in plan.chunks if c.sample} == {1, 2}
    updates = s.update_from_output(plan.step_id, {1: SAMPLING_FAILED, 2: 7})
    assert [(u.req_id, u.new_token_ids, u.finish_reason) for u in updates] == [(1, [], "error"), (2, [7], None)]
    assert 1 not in s.requests and s.num_running() == 1
    _, updates = run_step(s, 0, token=8)
    assert [(u.req_id, u.new_token_ids) for u in updates] == [(2, [8])]


def test_in_flight_requests_are_not_scheduled_twice():
    s = make()
    s.add(req(1))
    first = s.schedule(0)
    assert first is not None
    assert s.schedule(0) is None  # its only request is in flight
    s.add(req(2))
    second = s.schedule(0)
    assert [c.req_id for c in second.chunks] == [2]


def test_requests_spread_over_pipelines_by_load():
    s = make(num_pipelines=2)
    for i in range(4):
        s.add(req(i))
    s.schedule(0)
    assert [len(r) for r in s.running] == [2, 2]


def test_new_requests_avoid_a_quiet_pipeline_while_another_has_room():
    s = make(num_pipelines=2, max_running=2)
    s.add(req(0))
    s.schedule(0)
    assert [len(r) for r in s.running] == [1, 0]
    s.quiet = {1}  # pipeline 1 has a worker that missed heartbeats: the less loaded one, all the same
    s.add(req(1))
    s.schedule(0)
    assert [len(r) for r in s.running] == [2, 0]
    s.add(req(2))  # pipeline 0 is full: the quiet one takes it rather than let it wait
    s.schedule(0)
    assert [len(r) for r in s.running] == [2, 1]


def test_waiting_queue_bound():
    s = make(max_waiting=2, max_running=1)
    s.add(req(1))  # runs at once
    s.add(req(2))
    s.add(req(3))
    assert [r.id for r in s.waiting] == [2, 3] and not s.can_add()
    with pytest.raises(OverflowError):
        s.add(req(4))


def test_only_requests_that_cannot_run_count_against_the_waiting_queue():
    # a burst arriving between two steps: every request fits a running set, none has to queue
    s = make(num_pipelines=2, max_waiting=1, max_running=4, num_blocks=32)
    for rid in range(8):
        s.add(req(rid))
    assert [len(r) for r in s.running] == [4, 4] and not s.waiting and s.admitted == {0, 1}
    s.add(req(8))  # both running sets are full: it waits, and the next one has no place
    assert [r.id for r in s.waiting] == [8] and not s.can_add()


def test_admission_waits_for_free_blocks():
    s = make(num_blocks=3, block_size=4, budget=64)
    s.add(req(1, prompt_len=8))  # needs 3 blocks with its first output token
    s.add(req(2, prompt_len=8))
    plan = s.schedule(0)
    assert [c.req_id for c in plan.chunks] == [1]
    assert s.num_waiting() == 1


@pytest.mark.parametrize("prefix_caching", [False, True])
def test_preemption_by_recompute_when_blocks_run_out(prefix_caching):
    s = make(num_blocks=4, block_size=4, budget=64, prefix_caching=prefix_caching)
    s.add(req(1, prompt_len=7, max_tokens=20))
    s.add(req(2, prompt_len=7, max_tokens=20))
    run_step(s, 0)  # both prefilled: 2 blocks each (8 tokens), all 4 used
    assert s.blocks[0].num_free_blocks == 0
    run_step(s, 0)  # position 7 still fits in the second block
    # the next decodes need a third block each: the later arrival is preempted
    plan, _ = run_step(s, 0)
    assert [c.req_id for c in plan.chunks] == [1]
    assert s.num_preemptions == 1 and s.requests[2].num_computed_tokens == 0
    assert s.requests[2].output_token_ids == [7, 7]  # kept: recomputed, not resampled
    # request 2 resumes by recomputing prompt + its output when 1 is done
    s.abort(1)
    plan, updates = run_step(s, 0, token=8)
    if prefix_caching:  # its two full blocks (prompt + first output) were kept in the cache
        assert (plan.chunks[0].start, plan.chunks[0].token_ids) == (8, (7,))
    else:
        assert plan.chunks[0].token_ids == tuple(range(1, 8)) + (7, 7)
    assert plan.chunks[0].output_index == 2
    assert updates[0].new_token_ids == [8]


def test_abort_in_flight_frees_blocks_and_drops_its_output():
    s = make()
    s.add(req(1))
    plan = s.schedule(0)
    s.abort(1)
    assert s.blocks[0].num_free_blocks == 16
    assert s.update_from_output(plan.step_id, {1: 5}) == []


def test_failed_step_reruns_the_same_tokens():
    s = make()
    s.add(req(1, prompt_len=5))
    plan = s.schedule(0)
    assert s.fail_step(plan.step_id) == [1]
    again = s.schedule(0)
    assert (again.chunks[0].start, again.chunks[0].num_tokens) == (0, 5)


def test_deactivated_pipeline_hands_its_requests_to_the_others():
    s = make(num_pipelines=2)
    s.add(req(1))
    s.add(req(2))
    s.schedule(0)
    s.schedule(1)
    p_of_1 = s.requests[1].pipeline
    s.fail_step(next(iter(k for k, v in s.in_flight.items() if v.pipeline == p_of_1)))
    s.deactivate(p_of_1)
    plan = s.schedule(1 - p_of_1)
    assert plan is not None and [c.req_id for c in plan.chunks] == [1]
    assert s.schedule(p_of_1) is None


def test_block_manager_pairs():
    bm = BlockManager(2, 4)
    r = req(1)
    assert bm.can_allocate(r, 8) and not bm.can_allocate(r, 9)
    bm.allocate(r, 5)
    assert len(r.block_ids) == 2 and bm.num_free_blocks == 0
    with pytest.raises(RuntimeError):
        bm.allocate(r, 9)
    bm.free(r)
    assert bm.num_free_blocks == 2 and r.block_ids == []


def test_a_stale_step_cannot_touch_requests_rescheduled_since():
    s = make()
    s.add(req(1, prompt_len=3, max_tokens=5))
    stale = s.schedule(0)
    s.resume_after_failover(0, 0)  # a failover: the request is scheduled again
    fresh = s.schedule(0)
    assert s.fail_step(stale.step_id) == []  # the old micro-batch is written off ...
    assert s.update_from_output(stale.step_id, {1: 9}) == []  # ... or answers late: ignored
    assert s.schedule(0) is None  # still in flight in the fresh step, not scheduled twice
    updates = s.update_from_output(fresh.step_id, {1: 7})
    assert [u.new_token_ids for u in updates] == [[7]] and s.requests[1].output_token_ids == [7]


def test_replica_watermark_grows_only_over_contiguous_spans():
    s = make()
    s.add(req(1, prompt_len=8, max_tokens=10))
    run_step(s, 0)
    s.on_replica_ack(0, 1, ((1, 0, 4, 9),))  # a holder that missed tokens 0-3 claims nothing
    assert s.requests[1].replicated.get(1, 0) == 0
    s.on_replica_ack(0, 1, ((1, 0, 0, 8),))
    s.on_replica_ack(0, 1, ((1, 0, 8, 9),))
    assert s.requests[1].replicated[1] == 9
    assert s.resume_after_failover(0, 1) == [(1, "replica", 0)]


def test_a_replica_ack_of_an_earlier_admission_of_the_request_claims_nothing():
    """The request's KV was shipped, then it went back to waiting (its pipeline went down) and was
    admitted again into other blocks. An ack of the old shipment arriving now must not claim the
    new blocks are replicated: a failover would resume from KV the holder does not have."""
    s = make(replicated_stages=2)
    s.add(req(1, prompt_len=8, max_tokens=10))
    first, _ = run_step(s, 0)
    assert [c.epoch for c in first.chunks] == [0]
    s.deactivate(0)  # its requests replay: back to waiting, blocks freed
    s.activate(0)
    again = s.schedule(0)
    assert [c.epoch for c in again.chunks] == [1]
    s.on_replica_ack(0, 1, ((1, 0, 0, 9),))  # the late ack of the first admission's KV
    assert s.requests[1].replicated.get(1, 0) == 0
    s.on_replica_ack(0, 1, ((1, 1, 0, 8),))  # this admission's
    assert s.requests[1].replicated[1] == 8


def test_failed_steps_are_counted_until_one_succeeds():
    s = make()
    s.add(req(1, prompt_len=3, max_tokens=5))
    for expected in (1, 2, 3):
        s.fail_step(s.schedule(0).step_id)
        assert s.requests[1].failed_steps == expected
    run_step(s, 0)
    assert s.requests[1].failed_steps == 0


def test_blocks_are_handed_out_lowest_id_first_also_after_frees():
    bm = BlockManager(8, 4, prefix_caching=False)
    a, b = req(1, prompt_len=8), req(2, prompt_len=8)
    bm.allocate(a, 8)
    bm.allocate(b, 8)
    assert a.block_ids == [0, 1] and b.block_ids == [2, 3]
    bm.free(a)
    c = req(3, prompt_len=12)
    bm.allocate(c, 12)
    assert c.block_ids == [0, 1, 4]  # the replica pool holds the low ids: they are used first


def test_while_a_stage_is_served_from_a_smaller_replica_pool_the_pipeline_stays_below_it():
    s = make(num_blocks=16, block_size=4, budget=64, replicated_stages=2)
    for rid, prompt_len in ((1, 8), (2, 8), (3, 8)):
        s.add(req(rid, prompt_len=prompt_len, max_tokens=20))
    run_step(s, 0)
    held = {r.id: list(r.block_ids) for r in s.running[0]}
    assert held == {1: [0, 1, 2], 2: [3, 4, 5], 3: [6, 7, 8]}
    for r in s.running[0]:
        r.replicated = {0: 8, 1: 8}  # both stages' buddies hold the prompts
    # stage 1 is served from its buddy's replica pool, which holds blocks 0-4
    s.limit_blocks(0, 5)
    assert {r.id: r.block_ids for r in s.running[0]} == {1: [0, 1, 2], 2: [3, 4], 3: []}
    assert {r.id: r.replicated for r in s.running[0]} == {1: {0: 8, 1: 8}, 2: {0: 8, 1: 8}, 3: {0: 0, 1: 0}}
    resumed = s.resume_after_failover(0, 1)
    assert resumed == [(1, "replica", 0), (2, "replica", 0), (3, "replay", 8)]
    assert s.blocks[0].num_free_blocks == 0  # blocks 5-15 are not handed out now
    assert not s.blocks[0].can_allocate(s.requests[3], 1)
    # its own pool again: everything is usable, and the requests go on
    s.limit_blocks(0, None)
    assert s.blocks[0].num_free_blocks == 11
    plan, _ = run_step(s, 0)
    assert {c.req_id: (c.start, c.num_tokens) for c in plan.chunks} == {1: (8, 1), 2: (8, 1), 3: (0, 9)}
    assert s.requests[2].block_ids == [3, 4, 5]


def test_a_request_too_long_for_the_replica_pool_moves_to_a_pipeline_it_fits():
    s = make(num_pipelines=2, num_blocks=16, block_size=4, budget=64)
    s.add(req(1, prompt_len=8, max_tokens=40))
    run_step(s, 0)
    assert s.requests[1].pipeline == 0
    s.limit_blocks(0, 2)  # pipeline 0 now serves a stage from a 2-block replica pool
    s.resume_after_failover(0, 1)
    assert s.schedule(0) is None  # 9 tokens need 3 blocks: it cannot run here now
    assert s.requests[1].status.name == "WAITING"
    plan, _ = run_step(s, 1)
    assert s.requests[1].pipeline == 1 and plan.chunks[0].num_tokens == 9
