"""Security as an operator meets it: a public bind without both tokens refuses to start; through a
real daemon, /v1 needs the API key and fault injection needs the admin token from a same-origin
caller."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from kevlard.config import ConfigError, ServerConfig, check_exposure, is_loopback_host
from tests.daemon_proc import free_port, running_daemon
from tests.tiny_models import make_tiny_model

API_KEY = "sk-test-key"
ADMIN_TOKEN = "test-admin-token"


def serve(args: list[str], tmp_path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kevlard", "serve", "--port", str(free_port()), *args],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"))


def test_public_bind_without_tokens_refuses_to_start(tmp_path):
    done = serve(["--host", "0.0.0.0"], tmp_path)
    assert done.returncode == 2, done.stderr
    assert "server.api_key" in done.stderr and "server.admin_token" in done.stderr
    assert "0.0.0.0" in done.stderr and "loopback" in done.stderr
    assert "serving" not in done.stdout


def test_public_bind_with_only_the_api_key_still_refuses(tmp_path):
    conf = tmp_path / "k.toml"
    conf.write_text(f'[server]\nhost = "::"\napi_key = "{API_KEY}"\n')
    done = serve(["--config", str(conf)], tmp_path)
    assert done.returncode == 2, done.stderr
    assert "missing: server.admin_token" in done.stderr


@pytest.mark.parametrize("host", ["127.0.0.1", "127.8.9.10", "localhost", "LOCALHOST", "::1", "[::1]",
                                  "::ffff:127.0.0.1"])
def test_loopback_hosts_need_no_tokens(host):
    assert is_loopback_host(host)
    check_exposure(ServerConfig(host=host))


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.10", "10.0.0.1", "example.com", "myhost"])
def test_other_hosts_need_both_tokens(host):
    assert not is_loopback_host(host)
    with pytest.raises(ConfigError, match="server.api_key and server.admin_token"):
        check_exposure(ServerConfig(host=host))
    with pytest.raises(ConfigError, match=r"missing: server\.api_key\)"):
        check_exposure(ServerConfig(host=host, admin_token=ADMIN_TOKEN))
    check_exposure(ServerConfig(host=host, api_key=API_KEY, admin_token=ADMIN_TOKEN))


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("security")
    model = make_tiny_model(tmp, "llama", num_layers=2)
    conf = tmp / "kevlard.toml"
    conf.write_text(f'[server]\napi_key = "{API_KEY}"\nadmin_token = "{ADMIN_TOKEN}"\n')
    args = ["--config", str(conf), "--model", str(model), "--devices", "cpu:1", "--pipelines", "1",
            "--stages", "1", "--spares", "0"]
    with running_daemon(args, tmp) as d:
        yield d


def test_v1_needs_the_api_key(daemon):
    body = {"prompt": "hello", "max_tokens": 2}
    with daemon.client() as c:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
            for method, path, json in (("GET", "/v1/models", None), ("POST", "/v1/completions", body)):
                r = c.request(method, path, json=json, headers=headers)
                assert r.status_code == 401, (path, headers, r.text)
                assert r.json()["error"]["code"] == "invalid_api_key"
                assert r.headers["www-authenticate"] == "Bearer"
        auth = {"Authorization": f"Bearer {API_KEY}"}
        assert c.get("/v1/models", headers=auth).status_code == 200
        r = c.post("/v1/completions", json=body, headers=auth)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
        # operations stay open to probes and scrapers
        assert c.get("/health").status_code == 200
        assert c.get("/ready").status_code == 200
        assert c.get("/metrics").status_code == 200


def test_faults_need_the_admin_token_from_the_same_origin(daemon):
    # worker 999 does not exist: a 404 shows the request got past the checks without harming anyone
    fault = {"worker": 999, "kind": "kill"}
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    with daemon.client() as c:
        r = c.post("/api/faults", json=fault)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_admin_token"
        r = c.post("/api/faults", json=fault, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401
        r = c.post("/api/faults", json=fault, headers={"Authorization": f"Bearer {API_KEY}"})
        assert r.status_code == 401, "the API key is not the admin token"
        r = c.post("/api/faults", json=fault, headers={**admin, "Origin": "http://evil.example"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "origin_not_allowed"
        r = c.post("/api/faults", json=fault, headers={**admin, "Origin": "null"})
        assert r.status_code == 403
        r = c.post("/api/faults", json=fault, headers={**admin, "Origin": daemon.url})
        assert r.status_code == 404, r.text
        r = c.post("/api/faults", json=fault, headers=admin)
        assert r.status_code == 404, r.text
        snap = c.get("/api/cluster").json()
    assert all(w["state"] == "healthy" for w in snap["workers"])
    assert snap["recovery"]["failures"] == 0


def test_a_port_in_use_fails_at_once_naming_the_field(tmp_path):
    """The HTTP port is taken before anything starts: a busy one is a clear error (exit 2), not a
    model load and a crash; and no socket of the daemon's own links can take it meanwhile."""
    import socket

    port = free_port()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", port))
        busy.listen()
        done = subprocess.run([sys.executable, "-m", "kevlard", "serve", "--port", str(port)],
                              capture_output=True, text=True, timeout=120, cwd=tmp_path,
                              env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert done.returncode == 2, done.stderr
    assert f"server.port: cannot listen on 127.0.0.1:{port}" in done.stderr
    assert "spawned" not in done.stderr  # no worker was started


def test_a_daemon_still_loading_holds_its_port_against_a_second_one():
    """The port is listened on from the first moment, not only once the model is loaded: bound but
    not listening, a second daemon's bind succeeded too (both SO_REUSEADDR), and it loaded a model
    and wrote its admin token over the first one's before it failed."""
    from kevlard.daemon import _listen

    server = ServerConfig(port=free_port())
    first = _listen(server)
    try:
        with pytest.raises(ConfigError, match=f"server.port: cannot listen on 127.0.0.1:{server.port}"):
            _listen(server).close()
    finally:
        first.close()
