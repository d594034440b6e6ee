"""kevlard bench --config: the config copy a managed daemon gets, and a daemon that cannot start."""
from __future__ import annotations

import tomllib

import pytest

from kevlard.bench.errors import BenchError
from kevlard.bench.managed_daemon import ManagedDaemon, toml_dumps, with_overrides
from kevlard.cli import main
from kevlard.config import load_config


def test_toml_dumps_round_trips_a_config():
    raw = {"recovery": "kevlar", "log_format": "text",
           "server": {"admin_token": 'a"b\\c', "port": 8000},
           "kv": {"replication": True, "replica_fraction": 0.5},
           "cluster": {"devices": "cpu:3"}}
    assert tomllib.loads(toml_dumps(raw)) == raw


def test_with_overrides_sets_dotted_fields_without_touching_the_original():
    raw = {"kv": {"replication": True, "block_size": 8}}
    out = with_overrides(raw, {"kv.replication": False, "recovery": "restart", "server.port": 9})
    assert out == {"kv": {"replication": False, "block_size": 8}, "recovery": "restart",
                   "server": {"port": 9}}
    assert raw == {"kv": {"replication": True, "block_size": 8}}


def test_managed_daemon_config_keeps_the_users_fields_and_sets_port_and_token(tmp_path):
    source = tmp_path / "user.toml"
    source.write_text('[kv]\nblock_size = 8\n[server]\napi_key = "k"\n')
    daemon = ManagedDaemon(source, tmp_path / "work", "run", overrides={"recovery": "restart"})
    config = load_config(daemon.config_path)  # what kevlard serve will read
    assert config.kv.block_size == 8 and config.recovery == "restart"
    assert config.server.port == daemon.port and config.server.admin_token == daemon.admin_token
    assert len(daemon.admin_token) >= 16 and daemon.api_key == "k"
    assert daemon.url == f"http://127.0.0.1:{daemon.port}"
    assert daemon.config_path.stat().st_mode & 0o077 == 0  # it holds the admin token
    # a token the user configured is the one used
    source.write_text('[server]\nadmin_token = "mine"\n')
    assert ManagedDaemon(source, tmp_path / "work", "again").admin_token == "mine"


def test_missing_config_is_a_bench_error(tmp_path):
    with pytest.raises(BenchError, match="--config"):
        ManagedDaemon(tmp_path / "nope.toml", tmp_path, "run")


def test_daemon_that_exits_at_start_is_reported_with_its_log(tmp_path, capsys):
    conf = tmp_path / "bad.toml"
    conf.write_text("[kv]\nblock_size = 0\n")  # config validation makes kevlard serve exit 2
    code = main(["bench", "--config", str(conf), "--requests", "1", "--ready-timeout-s", "60",
                 "--work-dir", str(tmp_path / "work")])
    err = capsys.readouterr().err
    assert code == 1
    assert "exited with 2 before it was ready" in err and "kv.block_size" in err


@pytest.mark.parametrize("flags, message", [
    (["--url", "http://127.0.0.1:9", "--compare", "kevlar"], "--compare needs --config"),
    (["--url", "http://127.0.0.1:9", "--serve-arg=--model"], "--serve-arg needs --config"),
    (["--config", "x.toml", "--compare", "kevlar", "--replication", "on,off"], "separate runs"),
    (["--config", "x.toml", "--compare", "kevlar,fast"], "mode must be one of"),
    (["--config", "x.toml", "--replication", "maybe"], "expected on, off"),
])
def test_cli_rejects_flags_that_do_not_go_together(flags, message, capsys):
    assert main(["bench", *flags]) == 2
    assert message in capsys.readouterr().err


def test_url_and_config_are_exclusive(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--url", "http://127.0.0.1:9", "--config", "x.toml"])
    assert exc.value.code == 2 and "not allowed with" in capsys.readouterr().err
