"""What stops a benchmark run, shared by the load generator and its fault schedule."""

MAX_ERROR_CHARS = 300  # of a server's answer quoted in an error


class BenchError(Exception):
    """The benchmark cannot run at all (server unreachable, no model); one request failing is not this."""
