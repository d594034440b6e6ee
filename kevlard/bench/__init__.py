"""`kevlard bench`: an open-loop load generator, its fault schedule, and its report."""
from kevlard.bench.errors import BenchError
from kevlard.bench.faults import FaultSpec, parse_fault_spec
from kevlard.bench.loadgen import BenchResult, poisson_schedule, run_load
from kevlard.bench.report import (FaultRecord, RequestRecord, fault_metrics, format_fault_markdown,
                                  format_markdown, percentile, summarize)

__all__ = ["BenchError", "BenchResult", "FaultRecord", "FaultSpec", "RequestRecord", "fault_metrics",
           "format_fault_markdown", "format_markdown", "parse_fault_spec", "percentile",
           "poisson_schedule", "run_load", "summarize"]
