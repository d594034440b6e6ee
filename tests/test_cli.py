from __future__ import annotations

import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from kevlard.cli import format_table, main

REPO_ROOT = Path(__file__).resolve().parent.parent


def run_kevlard(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kevlard", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (["--port", "0"], "server.port"),
        (["--devices", "bogus"], "cluster.devices"),
        (["--pipelines", "-1"], "cluster.pipelines"),
        (["--log-format", "xml"], "log_format"),
        (["--model", "/nonexistent/model.gguf"], "model.path"),
    ],
)
def test_serve_rejects_invalid_flags_naming_the_field(args, field):
    result = run_kevlard("serve", *args)
    assert result.returncode == 2
    assert result.stderr.startswith(f"kevlard: invalid configuration: {field}:"), result.stderr


def test_serve_with_a_missing_config_file_fails_clearly():
    result = run_kevlard("serve", "--config", "/nonexistent/kevlard.toml")
    assert result.returncode == 2
    assert "kevlard: invalid configuration:" in result.stderr
    assert "no such file" in result.stderr and "/nonexistent/kevlard.toml" in result.stderr


def test_serve_reports_errors_in_the_config_file(tmp_path):
    path = tmp_path / "kevlard.toml"
    path.write_text("[kv]\nblock_size = 3\n")
    result = run_kevlard("serve", "--config", str(path))
    assert result.returncode == 2
    assert "kv.block_size" in result.stderr


def test_no_command_prints_usage():
    result = run_kevlard()
    assert result.returncode == 2
    assert "usage: kevlard" in result.stderr


def test_bench_without_url_is_refused(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench"])
    assert exc.value.code == 2
    assert "--url" in capsys.readouterr().err


class _FakeDaemon(BaseHTTPRequestHandler):
    """Answers /api/cluster and /api/faults like a daemon would; records what it received."""
    received: list[dict] = []

    def do_GET(self):
        if self.path != "/api/cluster":
            self._reply(404, {"error": "not found"})
            return
        self._reply(200, {
            "workers": [{"id": 0, "device": "cpu:0", "state": "serving", "stages": [0]},
                        {"id": 1, "device": "cpu:1", "state": "spare", "stages": []}],
            "pipelines": [{"id": 0, "route": [0, 1], "healthy": True}],
        })

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.received.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
        if self.headers.get("Authorization") != "Bearer s3cret":
            self._reply(401, {"error": "bad token"})
            return
        self._reply(200, {"injected": body})

    def _reply(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format, *args):  # keep test output quiet
        pass


@pytest.fixture
def fake_daemon():
    _FakeDaemon.received = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeDaemon)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


def test_fault_posts_the_fault_with_the_admin_token(fake_daemon, capsys):
    code = main(["fault", "--url", fake_daemon + "/", "--worker", "3", "--kind", "hang",
                 "--duration-s", "2.5", "--token", "s3cret"])
    assert code == 0
    assert _FakeDaemon.received == [{"path": "/api/faults", "auth": "Bearer s3cret",
                                     "body": {"worker": 3, "kind": "hang", "duration_s": 2.5}}]
    assert json.loads(capsys.readouterr().out) == {"injected": {"worker": 3, "kind": "hang", "duration_s": 2.5}}


def test_fault_refused_exits_1_with_the_reason(fake_daemon, capsys):
    assert main(["fault", "--url", fake_daemon, "--worker", "0", "--kind", "kill"]) == 1
    assert _FakeDaemon.received[0]["body"] == {"worker": 0, "kind": "kill"}
    assert "401" in capsys.readouterr().err


def test_status_prints_workers_and_pipelines(fake_daemon, capsys):
    assert main(["status", "--url", fake_daemon]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[:4] == [
        "workers",
        "  id  device  state    stages",
        "  0   cpu:0   serving  0",
        "  1   cpu:1   spare",
    ]
    assert "  0   0,1    True" in out


def test_status_unreachable_daemon_exits_1(capsys):
    assert main(["status", "--url", "http://127.0.0.1:9"]) == 1
    assert "cannot reach http://127.0.0.1:9/api/cluster" in capsys.readouterr().err


def test_format_table_of_nothing():
    assert format_table([]) == "  (none)"


@pytest.mark.parametrize("value", ["nan", "inf", "-1", "soon"])
def test_fault_duration_must_be_a_finite_number_of_seconds(value, capsys):
    """JSON has no NaN or infinity: refused by the argument parser, not a traceback on sending."""
    with pytest.raises(SystemExit) as excinfo:
        main(["fault", "--url", "http://127.0.0.1:9", "--worker", "0", "--kind", "slow", "--duration-s", value])
    assert excinfo.value.code == 2
    assert "--duration-s" in capsys.readouterr().err


def test_a_fault_names_a_negative_worker_as_a_number_for_the_daemon_to_call_unknown():
    from kevlard.cli import _worker_id

    assert _worker_id("3") == 3 and _worker_id("-1") == -1  # "-1" was sent as a string: "not an integer"
    assert _worker_id("three") == "three"  # as typed: the daemon's 400 names it
