"""Log lines in the configured format, the workers' too (they write to the daemon's stderr)."""
from __future__ import annotations

import json
import logging

import pytest

from kevlard.logs import setup_logging


@pytest.fixture(autouse=True)
def restore_kevlard_logger():
    root = logging.getLogger("kevlard")
    saved = root.handlers[:], root.level, root.propagate
    yield
    root.handlers[:], root.level, root.propagate = saved


def test_json_lines_name_the_worker_that_wrote_them(capsys):
    setup_logging("json", worker=3)
    logging.getLogger("kevlard.replication").warning("replication link down: %s", "closed")
    line = json.loads(capsys.readouterr().err)
    assert line["level"] == "warning" and line["logger"] == "kevlard.replication" and line["worker"] == 3
    assert line["message"] == "replication link down: closed"


def test_text_lines_of_a_worker_say_which_one_and_the_daemons_do_not(capsys):
    setup_logging("text", worker=5)
    logging.getLogger("kevlard.worker").warning("sampling failed")
    assert " WARNING kevlard.worker [worker 5]: sampling failed" in capsys.readouterr().err
    setup_logging("text")
    logging.getLogger("kevlard").info("ready")
    err = capsys.readouterr().err
    assert " INFO kevlard: ready" in err and "[worker" not in err


def test_what_the_daemon_tells_its_starter_is_json_too_when_the_logs_are(capsys):
    from kevlard.logs import announce

    announce("json", "kevlard: serving m on http://127.0.0.1:8000")
    announce("text", "kevlard: dashboard: http://127.0.0.1:8000/?token=t")
    json_line, text_line = capsys.readouterr().out.splitlines()
    assert json.loads(json_line)["message"] == "kevlard: serving m on http://127.0.0.1:8000"
    assert text_line == "kevlard: dashboard: http://127.0.0.1:8000/?token=t"
