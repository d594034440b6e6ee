"""`kevlard bench`: an open-loop load generator and its report."""
from kevlard.bench.loadgen import BenchError, BenchResult, poisson_schedule, run_load
from kevlard.bench.report import RequestRecord, format_markdown, percentile, summarize

__all__ = ["BenchError", "BenchResult", "RequestRecord", "format_markdown", "percentile",
           "poisson_schedule", "run_load", "summarize"]
