from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest

from kevlard.config import Config, ConfigError, load_config, parse_devices

REPO_ROOT = Path(__file__).resolve().parent.parent
KEVLARD_TOML = REPO_ROOT / "kevlard.toml"


def write_toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "kevlard.toml"
    path.write_text(text)
    return path


def test_defaults_load_without_a_file():
    config = load_config()
    assert config == Config()
    assert config.server.port == 8000
    assert config.cluster.devices == "auto"
    assert config.recovery == "kevlar"


def test_repo_kevlard_toml_equals_the_defaults():
    assert load_config(KEVLARD_TOML) == Config()


def test_repo_kevlard_toml_documents_every_field():
    raw = tomllib.loads(KEVLARD_TOML.read_text())
    for section in dataclasses.fields(Config):
        default = getattr(Config(), section.name)
        if dataclasses.is_dataclass(default):
            documented = set(raw.get(section.name, {}))
            expected = {f.name for f in dataclasses.fields(default)}
            assert documented == expected, f"[{section.name}] in kevlard.toml"
        else:
            assert section.name in raw, f"{section.name} in kevlard.toml"


def test_file_values_apply(tmp_path):
    path = write_toml(tmp_path, '[server]\nport = 9001\n[cluster]\ndevices = "cpu:4"\n[kv]\nreplication = false\n')
    config = load_config(path)
    assert config.server.port == 9001
    assert config.cluster.devices == "cpu:4"
    assert config.kv.replication is False
    assert config.scheduler == Config().scheduler


def test_overrides_apply_over_the_file(tmp_path):
    path = write_toml(tmp_path, '[server]\nport = 9001\nhost = "0.0.0.0"\n')
    config = load_config(path, {"server.port": 9002, "cluster.pipelines": 2, "log_format": "json",
                                "cluster.stages": None})
    assert config.server.port == 9002
    assert config.server.host == "0.0.0.0"  # from the file, not overridden
    assert config.cluster.pipelines == 2
    assert config.cluster.stages == 0  # None means "not given"
    assert config.log_format == "json"


def test_parse_devices():
    assert parse_devices("auto") == ("auto", None)
    assert parse_devices("cpu:4") == ("cpu", [0, 1, 2, 3])
    assert parse_devices("cuda:0,1") == ("cuda", [0, 1])
    assert parse_devices("cuda:0,0,0") == ("cuda", [0, 0, 0])  # workers sharing one GPU


@pytest.mark.parametrize(
    ("text", "overrides", "field"),
    [
        ("", {"server.port": 0}, "server.port"),
        ("", {"cluster.devices": "gpu:1"}, "cluster.devices"),
        ("", {"cluster.devices": "cpu:0"}, "cluster.devices"),
        ("", {"cluster.devices": "cuda:0,-1"}, "cluster.devices"),
        ("[frobnicator]\nlevel = 3\n", {}, "frobnicator"),
        ("[server]\nprot = 8000\n", {}, "server.prot"),
        ('[server]\nport = "eight thousand"\n', {}, "server.port"),
        ("[kv]\nreplication = 3\n", {}, "kv.replication"),
        ("[model]\ndtype = 16\n", {}, "model.dtype"),
        ("[kv]\nblock_size = 3\n", {}, "kv.block_size"),
        ("[kv]\nreplication_interval_ms = 0\n", {}, "kv.replication_interval_ms"),
        ("[kv]\nmemory_mb = 1e20\n", {}, "kv.memory_mb"),  # failed only once the workers allocated it
        ("[kv]\nnum_blocks = 100000000000000\n", {}, "kv.num_blocks"),
        ("[health]\nheartbeat_interval_s = 1.0\nheartbeat_timeout_s = 1.0\n", {}, "health.heartbeat_timeout_s"),
        ("[health]\nheartbeat_interval_s = 2.0\nheartbeat_timeout_s = 1.0\n", {}, "health.heartbeat_timeout_s"),
        ("server = 3\n", {}, "server"),
        ('recovery = "pray"\n', {}, "recovery"),
        ("", {"log_format": "xml"}, "log_format"),
        ("", {"model.path": "/nonexistent/model.gguf"}, "model.path"),
        ('[model]\ncache_dir = "/etc/passwd"\n', {}, "model.cache_dir"),  # a file, not a directory
    ],
)
def test_invalid_values_name_the_field(tmp_path, text, overrides, field):
    path = write_toml(tmp_path, text)
    with pytest.raises(ConfigError) as excinfo:
        load_config(path, overrides)
    assert str(excinfo.value).startswith(f"{field}:"), str(excinfo.value)


def test_missing_file_fails_clearly(tmp_path):
    with pytest.raises(ConfigError, match="no such file.*/nonexistent.toml"):
        load_config("/nonexistent.toml")
    with pytest.raises(ConfigError, match=f"not a file '{tmp_path}'"):  # a directory given by mistake
        load_config(tmp_path)


def test_invalid_toml_names_the_file(tmp_path):
    path = write_toml(tmp_path, "[server\nport = 1\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(path)


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Config().server.port = 1  # type: ignore[misc]
