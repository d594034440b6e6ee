"""The `kevlard` command: serve, and small clients for a running daemon (fault, status).

Heavy imports (torch, the daemon, httpx) happen inside the subcommand that needs them, so that
`kevlard --help` and configuration errors answer at once.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any, Sequence

from kevlard import __version__

HTTP_TIMEOUT_S = 10.0


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_usage(sys.stderr)
        print("kevlard: error: a command is required (serve, bench, fault, status)", file=sys.stderr)
        return 2
    return args.run(args)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kevlard", description="Fault-tolerant LLM serving daemon.")
    parser.add_argument("--version", action="version", version=f"kevlard {__version__}")
    parser.set_defaults(command=None)
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the daemon (OpenAI-compatible API)")
    serve.add_argument("--config", metavar="PATH", help="kevlard.toml to load (default: built-in defaults)")
    serve.add_argument("--host", help="server.host")
    serve.add_argument("--port", type=int, help="server.port")
    serve.add_argument("--model", metavar="PATH", help="model.path: a Hugging Face directory or a .gguf file")
    serve.add_argument("--devices", help="cluster.devices: auto | cpu:N | cuda:0,1,...")
    serve.add_argument("--pipelines", type=int, metavar="P", help="cluster.pipelines")
    serve.add_argument("--stages", type=int, metavar="K", help="cluster.stages")
    serve.add_argument("--spares", type=int, metavar="S", help="cluster.spares")
    # Not argparse choices: config validation gives the same message as for the file.
    serve.add_argument("--log-format", help="log_format: text | json")
    serve.set_defaults(command="serve", run=_serve)

    bench = sub.add_parser("bench", help="open-loop load test of an OpenAI-compatible server")
    target = bench.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="a running server, e.g. http://127.0.0.1:8000")
    target.add_argument("--config", metavar="PATH",
                        help="start `kevlard serve --config PATH` on a free port for the run, stop it after")
    bench.add_argument("--serve-arg", action="append", default=[], metavar="ARG",
                       help="with --config: pass ARG to kevlard serve, e.g. --serve-arg=--model "
                            "--serve-arg=/path; repeatable")
    bench.add_argument("--compare", metavar="MODES",
                       help="with --config: a failure-free pass, then the same load and faults once per "
                            "recovery mode, e.g. kevlar,restart")
    bench.add_argument("--restart-reload-s", type=_seconds, metavar="X",
                       help="with --compare ...,restart: add X s to the restart baseline's reload, to emulate "
                            "a bigger model (labelled as emulated)")
    bench.add_argument("--replication", metavar="on,off",
                       help="with --config: the same load with [kv] replication on and off; its overhead")
    bench.add_argument("--plot", metavar="OUT.png", help="rolling TTFT and tokens/s over time, faults marked")
    bench.add_argument("--work-dir", metavar="DIR",
                       help="with --config: keep the daemons' configs and logs here (default: a temporary "
                            "directory, removed after)")
    bench.add_argument("--ready-timeout-s", type=_seconds, default=300.0, metavar="X",
                       help="with --config: give up when a daemon is not ready after X s (default 300)")
    bench.add_argument("--rate", type=float, default=8.0, metavar="R",
                       help="Poisson arrival rate in requests/s; inf sends all at once (default 8)")
    bench.add_argument("--requests", type=int, default=40, metavar="N", help="requests to send (default 40)")
    bench.add_argument("--output-tokens", type=int, default=32, metavar="N",
                       help="tokens each request generates (max_tokens, and min_tokens with ignore_eos; default 32)")
    bench.add_argument("--seed", type=int, default=0, help="seed of the arrival schedule (default 0)")
    bench.add_argument("--model", metavar="NAME", help="model id to request (default: the first of GET /v1/models)")
    bench.add_argument("--api-key", metavar="K", help="sent as 'Authorization: Bearer K'")
    bench.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                       help="do not send ignore_eos/min_tokens (for servers that reject them)")
    bench.add_argument("--json", metavar="OUT.json", help="write the summary and per-request records here")
    bench.add_argument("--label", default="", metavar="TEXT", help="name of this run in the table and the JSON")
    bench.add_argument("--reference", metavar="RUN.json",
                       help="a failure-free run of the same workload (--json of it): report the share "
                            "of answers identical to it")
    bench.add_argument("--timeout-s", type=_seconds, default=300.0, metavar="X",
                       help="give up on a request after X s (default 300)")
    bench.add_argument("--fault", action="append", default=[], metavar="KIND@TIME[:worker=ID]",
                       help="inject a fault (kill, hang, slow, device_error, step_error) TIME after the start, e.g. "
                            "kill@5s, hang@8s:worker=3, slow@500ms:duration=2s; repeatable")
    bench.add_argument("--fault-stage", type=int, metavar="S",
                       help="a fault without worker= hits stage S of pipeline 0 (default: the middle one)")
    bench.add_argument("--admin-token", metavar="T",
                       help="admin token for /api/faults (default: the one the daemon wrote to "
                            "~/.local/state/kevlard/admin_token.PORT)")
    bench.add_argument("--window-s", type=_seconds, default=5.0, metavar="X",
                       help="failure window: requests in flight at a fault or sent X s after it (default 5)")
    bench.add_argument("--warmup", type=int, default=0, metavar="N",
                       help="send N requests and await them before the measured run (default 0)")
    bench.set_defaults(command="bench", run=_bench)

    fault = sub.add_parser("fault", help="inject a fault into a worker of a running daemon")
    fault.add_argument("--url", required=True, help="the daemon, e.g. http://127.0.0.1:8000")
    fault.add_argument("--worker", required=True, metavar="ID", help="worker id (see `kevlard status`)")
    fault.add_argument("--kind", required=True, help="fault kind, e.g. kill")
    fault.add_argument("--duration-s", type=_seconds, metavar="X", help="how long the fault lasts, where it applies")
    fault.add_argument("--token", default="", help="admin token (server.admin_token; default: the one the daemon at --url "
                            "wrote to ~/.local/state/kevlard/admin_token.PORT)")
    fault.set_defaults(command="fault", run=_fault)

    status = sub.add_parser("status", help="show the workers and pipelines of a running daemon")
    status.add_argument("--url", required=True, help="the daemon, e.g. http://127.0.0.1:8000")
    status.set_defaults(command="status", run=_status)
    return parser


def serve_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Dotted config overrides from the flags that were given."""
    flags = {
        "server.host": args.host,
        "server.port": args.port,
        "model.path": args.model,
        "cluster.devices": args.devices,
        "cluster.pipelines": args.pipelines,
        "cluster.stages": args.stages,
        "cluster.spares": args.spares,
        "log_format": args.log_format,
    }
    return {key: value for key, value in flags.items() if value is not None}


def _serve(args: argparse.Namespace) -> int:
    from kevlard.config import ConfigError, load_config

    try:
        config = load_config(args.config, serve_overrides(args))
    except ConfigError as e:
        print(f"kevlard: invalid configuration: {e}", file=sys.stderr)
        return 2
    from kevlard.daemon import serve

    return serve(config)


def _bench(args: argparse.Namespace) -> int:
    from kevlard.bench.comparison import parse_modes, parse_on_off
    from kevlard.bench.faults import parse_fault_spec
    from kevlard.bench.loadgen import BenchError, check_load_args

    try:
        check_load_args(args.rate, args.requests, args.output_tokens, args.timeout_s)
        faults = [parse_fault_spec(text) for text in args.fault]
        if args.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {args.warmup}")
        if not args.window_s > 0:
            raise ValueError(f"window must be > 0 s, got {args.window_s}")
        if not args.ready_timeout_s > 0:
            raise ValueError(f"ready timeout must be > 0 s, got {args.ready_timeout_s}")
        if args.config is None:
            for flag, value in (("--compare", args.compare), ("--replication", args.replication),
                                ("--serve-arg", args.serve_arg), ("--work-dir", args.work_dir)):
                if value:
                    raise ValueError(f"{flag} needs --config (a daemon the benchmark starts itself)")
        if args.compare and args.replication:
            raise ValueError("--compare and --replication are separate runs: give one of them")
        if args.restart_reload_s is not None:
            if not args.restart_reload_s >= 0:
                raise ValueError(f"--restart-reload-s must be >= 0, got {args.restart_reload_s}")
            if "restart" not in (args.compare or ""):
                raise ValueError("--restart-reload-s stretches the restart baseline: it needs --compare ...,restart")
        if args.compare and args.reference:
            raise ValueError("--compare makes its own failure-free reference: drop --reference")
        modes = parse_modes(args.compare) if args.compare else None
        replication = parse_on_off(args.replication) if args.replication else None
    except ValueError as e:
        print(f"kevlard bench: error: {e}", file=sys.stderr)
        return 2
    try:
        results = _bench_runs(args, faults, modes, replication)
    except BenchError as e:
        print(f"kevlard bench: {e}", file=sys.stderr)
        return 1
    return _bench_report(args, results, compared=modes is not None, replication=replication)


def _bench_runs(args: argparse.Namespace, faults: list[Any], modes: list[str] | None,
                replication: list[bool] | None) -> list[Any]:
    """The runs: one against --url, or one per variant against daemons started from --config."""
    import asyncio

    from kevlard.bench.loadgen import StderrProgress, run_load

    load = dict(rate=args.rate, requests=args.requests, output_tokens=args.output_tokens, seed=args.seed,
                model=args.model, ignore_eos=args.ignore_eos, timeout_s=args.timeout_s,
                fault_stage=args.fault_stage, window_s=args.window_s, warmup=args.warmup)
    if args.url:
        progress = StderrProgress(args.requests)
        try:
            return [asyncio.run(run_load(args.url, **load, api_key=args.api_key, label=args.label,
                                         progress=progress, faults=faults, admin_token=args.admin_token))]
        finally:
            progress.close()
    import tempfile
    from pathlib import Path

    from kevlard.bench.comparison import Variant, compare_variants, replication_variants, run_variants

    if modes is not None:
        variants = compare_variants(modes, args.restart_reload_s or 0.0)
    elif replication is not None:
        variants = replication_variants(replication)
    else:
        variants = [Variant(args.label or "kevlard")]
    with tempfile.TemporaryDirectory(prefix="kevlard-bench-") as temp:
        return run_variants(args.config, variants, Path(args.work_dir or temp), serve_args=args.serve_arg,
                            faults=faults, ready_timeout_s=args.ready_timeout_s, api_key=args.api_key,
                            progress_factory=lambda: StderrProgress(args.requests), **load)


def _bench_report(args: argparse.Namespace, results: list[Any], *, compared: bool,
                  replication: list[bool] | None) -> int:
    from kevlard.bench.report import format_fault_markdown, format_markdown

    print(format_markdown([(r.label or r.model, r.summary) for r in results]))
    outputs = [r.to_json() for r in results]
    document: dict[str, Any] = outputs[0] if len(results) == 1 else {"runs": outputs}
    if compared:
        from kevlard.bench.comparison import format_comparison_markdown, reference_shares

        shares = reference_shares(results)
        for output, share in zip(outputs, shares):
            output["identical_to_reference"] = share
        print()
        print(format_comparison_markdown(results, shares))
        from kevlard.bench.comparison import format_ratios_markdown, headline_ratios

        document["ratios"] = ratios = headline_ratios(results)
        if ratios:
            print()
            print(format_ratios_markdown(ratios))
    fault_table = format_fault_markdown([(r.label or r.model, r.summary, r.fault_metrics, r.recovery)
                                         for r in results])
    if fault_table:
        print()
        print(fault_table)
    if replication is not None and len(results) == 2 and replication[0] != replication[1]:
        from kevlard.bench.comparison import format_overhead, replication_overhead

        on, off = (results[0], results[1]) if replication[0] else (results[1], results[0])
        document["replication_overhead"] = overhead = replication_overhead(on.summary, off.summary)
        print()
        print(format_overhead(overhead))
    if args.reference:
        from kevlard.bench.report import RequestRecord, identical_share

        with open(args.reference, encoding="utf-8") as f:
            fields = RequestRecord.__dataclass_fields__
            reference = [RequestRecord(**{k: v for k, v in r.items() if k in fields})
                         for r in json.load(f)["records"]]
        for result, output in zip(results, outputs):
            share = identical_share(result.records, reference)
            output["identical_to_reference"] = share
            print(f"\n{result.label or result.model}: answers identical to {args.reference}: "
                  f"{'-' if share is None else format(share * 100, '.1f') + ' %'}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump(document, out, indent=2)
            out.write("\n")
    if args.plot:
        from kevlard.bench.plots import plot_runs

        plot_runs(results, args.plot)
    code = 0
    for result in results:
        prefix = f"kevlard bench: {result.label}: " if len(results) > 1 else "kevlard bench: "
        for error in sorted({record.error for record in result.records if record.error})[:5]:
            print(f"{prefix}failed: {error}", file=sys.stderr)
        if result.warmup_failed:
            print(f"{prefix}{result.warmup_failed} of {args.warmup} warmup requests failed", file=sys.stderr)
        missed = [fault for fault in result.faults if not fault.ok]
        for fault in missed:
            print(f"{prefix}fault {fault.kind}@{fault.at_s:g}s not injected: {fault.error}", file=sys.stderr)
        # Some failures are what a fault benchmark measures; none succeeding, or a fault that
        # could not be injected, is a broken setup.
        if not result.summary["succeeded"] or missed:
            code = 1
    return code


def _fault(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"worker": _worker_id(args.worker), "kind": args.kind}
    if args.duration_s is not None:
        body["duration_s"] = args.duration_s
    token = args.token
    if not token:  # the token a local daemon generated, from its owner-only file
        from kevlard.bench.errors import BenchError
        from kevlard.bench.faults import read_admin_token

        try:
            token = read_admin_token(args.url)
        except BenchError:
            token = ""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    reply = _request("POST", args.url, "/api/faults", json=body, headers=headers)
    if reply is None:
        return 1
    print(json.dumps(reply, indent=2))
    return 0


def _status(args: argparse.Namespace) -> int:
    snapshot = _request("GET", args.url, "/api/cluster")
    if snapshot is None:
        return 1
    print("workers")
    print(format_table(_rows(snapshot.get("workers", []))))
    print()
    print("pipelines")
    print(format_table(_rows(snapshot.get("pipelines", []))))
    return 0


def _seconds(text: str) -> float:
    """A duration: a finite number >= 0 (JSON has no NaN or infinity to send)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds >= 0, got {text!r}")
    return value


def _worker_id(text: str) -> int | str:
    """An integer as one (a negative one too: the daemon names it unknown), else as typed."""
    try:
        return int(text)
    except ValueError:
        return text


def _request(method: str, url: str, path: str, **kwargs: Any) -> Any:
    """The reply's JSON, or None after printing why to stderr."""
    import httpx

    target = url.rstrip("/") + path
    try:
        response = httpx.request(method, target, timeout=HTTP_TIMEOUT_S, **kwargs)
    except httpx.HTTPError as e:
        print(f"kevlard: cannot reach {target}: {e}", file=sys.stderr)
        return None
    if response.is_error:
        print(f"kevlard: {method} {target} answered {response.status_code}: {response.text}", file=sys.stderr)
        return None
    try:
        return response.json()
    except ValueError:
        print(f"kevlard: {method} {target} did not answer JSON: {response.text[:200]!r}", file=sys.stderr)
        return None


def _rows(items: Any) -> list[dict[str, Any]]:
    """Accept a list of objects, or an object keyed by id."""
    if isinstance(items, dict):
        return [{"id": key, **value} if isinstance(value, dict) else {"id": key, "value": value}
                for key, value in items.items()]
    return [item if isinstance(item, dict) else {"value": item} for item in items]


def format_table(rows: list[dict[str, Any]]) -> str:
    """A plain text table; columns in order of first appearance."""
    if not rows:
        return "  (none)"
    columns: list[str] = []
    for row in rows:
        columns += [key for key in row if key not in columns]
    cells = [[_cell(row.get(column)) for column in columns] for row in rows]
    widths = [max(len(column), *(len(line[i]) for line in cells)) for i, column in enumerate(columns)]
    lines = [columns, *cells]
    return "\n".join("  " + "  ".join(text.ljust(width) for text, width in zip(line, widths)).rstrip()
                     for line in lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, (list, tuple)):
        return ",".join(_cell(item) for item in value)
    if isinstance(value, dict):
        return json.dumps(value, separators=(",", ":"))
    return str(value)
