"""Fault tolerance end to end: real daemon, real worker processes, real faults.

The promise: while a complete route remains, a worker failure loses no accepted request, shows
no gap or duplicate in any stream, and a greedy request answers exactly as without the failure;
`/ready` stays 200; the spare restores capacity; and a second fault is survived the same way.
"""
from __future__ import annotations

import json
import os
import signal
import threading
import time

import httpx
import pytest

from kevlard.cluster import pipeline_cpu_sets
from tests.daemon_proc import running_daemon
from tests.tiny_models import make_tiny_model

TOKEN = "test-admin-token"
N_REQUESTS = 6
MAX_TOKENS = 48


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("ft"), "llama", num_layers=6)


def daemon_args(model_dir, tmp_path, recovery="kevlar", extra=""):
    conf = tmp_path / "kevlard.toml"
    conf.write_text(f'recovery = "{recovery}"\n[server]\nadmin_token = "{TOKEN}"\n'
                    f"[health]\nheartbeat_interval_s = 0.1\nheartbeat_timeout_s = 1.0\n{extra}")
    return ["--config", str(conf), "--model", str(model_dir), "--devices", "cpu:6",
            "--pipelines", "2", "--stages", "3", "--spares", "1"]


def stream_one(url: str, i: int, out: dict, max_tokens: int = MAX_TOKENS) -> None:
    body = {"prompt": f"request {i}: " + "tell me more " * (i + 1), "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    pieces, finish, usage = [], None, None
    try:
        with httpx.Client(timeout=120) as c, c.stream("POST", url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                out[i] = {"error": r.status_code}
                return
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[len("data: "):])
                if "error" in chunk:
                    out[i] = {"error": chunk["error"]}
                    return
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for choice in chunk["choices"]:
                    pieces.append(choice["text"])
                    finish = choice["finish_reason"] or finish
    except httpx.HTTPError as e:
        out[i] = {"error": repr(e)}
        return
    out[i] = {"text": "".join(pieces), "finish": finish, "tokens": usage and usage["completion_tokens"]}


class ReadyProbe(threading.Thread):
    """Polls /ready the whole time and remembers every answer that was not 200."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url, self.bad, self.stop_flag = url, [], threading.Event()

    def run(self) -> None:
        with httpx.Client(timeout=5) as c:
            while not self.stop_flag.is_set():
                try:
                    code = c.get(self.url + "/ready").status_code
                except httpx.HTTPError as e:
                    code = repr(e)
                if code != 200:
                    self.bad.append(code)
                time.sleep(0.05)


def run_load(url: str, fault=None) -> dict:
    out: dict = {}
    threads = [threading.Thread(target=stream_one, args=(url, i, out)) for i in range(N_REQUESTS)]
    for t in threads:
        t.start()
    if fault is not None:
        wait_for_tokens(url)
        fault()
    for t in threads:
        t.join(180)
    return out


def wait_for_tokens(url: str, at_least: int = 8) -> None:
    """Until every pipeline is mid-generation, so the fault lands under in-flight requests: `at_least`
    tokens a pipeline more than when called (the daemon's count runs from its start)."""
    base = httpx.get(url + "/api/cluster").json()["stats"]["tokens_generated"]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        snap = httpx.get(url + "/api/cluster").json()
        if snap["stats"]["tokens_generated"] >= base + at_least * 2 and snap["num_running"] >= 2:
            return
        time.sleep(0.02)


def inject(url: str, worker: int, kind: str, duration_s: float | None = None) -> None:
    body = {"worker": worker, "kind": kind}
    if duration_s:
        body["duration_s"] = duration_s
    r = httpx.post(url + "/api/faults", json=body, headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 202, r.text


def wait_restored(url: str, timeout: float = 60.0, gone: int | None = None) -> dict:
    """Every pipeline on its own KV pool with live workers, and a spare ready again; `gone`: a
    worker just faulted, which must have been noticed and replaced first (right after the fault
    the cluster still looks restored)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        snap = httpx.get(url + "/api/cluster").json()
        states = {w["id"]: w["state"] for w in snap["workers"]}
        if gone is not None and (states.get(gone) not in (None, "dead")
                                 or any(gone in pl["route"] for pl in snap["pipelines"])):
            time.sleep(0.05)
            continue
        if (all(pl["state"] == "serving" for pl in snap["pipelines"])
                and all(states[w] == "healthy" for pl in snap["pipelines"] for w in pl["route"])
                and "spare" in states.values()):
            return snap
        time.sleep(0.05)
    raise AssertionError(f"capacity not restored: {json.dumps(snap)}")


@pytest.fixture(scope="module")
def reference(model_dir, tmp_path_factory):
    """The same requests on a daemon that nothing happens to."""
    tmp = tmp_path_factory.mktemp("ref")
    with running_daemon(daemon_args(model_dir, tmp), tmp) as daemon:
        out = run_load(daemon.url)
    assert all("text" in r and r["tokens"] == MAX_TOKENS for r in out.values()), out
    return out


def assert_same(got: dict, reference: dict) -> None:
    assert sorted(got) == list(range(N_REQUESTS)), f"lost requests: {got}"
    for i in range(N_REQUESTS):
        assert "error" not in got[i], f"request {i} failed: {got[i]}"
        assert got[i]["tokens"] == MAX_TOKENS, f"request {i}: gap or duplicate: {got[i]}"
        assert got[i]["text"] == reference[i]["text"], f"request {i} answered differently"
        assert got[i]["finish"] == "length"


@pytest.mark.parametrize("kind", ["kill", "hang", "device_error"])
@pytest.mark.parametrize("stage", [0, 1, 2])
def test_fault_is_survived_twice(model_dir, reference, tmp_path, kind, stage):
    with running_daemon(daemon_args(model_dir, tmp_path), tmp_path) as daemon:
        url = daemon.url
        probe = ReadyProbe(url)
        probe.start()
        routes = [pl["route"] for pl in httpx.get(url + "/api/cluster").json()["pipelines"]]
        got = run_load(url, lambda: inject(url, routes[0][stage], kind))
        assert_same(got, reference)
        snap = wait_restored(url)
        assert snap["recovery"]["failures"] == 1 and snap["recovery"]["rehosts"] == 1
        # the spare had allocated its KV memory while it stood by
        assert "kv_prepared=True" in next(line for line in daemon.log().splitlines() if "event restore" in line)
        # the second fault, on the other pipeline's worker of the same stage
        second = snap["pipelines"][1]["route"][stage]
        got = run_load(url, lambda: inject(url, second, kind))
        assert_same(got, reference)
        snap = wait_restored(url)
        assert snap["recovery"]["failures"] == 2 and snap["recovery"]["rehosts"] == 2
        probe.stop_flag.set()
        probe.join(5)
        assert probe.bad == [], f"/ready was not 200 while a route existed: {probe.bad[:5]}"
        if kind == "kill":
            log = daemon.log()
            assert "event reroute" in log and "event restore" in log
            # the dead worker kept pipeline 1's replica: its source stopped copying into that pool
            assert f"replication link down: link repl-{routes[1][stage]}-{routes[0][stage]}-" in log


def test_after_a_restore_the_new_replica_holder_gets_the_kv_written_before_it_took_over(model_dir, tmp_path):
    """The spare that restores pipeline 0's stage 1 also becomes the replica holder of pipeline
    1's stage 1. Pipeline 1's requests, running since before, resume from that replica when
    their own worker is killed next: none of them is replayed."""
    with running_daemon(daemon_args(model_dir, tmp_path), tmp_path) as daemon:
        url = daemon.url
        routes = [pl["route"] for pl in httpx.get(url + "/api/cluster").json()["pipelines"]]
        out: dict = {}
        threads = [threading.Thread(target=stream_one, args=(url, i, out, 400)) for i in range(N_REQUESTS)]
        for t in threads:
            t.start()
        wait_for_tokens(url)
        inject(url, routes[0][1], "kill")
        snap = wait_restored(url, gone=routes[0][1])
        assert snap["pipelines"][1]["replica_holders"][1] not in routes[0] + routes[1]  # the spare
        assert snap["num_running"] == N_REQUESTS  # the same requests still generate
        time.sleep(0.3)  # the backfill lands
        before = len(daemon.log())
        inject(url, routes[1][1], "kill")
        for t in threads:
            t.join(180)
        assert sorted(out) == list(range(N_REQUESTS))
        assert all(out[i].get("tokens") == 400 for i in out), out
        second = daemon.log()[before:]
        hows = [line.split("how=")[1].split()[0] for line in second.splitlines() if "event request_resumed" in line]
        assert hows and set(hows) == {"replica"}, hows


def test_a_live_worker_whose_steps_keep_failing_is_fenced_and_nothing_is_lost(model_dir, reference, tmp_path):
    with running_daemon(daemon_args(model_dir, tmp_path), tmp_path) as daemon:
        url = daemon.url
        victim = httpx.get(url + "/api/cluster").json()["pipelines"][0]["route"][1]
        got = run_load(url, lambda: inject(url, victim, "step_error"))
        assert_same(got, reference)
        snap = wait_restored(url)
        worker = next(w for w in snap["workers"] if w["id"] == victim)
        assert worker["state"] == "dead" and snap["recovery"]["failures"] == 1
        assert "fencing it" in daemon.log() and "event reroute" in daemon.log()


def test_a_worker_failing_a_few_steps_by_itself_serves_the_next_ones(model_dir, reference, tmp_path):
    """A middle stage that fails a step before reading its input left that input on the link, and
    every later step read its predecessor's: the worker failed forever without being fenced."""
    with running_daemon(daemon_args(model_dir, tmp_path), tmp_path) as daemon:
        url = daemon.url
        victim = httpx.get(url + "/api/cluster").json()["pipelines"][0]["route"][1]

        def fail_a_few_steps() -> None:
            # 10 ms of failing steps: on a busy machine the worker may run no step in such a window,
            # so again (a few times at most) until one did fail
            for _ in range(10):
                inject(url, victim, "step_error", 0.01)
                time.sleep(0.2)
                if httpx.get(url + "/api/cluster").json()["stats"]["steps_failed"] >= 1:
                    return

        got = run_load(url, fail_a_few_steps)
        assert_same(got, reference)
        snap = httpx.get(url + "/api/cluster").json()
        assert snap["stats"]["steps_failed"] >= 1  # the fault did land
        assert "event request_failed" not in daemon.log()


def test_a_replica_pool_smaller_than_the_pipelines_replicates_what_fits_and_replays_the_rest(
        model_dir, reference, tmp_path):
    # 48 blocks per pipeline; a replica pool of 8 % of the memory holds 4: a request's first blocks
    extra = "[kv]\nnum_blocks = 48\nreplica_fraction = 0.08\n"
    with running_daemon(daemon_args(model_dir, tmp_path, extra=extra), tmp_path) as daemon:
        url = daemon.url
        assert "48 KV blocks of 16 tokens per worker (and 4 in a replica pool)" in daemon.log()
        victim = httpx.get(url + "/api/cluster").json()["pipelines"][0]["route"][1]
        got = run_load(url, lambda: inject(url, victim, "kill"))
        assert_same(got, reference)
        snap = wait_restored(url)
        print(snap["recovery"])
        assert snap["recovery"]["requests_resumed_replica"] >= 1  # what fitted resumed from the replica
        assert snap["recovery"]["requests_replayed"] >= 1  # what held a block past it started again


def test_slow_worker_keeps_answers(model_dir, reference, tmp_path):
    with running_daemon(daemon_args(model_dir, tmp_path), tmp_path) as daemon:
        routes = [pl["route"] for pl in httpx.get(daemon.url + "/api/cluster").json()["pipelines"]]
        got = run_load(daemon.url, lambda: inject(daemon.url, routes[0][1], "slow", 2.0))
        assert_same(got, reference)


def test_primary_and_buddy_killed_together_every_request_completes(model_dir, reference, tmp_path):
    with running_daemon(daemon_args(model_dir, tmp_path), tmp_path) as daemon:
        url = daemon.url
        routes = [pl["route"] for pl in httpx.get(url + "/api/cluster").json()["pipelines"]]

        def both():
            inject(url, routes[0][1], "kill")
            inject(url, routes[1][1], "kill")

        got = run_load(url, both)
        assert_same(got, reference)
        snap = wait_restored(url)
        assert snap["recovery"]["requests_replayed"] >= 1


def test_after_both_workers_of_a_stage_are_replaced_the_next_failure_resumes_from_the_replica(
        model_dir, reference, tmp_path):
    """Both stage-1 workers die together and two spares take over, each a new replica holder of the
    other. The next failure of one of them is a reroute through the other that resumes requests from
    the replica, not a replay. (The second load repeats the first one's prompts, so they share the
    prefix cache's blocks, which a new holder never got: before the cache was started anew at a holder
    change, no request sharing them could claim a replica there, and every one of them replayed.)"""
    args = daemon_args(model_dir, tmp_path)
    args[args.index("--spares") + 1], args[args.index("--devices") + 1] = "2", "cpu:8"
    with running_daemon(args, tmp_path) as daemon:
        url = daemon.url
        routes = [pl["route"] for pl in httpx.get(url + "/api/cluster").json()["pipelines"]]

        def both():
            inject(url, routes[0][1], "kill")
            inject(url, routes[1][1], "kill")

        assert_same(run_load(url, both), reference)
        wait_restored(url)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            snap = httpx.get(url + "/api/cluster").json()
            if all(None not in pl["replica_holders"] for pl in snap["pipelines"]):
                break
            time.sleep(0.1)
        assert all(None not in pl["replica_holders"] for pl in snap["pipelines"]), snap["pipelines"]
        new = [pl["route"][1] for pl in snap["pipelines"]]
        assert snap["pipelines"][0]["replica_holders"][1] == new[1] and snap["pipelines"][1]["replica_holders"][1] == new[0]
        before = snap["recovery"]

        def kill_once_generating():  # (the stats count from the start: wait for this load's tokens)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                now = httpx.get(url + "/api/cluster").json()
                if now["stats"]["tokens_generated"] >= snap["stats"]["tokens_generated"] + 16 and now["num_running"] >= 2:
                    break
                time.sleep(0.02)
            inject(url, new[0], "kill")

        assert_same(run_load(url, kill_once_generating), reference)
        after = wait_restored(url, gone=new[0])["recovery"]
        assert after["reroutes"] == before["reroutes"] + 1
        assert after["requests_resumed_replica"] > before["requests_resumed_replica"]
        assert "event pipeline_down" not in daemon.log().split(f"worker_state worker={new[0]} state=dead")[-1]


def test_restart_baseline_loses_nothing(model_dir, reference, tmp_path):
    with running_daemon(daemon_args(model_dir, tmp_path, recovery="restart"), tmp_path) as daemon:
        url = daemon.url
        routes = [pl["route"] for pl in httpx.get(url + "/api/cluster").json()["pipelines"]]
        got = run_load(url, lambda: inject(url, routes[0][1], "kill"))
        assert_same(got, reference)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            snap = httpx.get(url + "/api/cluster").json()
            if snap["recovery"]["restarts"] == 1 and all(pl["state"] == "serving" for pl in snap["pipelines"]):
                break
            time.sleep(0.1)
        assert snap["recovery"]["restarts"] == 1 and snap["recovery"]["reroutes"] == 0
        assert routes[0][1] not in snap["pipelines"][0]["route"]
        got = run_load(url)
        assert_same(got, reference)


def _affinity(pid: int) -> set[frozenset]:
    """The cores each thread of a process may run on."""
    return {frozenset(os.sched_getaffinity(int(tid))) for tid in os.listdir(f"/proc/{pid}/task")}


def test_cpu_budget_per_pipeline_pins_each_pipeline_and_the_spare_that_joins_it(model_dir, reference, tmp_path):
    """cpu_budget = "pipeline" (the benchmarks' stand-in for devices of their own): every thread of a
    pipeline's workers runs on that pipeline's cores only; the spare that replaces a killed worker
    takes its pipeline's cores; answers stay the same."""
    expected = pipeline_cpu_sets(2, sorted(os.sched_getaffinity(0)))
    args = daemon_args(model_dir, tmp_path, extra='[cluster]\ncpu_budget = "pipeline"\n')
    with running_daemon(args, tmp_path) as daemon:
        url = daemon.url
        snap = httpx.get(url + "/api/cluster").json()
        pids = {w["id"]: w["pid"] for w in snap["workers"]}
        for p, pl in enumerate(snap["pipelines"]):
            for wid in pl["route"]:
                assert _affinity(pids[wid]) == {frozenset(expected[p])}, (p, wid)
        victim = snap["pipelines"][0]["route"][1]
        got = run_load(url, lambda: inject(url, victim, "kill"))
        assert_same(got, reference)
        snap = wait_restored(url)
        joined = snap["pipelines"][0]["route"][1]
        assert joined != victim
        pid = next(w["pid"] for w in snap["workers"] if w["id"] == joined)
        assert _affinity(pid) == {frozenset(expected[0])}


def test_requests_sent_while_a_worker_hangs_undetected_go_to_the_other_pipeline(model_dir, reference, tmp_path):
    """A worker that stopped heartbeating is judged only at the timeout (here a minute); meanwhile
    new requests must not queue behind it on its pipeline while the other pipeline has room."""
    args = daemon_args(model_dir, tmp_path)
    conf = tmp_path / "kevlard.toml"
    conf.write_text(conf.read_text().replace("heartbeat_timeout_s = 1.0", "heartbeat_timeout_s = 60.0"))
    with running_daemon(args, tmp_path) as daemon:
        snap = httpx.get(daemon.url + "/api/cluster").json()
        assert not any(pl["quiet"] for pl in snap["pipelines"])
        inject(daemon.url, snap["pipelines"][0]["route"][1], "hang")
        time.sleep(0.8)  # a few heartbeats missed, far from the timeout
        assert [pl["quiet"] for pl in httpx.get(daemon.url + "/api/cluster").json()["pipelines"]] == [True, False]
        out: dict = {}
        threads = [threading.Thread(target=stream_one, args=(daemon.url, i, out), daemon=True)
                   for i in range(N_REQUESTS)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 50  # the hung pipeline would hold its share for the 60 s timeout
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        assert_same(out, reference)
        assert httpx.get(daemon.url + "/api/cluster").json()["recovery"]["failures"] == 0


def test_a_hang_shorter_than_the_heartbeat_timeout_is_ridden_out(model_dir, reference, tmp_path):
    """An injected hang stops the worker at once, mid-step too; one that ends before the timeout is
    not a failure: the worker resumes its steps and every answer is the same."""
    with running_daemon(daemon_args(model_dir, tmp_path), tmp_path) as daemon:
        victim = httpx.get(daemon.url + "/api/cluster").json()["pipelines"][0]["route"][1]
        seen_quiet = []

        def hang_briefly() -> None:
            inject(daemon.url, victim, "hang", duration_s=0.6)
            deadline = time.monotonic() + 0.6
            while time.monotonic() < deadline and not seen_quiet:
                if httpx.get(daemon.url + "/api/cluster").json()["pipelines"][0]["quiet"]:
                    seen_quiet.append(True)  # its heartbeats did stop
                time.sleep(0.02)

        got = run_load(daemon.url, hang_briefly)
        assert seen_quiet
        assert_same(got, reference)
        snap = httpx.get(daemon.url + "/api/cluster").json()
        assert snap["recovery"]["failures"] == 0, daemon.log()[-3000:]
        assert next(w for w in snap["workers"] if w["id"] == victim)["state"] == "healthy"


def _pause(pid: int, seconds: float) -> None:
    os.kill(pid, signal.SIGSTOP)
    time.sleep(seconds)
    try:
        os.kill(pid, signal.SIGCONT)
    except ProcessLookupError:  # fenced (SIGKILLed) while it was stopped
        pass


def test_a_daemon_that_did_not_run_for_longer_than_the_heartbeat_timeout_fences_nobody(
        model_dir, reference, tmp_path):
    """A stalled daemon (a paused VM, a host starved of CPU, SIGSTOP) comes back to heartbeats it has
    not read yet: its workers were fine all along, and none of them may be declared hung."""
    with running_daemon(daemon_args(model_dir, tmp_path), tmp_path) as daemon:
        got = run_load(daemon.url, lambda: _pause(daemon.proc.pid, 2.5))
        assert_same(got, reference)
        snap = httpx.get(daemon.url + "/api/cluster").json()
        assert snap["recovery"]["failures"] == 0, daemon.log()[-3000:]
        assert all(w["state"] in ("healthy", "spare") for w in snap["workers"])
        assert "event monitor_stalled" in daemon.log()  # the operator is told why nothing was judged


def test_a_worker_that_does_not_run_for_longer_than_the_heartbeat_timeout_is_a_hang(model_dir, reference, tmp_path):
    """The same pause on one worker only is a hang: fenced, replaced, and nothing lost."""
    with running_daemon(daemon_args(model_dir, tmp_path), tmp_path) as daemon:
        snap = httpx.get(daemon.url + "/api/cluster").json()
        victim = snap["pipelines"][0]["route"][1]
        pid = next(w["pid"] for w in snap["workers"] if w["id"] == victim)
        got = run_load(daemon.url, lambda: _pause(pid, 2.5))
        assert_same(got, reference)
        snap = wait_restored(daemon.url)
        assert snap["recovery"]["failures"] == 1
        assert "reason=hang" in daemon.log()
