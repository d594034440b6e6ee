"""Scaling study (issue 5): how recovery after a SIGKILL and the cost of KV replication change with
the model's size, the number of pipelines and the request rate, on this machine.

Each point is two `kevlard bench --config` runs on daemons the bench starts itself: `--compare
kevlar --fault kill@4s` (a failure-free pass, then the same load with pipeline 0's stage-1 worker
SIGKILLed) and `--replication on,off` (the same load without faults). Models are tiny random Llamas
built here, of growing width and depth; the pipelines and rate sweeps use the middle size.
Writes docs/bench/scaling.json and one PNG per sweep. Usage: .venv/bin/python bench/scaling.py
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.tiny_models import make_tiny_model  # noqa: E402

KEVLARD = str(REPO / ".venv" / "bin" / "kevlard")
SIZES = ((256, 8), (512, 16), (768, 24))  # (hidden, layers)
PIPELINES = (2, 3)
RATES = (2.0, 4.0, 6.0)


def params(hidden: int, layers: int, vocab: int = 384) -> int:
    """Parameters of make_tiny_model's Llama: attention 4 h^2, MLP 3 * h * 4h, embeddings and head."""
    return layers * (4 * hidden * hidden + 12 * hidden * hidden) + 2 * vocab * hidden


def bench(args: list[str], out: Path) -> dict:
    proc = subprocess.run([KEVLARD, "bench", *args, "--json", str(out)], capture_output=True, text=True,
                          timeout=900, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"kevlard bench {' '.join(args)} failed: {proc.stderr[-2000:]}")
    return json.loads(out.read_text())


def point(work: Path, label: str, model: Path, pipelines: int, rate: float, requests: int) -> dict:
    conf = work / "kevlard.toml"
    conf.write_text('[server]\nadmin_token = "bench"\n')
    serve = [f"--serve-arg={a}" for a in ("--model", str(model), "--devices", f"cpu:{pipelines * 2 + 1}",
                                           "--pipelines", str(pipelines), "--stages", "2", "--spares", "1")]
    requests = max(requests, int(rate * 10))  # the load outlasts the fault at 4 s by a few seconds
    common = ["--config", str(conf), *serve, "--rate", str(rate), "--requests", str(requests),
              "--output-tokens", "32", "--seed", "1", "--warmup", "2", "--work-dir", str(work / label)]
    kill = bench([*common, "--compare", "kevlar", "--fault", "kill@4s"], work / f"{label}-kill.json")
    repl = bench([*common, "--replication", "on,off"], work / f"{label}-repl.json")
    fault = kill["runs"][1]["faults"][0]
    return {"label": label, "pipelines": pipelines, "rate": rate,
            "probe_first_token_s": fault.get("probe_first_token_s"),
            "recovery_to_90pct_s": fault.get("recovery_to_90pct_s"),
            "lost": fault.get("lost_requests"), "identical": kill["runs"][1].get("identical_to_reference"),
            "tokens_recomputed_per_resumed_request":
                (kill["runs"][1].get("recovery") or {}).get("tokens_recomputed_per_resumed_request"),
            "failure_free_tokens_per_s": kill["runs"][0]["summary"]["output_tokens_per_s"],
            "replication_overhead_throughput_pct": repl["replication_overhead"]["throughput_pct"],
            "replication_overhead_p99_pct": repl["replication_overhead"]["latency_p99_pct"]}


def plot(points: list[dict], x_key: str, x_label: str, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [p[x_key] for p in points]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    top.plot(xs, [p["probe_first_token_s"] for p in points], "o-", label="SIGKILL -> probe's first token")
    top.plot(xs, [p["recovery_to_90pct_s"] for p in points], "s--", label="back to 90 % throughput")
    top.set_ylabel("seconds")
    top.legend()
    bottom.plot(xs, [p["replication_overhead_throughput_pct"] for p in points], "o-", label="throughput")
    bottom.plot(xs, [p["replication_overhead_p99_pct"] for p in points], "s--", label="p99 latency")
    bottom.axhline(0, color="grey", linewidth=0.5)
    bottom.set_ylabel("replication overhead, %")
    bottom.set_xlabel(x_label)
    bottom.legend()
    fig.suptitle(f"kevlard scaling: {x_label}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "docs" / "bench"), help="where scaling.json and the plots go")
    parser.add_argument("--requests", type=int, default=30)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, list[dict]] = {"size": [], "pipelines": [], "rate": []}
    with tempfile.TemporaryDirectory(prefix="kevlard-scaling-") as tmp:
        work = Path(tmp)
        models = {}
        for hidden, layers in SIZES:
            models[(hidden, layers)] = make_tiny_model(work, "llama", num_layers=layers, hidden=hidden,
                                                       heads=hidden // 64, kv_heads=max(1, hidden // 256),
                                                       intermediate=4 * hidden, name=f"h{hidden}-l{layers}")
        for hidden, layers in SIZES:
            p = point(work, f"h{hidden}-l{layers}", models[(hidden, layers)], 2, 3.0, args.requests)
            p["params_m"] = params(hidden, layers) / 1e6
            result["size"].append(p)
            print(json.dumps(p), flush=True)
        middle = models[SIZES[1]]
        for pipelines in PIPELINES:
            result["pipelines"].append(point(work, f"p{pipelines}", middle, pipelines, 3.0, args.requests))
            print(json.dumps(result["pipelines"][-1]), flush=True)
        for rate in RATES:
            result["rate"].append(point(work, f"r{rate:g}", middle, 2, rate, args.requests))
            print(json.dumps(result["rate"][-1]), flush=True)
    (out / "scaling.json").write_text(json.dumps(result, indent=2))
    plot(result["size"], "params_m", "model parameters (millions)", out / "scaling-model-size.png")
    plot(result["pipelines"], "pipelines", "pipelines", out / "scaling-pipelines.png")
    plot(result["rate"], "rate", "request rate (requests/s)", out / "scaling-rate.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
