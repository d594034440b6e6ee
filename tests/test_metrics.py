"""`GET /metrics` of a real daemon, read with prometheus_client's own parser: vLLM's names so existing
dashboards work, counts that match what was served, and failures, reroutes, rehosts and resumed
requests as they happen."""
from __future__ import annotations

import threading
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.daemon_proc import running_daemon
from tests.test_fault_tolerance import stream_one, wait_for_tokens, wait_restored
from tests.tiny_models import make_tiny_model

TOKEN = "test-admin-token"

VLLM_NAMES = {
    "vllm:num_requests_running": "gauge",
    "vllm:num_requests_waiting": "gauge",
    "vllm:kv_cache_usage_perc": "gauge",
    "vllm:time_to_first_token_seconds": "histogram",
    "vllm:e2e_request_latency_seconds": "histogram",
    "vllm:inter_token_latency_seconds": "histogram",
    "vllm:prompt_tokens": "counter",
    "vllm:generation_tokens": "counter",
    "vllm:prefix_cache_queries": "counter",
    "vllm:prefix_cache_hits": "counter",
    "vllm:request_success": "counter",
}
KEVLARD_NAMES = {
    "kevlard_worker_up": "gauge",
    "kevlard_failures": "counter",
    "kevlard_reroutes": "counter",
    "kevlard_rehosts": "counter",
    "kevlard_recovery_seconds": "histogram",
    "kevlard_kv_replication_lag_tokens": "gauge",
    "kevlard_requests_resumed": "counter",
}


class Scrape:
    def __init__(self, text: str):
        self.families = {f.name: f for f in text_string_to_metric_families(text)}

    def value(self, sample: str, **labels: str) -> float:
        """The sum of the samples named `sample` whose labels include `labels`."""
        family = sample.removesuffix("_total").removesuffix("_count").removesuffix("_sum")
        found = [s.value for s in self.families[family].samples
                 if s.name == sample and labels.items() <= s.labels.items()]
        assert found, f"no sample {sample}{labels}"
        return sum(found)

    def labels(self, family: str) -> list[dict[str, str]]:
        return [s.labels for s in self.families[family].samples]


def scrape(url: str) -> Scrape:
    r = httpx.get(url + "/metrics", timeout=10)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    return Scrape(r.text)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("metrics"), "llama", num_layers=4)


def test_metrics_count_what_was_served_and_what_failed(model_dir, tmp_path):
    conf = tmp_path / "kevlard.toml"
    conf.write_text(f'[server]\nadmin_token = "{TOKEN}"\n'
                    "[health]\nheartbeat_interval_s = 0.1\nheartbeat_timeout_s = 1.0\n")
    args = ["--config", str(conf), "--model", str(model_dir), "--devices", "cpu:5", "--pipelines", "2",
            "--stages", "2", "--spares", "1"]
    with running_daemon(args, tmp_path) as daemon:
        url = daemon.url
        snap = wait_restored(url)  # the spare is up
        model = snap["model"]

        # before any request: every name is there, with its type and vLLM's model_name label
        m = scrape(url)
        for name, kind in {**VLLM_NAMES, **KEVLARD_NAMES}.items():
            assert name in m.families, name
            assert m.families[name].type == kind, name
        for name in VLLM_NAMES:
            assert all(labels.get("model_name") == model for labels in m.labels(name)), name
        assert m.value("vllm:generation_tokens_total") == 0
        up = {labels["worker"]: s.value for labels, s in
              zip(m.labels("kevlard_worker_up"), m.families["kevlard_worker_up"].samples)}
        assert up == {str(w["id"]): 1.0 for w in snap["workers"]} and len(up) == 5
        assert {labels["device"] for labels in m.labels("kevlard_worker_up")} == {f"cpu:{i}" for i in range(5)}

        # a few requests: the counters say exactly what the responses said
        usages = []
        with daemon.client() as c:
            for i, max_tokens in enumerate((3, 5, 8)):
                r = c.post("/v1/completions", json={"prompt": f"hello {i} " * (i + 1), "max_tokens": max_tokens,
                                                    "ignore_eos": True, "temperature": 0})
                assert r.status_code == 200, r.text
                usages.append(r.json()["usage"])
        m = scrape(url)
        generated = sum(u["completion_tokens"] for u in usages)
        assert generated == 16
        assert m.value("vllm:generation_tokens_total", model_name=model) == generated
        assert m.value("vllm:prompt_tokens_total", model_name=model) == sum(u["prompt_tokens"] for u in usages)
        assert m.value("vllm:prefix_cache_queries_total") == sum(u["prompt_tokens"] for u in usages)
        assert m.value("vllm:prefix_cache_hits_total") == sum(
            u["prompt_tokens_details"]["cached_tokens"] for u in usages)
        assert m.value("vllm:request_success_total", finished_reason="length") == 3
        assert m.value("vllm:request_success_total", finished_reason="stop") == 0
        assert m.value("vllm:time_to_first_token_seconds_count") == 3
        assert m.value("vllm:e2e_request_latency_seconds_count") == 3
        assert 0 < m.value("vllm:inter_token_latency_seconds_count") <= generated - 3
        assert m.value("vllm:num_requests_running") == 0 and m.value("vllm:num_requests_waiting") == 0
        assert m.value("vllm:kv_cache_usage_perc") == 0.0
        assert m.value("kevlard_failures_total") == 0 and m.value("kevlard_reroutes_total") == 0

        # a stop string ends a request as finished ("stop"), not aborted; a temperature of 1e-300
        # (valid; it used to turn the probabilities into NaN and fence every worker it ran on) samples
        # the greedy answer, and nothing fails
        with daemon.client() as c:
            body = {"prompt": "stop here", "max_tokens": 8, "ignore_eos": True}
            first = c.post("/v1/completions", json={**body, "temperature": 0}).json()
            greedy = first["choices"][0]["text"]
            tiny = c.post("/v1/completions", json={**body, "temperature": 1e-300})
            assert tiny.status_code == 200 and tiny.json()["choices"][0]["text"] == greedy
            stop = next(greedy[i:i + 2] for i in range(1, len(greedy) - 1) if greedy[i:i + 2].strip())
            last = c.post("/v1/completions", json={**body, "temperature": 0, "stop": stop}).json()
            stopped = last["choices"][0]
            assert stopped["finish_reason"] == "stop" and stopped["text"] == greedy[:greedy.index(stop)]
            served = sum(r["usage"]["completion_tokens"] for r in (first, tiny.json(), last))
        m = scrape(url)
        assert m.value("vllm:request_success_total", finished_reason="stop") == 1
        assert m.value("vllm:request_success_total", finished_reason="abort") == 0
        assert m.value("vllm:request_success_total", finished_reason="length") == 3 + 2
        assert m.value("kevlard_failures_total") == 0
        # /api/cluster counts the same finished requests as /metrics, the stopped one with them
        finished = sum(m.value("vllm:request_success_total", finished_reason=r) for r in ("stop", "length"))
        assert httpx.get(url + "/api/cluster").json()["stats"]["requests_finished"] == finished
        # tokens sampled past the stop string in the same step count as generated, not as served
        assert generated + served <= m.value("vllm:generation_tokens_total") <= generated + 3 * 8
        generated = m.value("vllm:generation_tokens_total")

        # a worker of pipeline 0 is killed under load: the failure, the reroute through the buddy,
        # the rehost on the spare and the resumed requests are counted as the engine counts them
        victim = snap["pipelines"][0]["route"][1]
        out: dict = {}
        threads = [threading.Thread(target=stream_one, args=(url, i, out)) for i in range(4)]
        for t in threads:
            t.start()
        wait_for_tokens(url, at_least=4)
        r = httpx.post(url + "/api/faults", json={"worker": victim, "kind": "kill"},
                       headers={"Authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 202, r.text
        for t in threads:
            t.join(180)
        assert all("tokens" in out[i] for i in range(4)), out
        snap = wait_restored(url)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and scrape(url).value("kevlard_rehosts_total") < 1:
            time.sleep(0.1)  # the event reaches the counters a moment after the snapshot
        m = scrape(url)
        recovery = snap["recovery"]
        assert m.value("kevlard_failures_total", kind="kill") == 1
        assert m.value("kevlard_failures_total") == 1
        assert m.value("kevlard_reroutes_total") == recovery["reroutes"] >= 1
        assert m.value("kevlard_rehosts_total") == recovery["rehosts"] == 1
        assert m.value("kevlard_recovery_seconds_count") == len(recovery["recovery_seconds"]) >= 1
        assert m.value("kevlard_requests_resumed_total", how="replica") == recovery["requests_resumed_replica"]
        assert m.value("kevlard_requests_resumed_total", how="replay") == recovery["requests_replayed"]
        assert m.value("kevlard_requests_resumed_total") >= 1  # pipeline 0 had requests running
        # no token lost or counted twice across the failover
        generated += sum(out[i]["tokens"] for i in range(4))
        assert m.value("vllm:generation_tokens_total") == generated
        assert m.value("vllm:request_success_total", finished_reason="length") == 3 + 2 + 4
        assert m.value("kevlard_worker_up", worker=str(victim)) == 0
        live = [w for w in snap["workers"] if w["state"] in ("healthy", "spare")]
        assert sum(s.value for s in m.families["kevlard_worker_up"].samples) == len(live)
