"""`moeyard dashboard provision` against an HTTP server on 127.0.0.1 that answers the
Grafana API calls it makes (datasource by uid, create, update, dashboard save) the way
Grafana does, and records them; plus the file-provisioning files."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from cluster.cli import main as cli
from ops.grafana import DASHBOARD_FILE, DATASOURCE_FILE, ProvisionError, provision
from tests.prometheus_server import free_port

TOKEN = "glsa_test-token-0123456789abcdef"


class FakeGrafana:
    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.datasources: dict[str, dict[str, Any]] = {}
        self.dashboards: dict[str, dict[str, Any]] = {}
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def _reply(self, status: int, body: Any) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _handle(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(n)) if n else None
                owner.calls.append(
                    {
                        "method": self.command,
                        "path": self.path,
                        "auth": self.headers.get("Authorization"),
                        "body": body,
                    }
                )
                if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                    self._reply(401, {"message": "invalid API key"})
                    return
                parts = self.path.split("/")
                if self.command == "GET" and self.path.startswith("/api/datasources/uid/"):
                    ds = owner.datasources.get(parts[-1])
                    self._reply(200, ds) if ds else self._reply(
                        404, {"message": "Data source not found"}
                    )
                elif self.command == "POST" and self.path == "/api/datasources":
                    owner.datasources[body["uid"]] = body
                    self._reply(200, {"id": 1, "message": "Datasource added", "datasource": body})
                elif self.command == "PUT" and self.path.startswith("/api/datasources/uid/"):
                    owner.datasources[parts[-1]] = body
                    self._reply(200, {"id": 1, "message": "Datasource updated"})
                elif self.command == "POST" and self.path == "/api/dashboards/db":
                    uid = body["dashboard"]["uid"]
                    if uid in owner.dashboards and not body.get("overwrite"):
                        self._reply(
                            412, {"message": "version-mismatch", "status": "version-mismatch"}
                        )
                        return
                    owner.dashboards[uid] = body["dashboard"]
                    self._reply(
                        200,
                        {"status": "success", "uid": uid, "url": f"/d/{uid}/moeyard", "version": 1},
                    )
                else:
                    self._reply(404, {"message": "not found"})

            do_GET = do_POST = do_PUT = _handle

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def grafana() -> Iterator[FakeGrafana]:
    g = FakeGrafana()
    yield g
    g.stop()


def expected_datasource(url: str | None = None) -> dict[str, Any]:
    ds = dict(yaml.safe_load(DATASOURCE_FILE.read_text())["datasources"][0])
    ds.pop("editable")
    if url:
        ds["url"] = url
    return ds


def test_provision_creates_then_updates(grafana: FakeGrafana) -> None:
    res = provision(grafana.url, token=TOKEN, prometheus_url="http://prom:9090")
    assert res["datasource"] == "created" and res["dashboard"]["status"] == "success"
    methods = [(c["method"], c["path"]) for c in grafana.calls]
    assert methods == [
        ("GET", "/api/datasources/uid/moeyard-prometheus"),
        ("POST", "/api/datasources"),
        ("POST", "/api/dashboards/db"),
    ]
    assert all(c["auth"] == f"Bearer {TOKEN}" for c in grafana.calls)
    assert grafana.calls[1]["body"] == expected_datasource("http://prom:9090")
    sent = grafana.calls[2]["body"]
    assert sent["overwrite"] is True
    assert sent["dashboard"] == json.loads(DASHBOARD_FILE.read_text())
    # Again: the datasource exists now and is updated in place; the dashboard overwritten.
    grafana.calls.clear()
    res = provision(grafana.url, token=TOKEN)
    assert res["datasource"] == "updated"
    assert [(c["method"], c["path"]) for c in grafana.calls] == [
        ("GET", "/api/datasources/uid/moeyard-prometheus"),
        ("PUT", "/api/datasources/uid/moeyard-prometheus"),
        ("POST", "/api/dashboards/db"),
    ]
    assert grafana.calls[1]["body"] == expected_datasource()


def test_cli_reads_the_token_from_the_environment(
    grafana: FakeGrafana, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("GRAFANA_TOKEN", TOKEN)
    assert cli(["dashboard", "provision", "--grafana-url", grafana.url]) == 0
    assert "datasource created" in capsys.readouterr().out
    assert grafana.dashboards["moeyard-ops"]["title"] == "moeyard: training operations"


def test_wrong_token_is_a_clear_error_without_the_token(
    grafana: FakeGrafana, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    wrong = "glsa_wrong-secret-value-42"
    monkeypatch.setenv("GRAFANA_TOKEN", wrong)
    assert cli(["dashboard", "provision", "--grafana-url", grafana.url]) == 1
    err = capsys.readouterr().err
    assert "rejected the token in GRAFANA_TOKEN (401 Unauthorized)" in err
    assert grafana.url in err
    assert wrong not in err
    assert grafana.datasources == {} and grafana.dashboards == {}


def test_missing_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GRAFANA_TOKEN", raising=False)
    with pytest.raises(ProvisionError, match="set GRAFANA_TOKEN"):
        provision("http://127.0.0.1:1", token="")


def test_unreachable_grafana() -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with pytest.raises(ProvisionError) as e:
        provision(url, token=TOKEN, timeout_s=2.0)
    msg = str(e.value)
    assert "cannot reach Grafana" in msg and url in msg and TOKEN not in msg


def test_file_provisioning_is_consistent() -> None:
    ds_doc = yaml.safe_load(DATASOURCE_FILE.read_text())
    assert ds_doc["apiVersion"] == 1
    uid = ds_doc["datasources"][0]["uid"]
    providers = yaml.safe_load((DASHBOARD_FILE.parent / "moeyard.yaml").read_text())["providers"]
    # The provider reads the folder the JSON sits in, once provisioning/ is mounted at
    # /etc/grafana/provisioning.
    assert providers[0]["options"]["path"] == "/etc/grafana/provisioning/dashboards"
    assert (
        DASHBOARD_FILE.parent.name == "dashboards"
        and DASHBOARD_FILE.parent.parent.name == "provisioning"
    )
    dash = json.loads(DASHBOARD_FILE.read_text())
    assert dash["uid"] == "moeyard-ops"
    assert {v["name"] for v in dash["templating"]["list"]} == {"run", "node"}
    for p in dash["panels"]:
        assert p["datasource"]["uid"] == uid
        for t in p["targets"]:
            assert t["datasource"]["uid"] == uid
            assert 'run=~"$run"' in t["expr"] and 'node=~"$node"' in t["expr"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    assert Path(DASHBOARD_FILE).read_text().endswith("\n")
