"""kevlard bench --compare / --replication: the variants, the overhead arithmetic, the combined
table; and the real thing against tiny-model daemons the benchmark starts itself."""
from __future__ import annotations

import json

import pytest

from kevlard.bench import BenchResult, FaultRecord, RequestRecord
from kevlard.bench.comparison import (compare_variants, format_comparison_markdown, format_overhead,
                                      parse_modes, parse_on_off, reference_shares, replication_overhead,
                                      replication_variants)
from kevlard.cli import main
from tests.tiny_models import make_tiny_model

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# --- pure -----------------------------------------------------------------------------------

def test_parse_modes_and_on_off():
    assert parse_modes("kevlar,restart") == ["kevlar", "restart"]
    assert parse_modes(" restart ") == ["restart"]
    assert parse_on_off("on,off") == [True, False] and parse_on_off("off") == [False]
    for bad in ("", "kevlar,kevlar", "kevlar,fast"):
        with pytest.raises(ValueError):
            parse_modes(bad)
    for bad in ("", "on,on", "yes"):
        with pytest.raises(ValueError):
            parse_on_off(bad)


def test_variants_put_the_failure_free_reference_first():
    variants = compare_variants(["kevlar", "restart"])
    assert [v.label for v in variants] == ["failure-free", "kevlar", "restart"]
    assert [v.with_faults for v in variants] == [False, True, True]
    assert [v.overrides for v in variants] == [{}, {"recovery": "kevlar"}, {"recovery": "restart"}]
    assert [v.overrides for v in replication_variants([True, False])] == [
        {"kv.replication": True}, {"kv.replication": False}]


def test_replication_overhead_in_percent_of_the_run_without_it():
    on = {"output_tokens_per_s": 95.0, "latency_p99_s": 2.2}
    off = {"output_tokens_per_s": 100.0, "latency_p99_s": 2.0}
    overhead = replication_overhead(on, off)
    assert overhead["throughput_pct"] == pytest.approx(5.0)  # 5 % fewer tokens/s
    assert overhead["latency_p99_pct"] == pytest.approx(10.0)  # 10 % longer p99
    faster = replication_overhead({"output_tokens_per_s": 110.0, "latency_p99_s": 1.5}, off)
    assert faster["throughput_pct"] == pytest.approx(-10.0) and faster["latency_p99_pct"] == pytest.approx(-25.0)
    missing = replication_overhead({"output_tokens_per_s": None, "latency_p99_s": 1.0},
                                   {"output_tokens_per_s": 0.0, "latency_p99_s": None})
    assert missing == {"throughput_pct": None, "latency_p99_pct": None}
    assert "throughput +5.0 %" in format_overhead(overhead) and "p99 latency +10.0 %" in format_overhead(overhead)


def fake_result(label: str, texts: list[str], recovery: str | None = None, fault: bool = False) -> BenchResult:
    records = [RequestRecord(index=i, prompt_index=i, scheduled_s=i * 0.5, sent_s=i * 0.5, finished_s=i * 0.5 + 1,
                             first_token_s=i * 0.5 + 0.1, output_tokens=2, content_chunks=2, ok=text is not None,
                             token_times=((i * 0.5 + 0.1, 1), (i * 0.5 + 0.9, 1)), text=text or "")
               for i, text in enumerate(texts)]
    faults = [FaultRecord(kind="kill", at_s=1.0, worker=0, injected_s=1.0, acked_s=1.01, ok=True)] if fault else []
    return BenchResult(url="u", model="m", label=label, started_at="t",
                       settings={"overrides": {"recovery": recovery} if recovery else {}},
                       records=records, faults=faults)


def test_combined_table_has_a_row_per_mode_with_lost_and_identical_share():
    results = [fake_result("failure-free", ["a", "b", "c", "d"]),
               fake_result("kevlar", ["a", "b", "c", "d"], "kevlar", fault=True),
               fake_result("restart", ["a", "x", None, "d"], "restart", fault=True)]
    shares = reference_shares(results)
    assert shares == [None, 1.0, 0.5]
    lines = format_comparison_markdown(results, shares).splitlines()
    assert len(lines) == 5 and all(line.count("|") == lines[0].count("|") for line in lines)
    assert lines[2].startswith("| failure-free | - | - | 4 | 0 | (reference) |")
    assert lines[3].startswith("| kevlar | kevlar | kill@1s | 4 | 0 | 100 % |")
    assert lines[4].startswith("| restart | restart | kill@1s | 4 | 1 | 50 % |")


# --- against real daemons -------------------------------------------------------------------

@pytest.fixture(scope="module")
def bench_config(tmp_path_factory):
    """A config file and the serve args of a tiny 2 x 1 + 1 spare llama on CPU."""
    root = tmp_path_factory.mktemp("bench-e2e")
    model = make_tiny_model(root, "llama", num_layers=2)
    conf = root / "kevlard.toml"
    conf.write_text("[health]\nheartbeat_interval_s = 0.1\nheartbeat_timeout_s = 1.0\n")
    serve = [f"--serve-arg={arg}" for arg in ("--model", str(model), "--devices", "cpu:3", "--pipelines", "2",
                                              "--stages", "1", "--spares", "1")]
    return ["--config", str(conf), *serve, "--ready-timeout-s", "120", "--timeout-s", "60"]


def test_config_starts_runs_and_stops_its_own_daemon(bench_config, tmp_path, capsys):
    out = tmp_path / "run.json"
    code = main(["bench", *bench_config, "--rate", "20", "--requests", "6", "--output-tokens", "8",
                 "--label", "own", "--json", str(out), "--work-dir", str(tmp_path / "work")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "| own | 6 | 0 |" in captured.out
    data = json.loads(out.read_text())
    assert data["label"] == "own" and data["summary"]["succeeded"] == 6
    assert "workers stopped" in (tmp_path / "work" / "0-own.log").read_text()  # a clean shutdown
    assert "kevlard serve exited" not in captured.err  # with 0


def test_compare_kevlar_and_restart_under_a_kill(bench_config, tmp_path, capsys):
    out, plot = tmp_path / "compare.json", tmp_path / "compare.png"
    code = main(["bench", *bench_config, "--compare", "kevlar,restart", "--fault", "kill@0.6s",
                 "--rate", "10", "--requests", "16", "--output-tokens", "32", "--seed", "1",
                 "--restart-reload-s", "1.5",
                 "--json", str(out), "--plot", str(plot), "--work-dir", str(tmp_path / "work")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    emulated = "restart (+1.5 s reload, emulated)"
    assert "| kevlar | kevlar | kill@0.6s | 16 | 0 | 100 % |" in captured.out
    assert f"| {emulated} | restart | kill@0.6s | 16 | 0 | 100 % |" in captured.out
    assert "| failure-free | - | - | 16 | 0 | (reference) |" in captured.out
    assert f"| {emulated} / kevlar |" in captured.out  # the headline ratios
    document = json.loads(out.read_text())
    runs = document["runs"]
    assert [r["label"] for r in runs] == ["failure-free", "kevlar", emulated]
    assert runs[0]["faults"] == [] and all(r["faults"][0]["ok"] for r in runs[1:])
    assert [r["identical_to_reference"] for r in runs] == [None, 1.0, 1.0]
    # the daemon's own counters over each run: a failure rerouted, a failure restarted
    assert runs[0]["recovery"]["failures"] == 0
    assert runs[1]["recovery"]["reroutes"] == 1, runs[1]["recovery"]
    assert runs[1]["recovery"]["restarts"] == 0
    # (the restart itself may end after the load: the other pipeline served it all)
    assert runs[2]["recovery"]["failures"] == 1 and runs[2]["recovery"]["reroutes"] == 0
    ratios = document["ratios"][0]
    assert ratios["run"] == emulated and ratios["against"] == "kevlar"
    assert {"probe first token", "latency p99 (window)", "TTFT mean (window)"} <= set(ratios["ratios"])
    assert "event reroute" in (tmp_path / "work" / "1-kevlar.log").read_text()
    restart_log = next((tmp_path / "work").glob("2-restart*.log")).read_text()
    assert "event restart" in restart_log and "restart_reload_emulated" in restart_log
    assert plot.read_bytes()[:8] == PNG_MAGIC and plot.stat().st_size > 10_000


def test_replication_on_off_reports_the_overhead(bench_config, tmp_path, capsys):
    out = tmp_path / "replication.json"
    code = main(["bench", *bench_config, "--replication", "on,off", "--rate", "20", "--requests", "6",
                 "--output-tokens", "8", "--json", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "| replication on | 6 | 0 |" in captured.out and "| replication off | 6 | 0 |" in captured.out
    assert "replication overhead (on vs off): throughput" in captured.out
    data = json.loads(out.read_text())
    assert [r["settings"]["overrides"] for r in data["runs"]] == [{"kv.replication": True},
                                                                  {"kv.replication": False}]
    assert set(data["replication_overhead"]) == {"throughput_pct", "latency_p99_pct"}
