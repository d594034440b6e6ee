"""Health checks: a live worker whose heartbeat is older than the timeout is a hang, seen as soon
as the timeout runs out."""
from kevlard.scheduler.health import HealthMonitor


def test_a_live_worker_past_the_heartbeat_timeout_is_a_hang_and_the_dead_are_not_checked():
    m = HealthMonitor(heartbeat_timeout_s=1.0, step_timeout_s=30.0)
    beats = {0: ("healthy", 10.0), 1: ("healthy", 10.5), 2: ("dead", 1.0), 3: ("spare", 10.9)}
    assert m.stale_workers(11.2, beats) == [(0, "hang")]
    assert m.stale_workers(10.9, beats) == []


def test_the_next_check_is_due_when_the_oldest_live_heartbeat_runs_out():
    m = HealthMonitor(heartbeat_timeout_s=1.0, step_timeout_s=30.0)
    beats = {0: ("healthy", 10.2), 1: ("rehosting", 10.1), 2: ("dead", 1.0), 3: ("starting", 0.0)}
    assert m.next_expiry(beats) == 11.2  # worker 0's; the dead one's long past expiry does not count
    assert m.next_expiry({3: ("starting", 10.0)}) == 20.0  # a starting worker's, once it has beaten
    assert m.next_expiry({2: ("dead", 1.0)}) is None


def test_a_check_that_ran_more_than_an_interval_late_does_not_judge():
    assert HealthMonitor.blind(late_s=2.5, interval_s=0.1)  # the daemon did not run: heartbeats unread
    assert HealthMonitor.blind(late_s=0.11, interval_s=0.1)
    assert not HealthMonitor.blind(late_s=0.05, interval_s=0.1)  # ordinary scheduling jitter


def test_a_healthy_worker_a_few_heartbeats_late_is_quiet_before_it_is_judged():
    m = HealthMonitor(heartbeat_timeout_s=1.0, step_timeout_s=30.0)
    beats = {0: ("healthy", 10.0), 1: ("healthy", 10.45), 2: ("dead", 1.0), 3: ("spare", 10.0)}
    assert m.quiet_workers(10.5, beats, after_s=0.3) == {0}  # not the dead nor the idle spare
    assert m.stale_workers(10.5, beats) == []


def test_a_spare_hosting_a_stage_gets_longer_before_it_is_judged_hung():
    """Its low-priority build can hold the heartbeat thread off on a loaded CPU (the pipeline serves
    through the buddy meanwhile): it is judged at ten timeouts, not one."""
    m = HealthMonitor(heartbeat_timeout_s=1.0, step_timeout_s=30.0)
    beats = {0: ("rehosting", 10.0), 1: ("spare", 10.0)}
    assert m.stale_workers(12.0, beats) == [(1, "hang")]
    assert m.stale_workers(20.5, beats) == [(0, "hang"), (1, "hang")]
    assert m.next_expiry({0: ("rehosting", 10.0)}) == 20.0


def test_a_serving_worker_computing_one_step_past_the_step_timeout_is_stuck():
    m = HealthMonitor(heartbeat_timeout_s=1.0, step_timeout_s=30.0)
    computing = {0: ("healthy", 31.0), 1: ("healthy", 29.0), 2: ("dead", 99.0), 3: ("spare", 0.0)}
    assert m.stuck_workers(computing) == [0]


def test_a_worker_that_hangs_while_starting_is_judged_like_a_spare_hosting_a_stage():
    """A restarted pipeline's worker that hung loading its stage kept the pipeline down until the
    start timeout (120 s): it is judged at ten heartbeat timeouts, once it has sent one."""
    m = HealthMonitor(heartbeat_timeout_s=1.0, step_timeout_s=30.0)
    beats = {0: ("starting", 10.0), 1: ("starting", 0.0)}  # worker 1: no heartbeat yet
    assert m.stale_workers(19.9, beats) == []
    assert m.stale_workers(20.5, beats) == [(0, "hang")]
