"""docs/BENCHMARKS.md, written from the results `make bench` leaves in docs/bench/: each benchmark's
exact command, its tables and plots, and each target with whether this run met it and, where it
did not, why. Nothing in it is typed by hand: a number here is a number some run measured.

Usage: python -m kevlard.bench.document [BENCH_DIR] [OUT.md]   (defaults: docs/bench docs/BENCHMARKS.md)
"""
from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

from kevlard.bench.doc_tables import Targets, _f, _ratio, _run_table, _summary, load
from kevlard.bench.loadgen import BenchResult
from kevlard.bench.reasons import COMMANDS, WHY
from kevlard.bench.replication_doc import section_replication
from kevlard.bench.report import FAILURE_WINDOW_S, FaultRecord, RequestRecord, failure_window, summarize


def result_from_json(data: dict[str, Any]) -> BenchResult:
    """A run written by `kevlard bench --json`, back as a BenchResult (for plots)."""
    rec_fields = {f.name for f in fields(RequestRecord)}
    fault_fields = {f.name for f in fields(FaultRecord)}
    records = [RequestRecord(**{k: (tuple(tuple(p) for p in v) if k == "token_times" else v)
                                for k, v in r.items() if k in rec_fields}) for r in data.get("records", [])]
    faults = [FaultRecord(**{k: v for k, v in f.items() if k in fault_fields}) for f in data.get("faults", [])]
    return BenchResult(data.get("url", ""), data.get("model", ""), data.get("label", ""), data.get("started_at", ""),
                       data.get("settings", {}), records, faults, data.get("settings", {}).get("window_s", 5.0),
                       data.get("warmup_failed", 0), data.get("recovery"))


def _first_fault(run: dict[str, Any] | None) -> dict[str, Any]:
    faults = (run or {}).get("faults") or []
    return next((f for f in faults if f.get("ok")), {})


def _fault_table(runs: list[tuple[str, dict[str, Any]]]) -> list[str]:
    lines = ["| run | fault | lost | identical | probe first token s | back to 90 % s | TTFT mean s (window) "
             "| latency p99 s (window) | resumed / replayed | tokens recomputed per resumed request "
             "| failed pipeline serving again s (daemon) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, run in runs:
        f = _first_fault(run)
        w = f.get("window") or {}
        rec = run.get("recovery") or {}
        share = run.get("identical_to_reference")
        resumed = f"{rec.get('requests_resumed_replica', '-')} / {rec.get('requests_replayed', '-')}" if rec else "-"
        lines.append(f"| {name} | {f.get('kind', '-')}@{_f(f.get('at_s'), 'g')}s | {_summary(run, 'failed')} "
                     f"| {_f(share * 100 if share is not None else None, '.0f', ' %')} | {_f(f.get('probe_first_token_s'), '.3f')} "
                     f"| {_f(f.get('recovery_to_90pct_s'))} | {_f(w.get('ttft_mean_s'), '.3f')} | {_f(w.get('latency_p99_s'))} "
                     f"| {resumed} | {_f(rec.get('tokens_recomputed_per_resumed_request'), '.1f')} "
                     f"| {_f(_pipeline_back(run), '.3f')} |")
    return lines + [""]


def _pipeline_back(run: dict[str, Any] | None) -> float | None:
    """The daemon's time from the (first) failure until that pipeline served again: rerouted to the
    buddy (kevlar), or restarted (restart)."""
    times = ((run or {}).get("recovery") or {}).get("recovery_seconds") or []
    return times[0] if times else None


def _plot(bench: Path, name: str, runs: list[dict[str, Any]], title: str) -> str | None:
    try:
        from kevlard.bench.plots import plot_runs

        plot_runs([result_from_json(r) for r in runs], bench / name, title)
        return name
    except Exception as e:  # matplotlib missing, or a run without records: the tables still stand
        print(f"plot {name} skipped: {e}", file=sys.stderr)
        return None


def serving_rounds(bench: Path) -> list[tuple[dict, dict | None]]:
    """(kevlard, peer) of each round of the serving benchmark, in order; the first has no suffix."""
    rounds, i = [], 1
    while True:
        suffix = "" if i == 1 else f"-{i}"
        k = load(bench / f"serving-core-kevlard{suffix}.json")
        if k is None:
            return rounds
        rounds.append((k, load(bench / f"serving-core-peer{suffix}.json")))
        i += 1


def section_serving(bench: Path, t: Targets) -> list[str]:
    rounds = serving_rounds(bench)
    out = ["## Serving core (issue 2)", "", "```sh", COMMANDS["serving"], "```", ""]
    if not rounds:
        return out + ["Not run.", ""]
    out += [f"Open-loop Poisson arrivals at 8 requests/s, 40 requests, up to 32 output tokens, greedy, streamed;"
            f" {len(rounds)} round(s), each kevlard then the peer on the same GGUF, each server started afresh."
            " The ratio is the median of the rounds'.", ""]
    multi = len(rounds) > 1
    rows = []
    for i, (k, p) in enumerate(rounds, 1):
        tag = f" ({i})" if multi else ""
        rows += [("kevlard" + tag, k)] + ([("transformers serve --continuous-batching" + tag, p)] if p else [])
    out += _run_table(rows)
    ratios = [r for r in (_ratio(_summary(k, "output_tokens_per_s"), _summary(p, "output_tokens_per_s"))
                          for k, p in rounds if p) if r is not None]
    ratio = statistics.median(ratios) if ratios else None
    each = f" (rounds: {', '.join(f'{r:.2f}' for r in ratios)})" if len(ratios) > 1 else ""
    speeds = [", ".join(f"{_summary(run, 'output_tokens_per_s'):.0f}" for run in side if run)
              for side in zip(*rounds)]
    t.add("throughput >= 1.5x the peer's (issue 2)", _f(ratio, ".2f", "x") + each,
          None if ratio is None else ratio >= 1.5,
          WHY["serving"].format(kevlard=speeds[0], peer=speeds[1]) if len(speeds) == 2 else WHY["serving"])
    p99s = [(_summary(k, "latency_p99_s"), _summary(p, "latency_p99_s")) for k, p in rounds if p]
    if p99s:
        shown = "; ".join(f"{_f(a)} s vs {_f(b)} s" for a, b in p99s)
        t.add("p99 latency no worse than the peer's (issue 2)", shown,
              all(a is not None and b is not None and a <= b for a, b in p99s))
    else:
        t.add("p99 latency no worse than the peer's (issue 2)", "peer not run", None)
    cold = (bench / "cold-start.txt").read_text().strip() if (bench / "cold-start.txt").exists() else None
    if cold:
        others = _ready_times(bench)
        spread = f" (every start in these runs: {min(others):.1f}-{max(others):.1f} s)" if others else ""
        t.add("cold start to /ready <= 5 s, weight cache present (issue 2)", f"{float(cold):.1f} s{spread}",
              float(cold) <= 5.0, "this VM runs a DAMON pageout scheme (/sys/kernel/mm/damon: action pageout) that drops "
              "file pages left idle for a while, so the first start after a pause reads the 0.5 GB weight cache "
              "and the libraries back from disk; the later starts of the same run are the ones with warm caches")
    return out


def _ready_times(bench: Path) -> list[float]:
    """`ready in X s` of every daemon log of the runs (the daemon's own measure of its start)."""
    times = []
    for log in bench.glob("*.log"):
        for line in log.read_text(errors="replace").splitlines():
            if " ready in " in line:
                try:
                    times.append(float(line.split(" ready in ")[1].split()[0]))
                except (IndexError, ValueError):
                    pass
    return times


def kill_runs(bench: Path) -> list[tuple[str, dict[str, Any]]]:
    """The kevlar-mode SIGKILL runs of bench/fault_tolerance.sh in order: kevlar-kill, kevlar-kill-2, ..."""
    extra = sorted((p.stem for p in bench.glob("kevlar-kill-*.json") if p.stem.rsplit("-", 1)[1].isdigit()),
                   key=lambda stem: int(stem.rsplit("-", 1)[1]))
    return [(n, r) for n in ["kevlar-kill", *extra] if (r := load(bench / f"{n}.json"))]


def pooled_window(runs: list[dict[str, Any]], reference: dict[str, Any] | None) -> tuple[dict, dict]:
    """The failure windows of `runs` (requests in flight at the fault or sent within the window after
    it) pooled, and the same requests (same index and prompt: same seed) of the failure-free
    `reference` run: summaries of each."""
    same = {r.index: r for r in result_from_json(reference).records} if reference else {}
    window, reference_window = [], []
    for run in runs:
        fault = _first_fault(run)
        if fault.get("injected_s") is None:
            continue
        records = failure_window(result_from_json(run).records, fault["injected_s"],
                                 fault.get("window_s") or FAILURE_WINDOW_S)
        window += records
        reference_window += [same[r.index] for r in records
                             if r.index in same and same[r.index].prompt_index == r.prompt_index]
    return summarize(window), summarize(reference_window)


def _mean_of(values: list[float | None]) -> float | None:
    got = [v for v in values if v is not None]
    return statistics.fmean(got) if len(got) == len(values) and got else None


def _each(values: list[float | None], fmt: str) -> str:
    return f" (runs: {', '.join(_f(v, fmt) for v in values)})" if len(values) > 1 else ""


def section_faults(bench: Path, t: Targets) -> list[str]:
    ff, restart, hang = (load(bench / f"{n}.json") for n in ("failure-free", "restart-kill", "kevlar-hang"))
    kills = kill_runs(bench)
    kill = kills[0][1] if kills else None
    out = ["## Failure and recovery (issue 3)", "", "```sh", COMMANDS["faults"], "```", "",
           "SmolLM2 fp32, 2 pipelines x 2 stages + 1 spare, Poisson 3 requests/s, 60 requests, 32 tokens; pipeline 0's"
           " stage-1 worker SIGKILLed (or hung) 8 s in, for `recovery = \"kevlar\"` and `\"restart\"`; the kevlar-mode"
           " SIGKILL run repeated (`kevlar-kill-N`, a fresh daemon each, alternately killing stage 0's worker and stage"
           " 1's), since one run's probe is one draw of a new request's first token on a busy host; then the same"
           " daemon with `[kv] replication` on and off, no fault, above and below its capacity. Window: requests in flight or"
           " arriving within 5 s after the fault.", ""]
    runs = [(n, r) for n, r in (("failure-free", ff), *kills, ("restart-kill", restart), ("kevlar-hang", hang)) if r]
    if not runs:
        return out + ["Not run.", ""] + section_replication(bench, t)
    out += _run_table(runs) + _fault_table([(n, r) for n, r in runs if n != "failure-free"])
    plot = _plot(bench, "fault-tolerance.png", [r for r in (ff, kill, restart, hang) if r],
                 "SIGKILL / hang at 8 s: kevlar vs restart")
    if plot:
        out += [f"![rolling TTFT and throughput, faults marked](bench/{plot})", ""]
    rf, hf = _first_fault(restart), _first_fault(hang)
    for name, run in runs[1:]:
        share = run.get("identical_to_reference")
        t.add(f"{name}: no request lost, every greedy answer identical", f"{_summary(run, 'failed')} lost, "
              f"{_f(share * 100 if share is not None else None, '.0f', ' %')} identical",
              _summary(run, "failed") == 0 and share == 1.0)
    probes = [_first_fault(r).get("probe_first_token_s") for _, r in kills]
    probe = _mean_of(probes)
    t.add(f"SIGKILL -> first token of a new request <= 0.3 s{' (mean of the kill runs)' if len(kills) > 1 else ''}",
          f"{_f(probe, '.3f')} s{_each(probes, '.3f')}", None if probe is None else probe <= 0.3,
          WHY["kill_probe"].format(ff_ttft_p99=_summary(ff, "ttft_p99_s") or 0))
    hp = hf.get("probe_first_token_s")
    t.add("hang -> first token <= heartbeat timeout + 0.3 s = 1.3 s", f"{_f(hp, '.3f')} s", None if hp is None else hp <= 1.3,
          WHY["hang_probe"])
    backs = [_first_fault(r).get("recovery_to_90pct_s") for _, r in kills]
    back = _mean_of(backs)
    t.add(f"SIGKILL -> back to 90 % of pre-fault throughput <= 2 s{' (mean)' if len(kills) > 1 else ''}",
          f"{_f(back)} s{_each(backs, '.2f')}", None if back is None else back <= 2.0, WHY["recovery_90"])
    ratio = _ratio(rf.get("probe_first_token_s"), probe)
    t.add("restart / kevlar, SIGKILL -> first token >= 50x (real restart)",
          f"{_f(rf.get('probe_first_token_s'), '.3f')} / {_f(probe, '.3f')} s = {_f(ratio, '.1f', 'x')}",
          None if ratio is None else ratio >= 50,
          WHY["restart_ratio"].format(restart=rf.get("probe_first_token_s") or 0, restored=_f(_pipeline_back(restart), ".2f")))
    back_k, back_r = _pipeline_back(kill), _pipeline_back(restart)
    t.add("restart / kevlar, SIGKILL -> failed pipeline serving again (daemon's clock; KevlarFlow's recovery time)",
          f"{_f(back_r, '.3f')} / {_f(back_k, '.4f')} s = {_f(_ratio(back_r, back_k), '.0f', 'x')}", None)
    rb = _ratio(rf.get("recovery_to_90pct_s"), back)
    t.add("restart / kevlar, back to 90 % throughput (real restart)", f"{_f(rf.get('recovery_to_90pct_s'))} / {_f(back)} s"
          f" = {_f(rb, '.1f', 'x')}", None)
    pers = [((r.get("recovery") or {}).get("tokens_recomputed_per_resumed_request")) for _, r in kills]
    per = _mean_of(pers)
    t.add("tokens recomputed per resumed request <= one KV block (16)", f"{_f(per, '.1f')}{_each(pers, '.1f')}",
          None if per is None else per <= 16, WHY["recomputed"])
    w, same = pooled_window([r for _, r in kills], ff)
    for what, key, limit in (("TTFT mean", "ttft_mean_s", 1.25), ("latency p99", "latency_p99_s", 1.5)):
        r = _ratio(w.get(key), same.get(key))
        t.add(f"failure window {what} <= {limit}x the failure-free run's, same requests (issue 5)",
              f"{_f(w.get(key), '.3f')} vs {_f(same.get(key), '.3f')} s = {_f(r, '.2f', 'x')} "
              f"({w.get('requests')} requests{', the kill runs pooled' if len(kills) > 1 else ''})",
              None if r is None else r <= limit, WHY["window"])
    return out + section_replication(bench, t)


EMULATED_SETS = (
    # (file stem before "rate", heading, what the pipelines are, why a missed target was missed)
    ("compare-emulated-reload-", "2 pipelines x 2 stages + 1 spare", "emulated"),
    ("compare-emulated-reload-1pipeline-", "1 pipeline x 2 stages + 1 spare: nothing else to absorb the load",
     "emulated_one"),
)


def section_emulated(bench: Path, t: Targets) -> list[str]:
    out = ["## Against the restart baseline with an emulated 8B reload (issue 5)", "", "```sh", COMMANDS["emulated"], "```", "",
           "`--restart-reload-s 60` makes the restarted pipeline wait 60 s before reloading, standing in for an 8B"
           " model's reload: **emulated**, in every table and plot. With two pipelines, `[cluster] cpu_budget ="
           " \"pipeline\"` pins each pipeline's workers to a core of its own, as each pipeline would have devices of"
           " its own: without it the torn-down pipeline's core would simply go to the surviving one. With one"
           " pipeline, as when one engine instance spans all the devices, the restart leaves no route at all:"
           " kevlard rehosts the failed stage on the spare from host memory and replays the in-flight requests"
           " (no buddy, so no replica), the baseline's requests wait for the reload.", ""]
    found = False
    for stem, topology, why in EMULATED_SETS:
        files = {f.stem[len(stem) + len("rate"):]: f for f in bench.glob(f"{stem}rate*.json")}
        rates = sorted(int(r) for r in files if r.isdigit())
        for rate in rates:
            data = load(files[str(rate)])
            if not data:
                continue
            found = True
            where = "" if why == "emulated" else ", one pipeline"
            runs = data.get("runs", [])
            out += [f"### {rate} requests/s, {topology}", ""]
            out += _fault_table([(r.get("label", "?"), r) for r in runs if r.get("faults")])
            plot = files[str(rate)].with_suffix(".png")
            if plot.exists():
                out += [f"![emulated reload, {rate} req/s{where}](bench/{plot.name})", ""]
            for row in data.get("ratios", []):
                ratios = row["ratios"]
                out += ["| " + row["run"] + " / " + row["against"] + " | " + " | ".join(
                    f"{k}: {_f(v, '.1f', 'x')}" for k, v in ratios.items()) + " |", "|---|" + "---|" * len(ratios), ""]
                for name, limit in (("latency mean (window)", 5), ("latency p99 (window)", 4),
                                    ("TTFT mean (window)", 500), ("TTFT p99 (window)", 600)):
                    v = ratios.get(name)
                    t.add(f"emulated restart / kevlar at {rate} req/s{where}, {name} >= {limit}x", _f(v, ".1f", "x"),
                          None if v is None else v >= limit, WHY[why])
    return out + ([] if found else ["Not run.", ""])


def section_peer(bench: Path, t: Targets) -> list[str]:
    k, p = load(bench / "kevlard-kill-no-eos.json"), load(bench / "peer-restart-kill.json")
    out = ["## Against the peer under a supervisor, same SIGKILL (issue 5)", "", "```sh", COMMANDS["peer"], "```", "",
           "The same load for both (3 requests/s, 60 requests, up to 32 tokens, stopping at end of sequence);"
           " kevlard's stage-1 worker of pipeline 0, or the peer's whole process, SIGKILLed 8 s in; a loop restarts"
           " the peer when it exits, as systemd's `Restart=always` would, and the probe is retried until it answers.", ""]
    if not (k and p):
        return out + ["Not run.", ""]
    out += _run_table([("kevlard", k), ("transformers serve, supervised", p)])
    kp, pp = _first_fault(k).get("probe_first_token_s"), _first_fault(p).get("probe_first_token_s")
    out += [f"Requests lost: kevlard {_summary(k, 'failed')} of {_summary(k, 'requests')}, the peer "
            f"{_summary(p, 'failed')} of {_summary(p, 'requests')}. SIGKILL -> first token of a new request:"
            f" kevlard {_f(kp, '.3f')} s, the peer {_f(pp, '.1f')} s ({_f(_ratio(pp, kp), '.0f', 'x')}).", ""]
    plot = _plot(bench, "peer-restart.png", [k, p], "SIGKILL at 8 s: kevlard vs the supervised peer")
    if plot:
        out += [f"![kevlard vs the supervised peer](bench/{plot})", ""]
    return out


def section_scaling(bench: Path) -> list[str]:
    data = load(bench / "scaling.json")
    out = ["## Scaling: model size, pipelines, request rate (issue 5)", "", "```sh", COMMANDS["scaling"], "```", ""]
    if not data:
        return out + ["Not run.", ""]
    out += ["| sweep | point | probe first token s | back to 90 % s | lost | identical | recomputed / resumed request "
            "| replication: throughput % | replication: p99 % |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for sweep, rows in data.items():
        for r in rows:
            ident = r.get("identical")
            out.append(f"| {sweep} | {r.get('label')} | {_f(r.get('probe_first_token_s'), '.3f')} | "
                       f"{_f(r.get('recovery_to_90pct_s'), '.1f')} | {r.get('lost')} | "
                       f"{_f(ident * 100 if ident is not None else None, '.0f', ' %')} | "
                       f"{_f(r.get('tokens_recomputed_per_resumed_request'), '.1f')} | "
                       f"{_f(r.get('replication_overhead_throughput_pct'), '.1f')} | {_f(r.get('replication_overhead_p99_pct'), '.1f')} |")
    out.append("")
    for name in ("model-size", "pipelines", "rate"):
        if (bench / f"scaling-{name}.png").exists():
            out.append(f"![scaling: {name}](bench/scaling-{name}.png)")
    return out + ["", "What grows with each, and why: [docs/bench/ANALYSIS.md](bench/ANALYSIS.md).", ""]


def section_gpu(bench: Path) -> list[str]:
    out = ["## GPU check (issue 5)", "", "```sh", COMMANDS["gpu"], "```", ""]
    path = bench / "gpu-check.txt"
    if not path.exists():
        return out + ["Not run yet: no GPU machine has been lent to this project's sessions so far.", ""]
    return out + ["```", path.read_text(encoding="utf-8").rstrip(), "```", ""]


def machine() -> str:
    try:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
        tv = torch.__version__
    except ImportError:
        gpu, tv = "unknown", "not installed"
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    return f"{os.cpu_count()} CPU cores, {mem:.0f} GiB, {gpu}; Python {platform.python_version()}, torch {tv}"


def commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "kevlard"],
                               capture_output=True, text=True, check=True).stdout.strip()
        return out + (" with uncommitted changes to kevlard/" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def render(bench: Path) -> str:
    t = Targets()
    started = [load(bench / n) for n in ("serving-core-kevlard.json", "kevlar-kill.json")]
    when = next((d.get("started_at") for d in started if d), "unknown")
    code_file = bench / "code.txt"  # written by `make bench` before the runs
    code = code_file.read_text().strip() if code_file.exists() else f"{commit()} (when this file was written)"
    body = section_serving(bench, t) + section_faults(bench, t) + section_emulated(bench, t) + section_peer(bench, t)
    head = ["# Benchmarks", "",
            f"Written by `make bench` (`python -m kevlard.bench.document`) from the runs in [`docs/bench/`](bench/),"
            f" which hold each run's JSON, daemon log and config. Runs of {when[:10]}, code of {code}; {machine()};"
            " SmolLM2-135M-Instruct (the embedded GGUF, dequantised to float32). Single runs on a shared 2-core VM"
            " are noisy: differences under about 10 % are within noise. The analysis of earlier runs, with what was"
            " changed for each number, is in [docs/bench/ANALYSIS.md](bench/ANALYSIS.md).", "",
            "## Targets", ""] + t.markdown()
    return "\n".join(head + body + section_scaling(bench) + section_gpu(bench)) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    bench = Path(args[0] if args else "docs/bench")
    out = Path(args[1] if len(args) > 1 else "docs/BENCHMARKS.md")
    out.write_text(render(bench), encoding="utf-8")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
