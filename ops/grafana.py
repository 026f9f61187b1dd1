"""Provisions Grafana through its HTTP API with `grafana-client`: creates or updates the
Prometheus datasource and the moeyard dashboard from the files in `infra/grafana/`.

The API token comes from the environment (`GRAFANA_TOKEN`), never from the command line,
and no error message repeats it.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import yaml

GRAFANA_DIR = Path(__file__).resolve().parent.parent / "infra" / "grafana"
DASHBOARD_FILE = GRAFANA_DIR / "provisioning" / "dashboards" / "moeyard.json"
DATASOURCE_FILE = GRAFANA_DIR / "provisioning" / "datasources" / "moeyard.yaml"
TOKEN_ENV = "GRAFANA_TOKEN"


class ProvisionError(RuntimeError):
    """Provisioning failed for a reason the operator can fix; the message says which."""


def load_dashboard(path: Path = DASHBOARD_FILE) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            dash = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ProvisionError(f"cannot read the dashboard {path}: {e}") from None
    if not dash.get("uid"):
        raise ProvisionError(f"the dashboard {path} has no uid")
    return dash


def load_datasource(path: Path = DATASOURCE_FILE) -> dict[str, Any]:
    """The first datasource of a Grafana provisioning YAML, as the API expects it."""
    try:
        with open(path, encoding="utf-8") as f:
            doc = yaml.safe_load(f)
        ds = dict(doc["datasources"][0])
    except (OSError, yaml.YAMLError, KeyError, IndexError, TypeError) as e:
        raise ProvisionError(f"cannot read a datasource from {path}: {e!r}") from None
    for key in ("uid", "name", "type", "url"):
        if not ds.get(key):
            raise ProvisionError(f"{path}: datasources[0].{key} is missing")
    ds.pop("editable", None)  # a provisioning-file setting, not an API field
    return ds


def _redact(url: str) -> str:
    """The URL without user:password, for messages."""
    parts = urlsplit(url)
    if parts.username or parts.password:
        host = parts.hostname or ""
        netloc = f"{host}:{parts.port}" if parts.port else host
        parts = parts._replace(netloc=netloc)
    return urlunsplit(parts)


def provision(
    grafana_url: str,
    *,
    token: str,
    prometheus_url: str | None = None,
    dashboard_path: Path = DASHBOARD_FILE,
    datasource_path: Path = DATASOURCE_FILE,
    timeout_s: float = 10.0,
) -> dict[str, Any]:
    """Creates or updates the datasource, then the dashboard (overwriting the one with the
    same uid).

    Args:
        grafana_url: Grafana's base URL (`http://host:3000`).
        token: a service-account token with the Editor role (datasources need Admin).
        prometheus_url: the datasource's URL; None keeps the one in the YAML.

    Returns:
        {"datasource": "created" | "updated", "dashboard": Grafana's answer}.

    Raises:
        ProvisionError: Grafana cannot be reached, rejects the token, or refuses a request;
            the message names the URL and the step, never the token.
    """
    from grafana_client import GrafanaApi
    from grafana_client.client import GrafanaClientError, GrafanaException

    if not token:
        raise ProvisionError(f"no Grafana token: set {TOKEN_ENV} to a service-account token")
    dash = copy.deepcopy(load_dashboard(dashboard_path))
    dash.pop("id", None)  # Grafana matches by uid; a stale numeric id would conflict
    ds = load_datasource(datasource_path)
    if prometheus_url:
        ds["url"] = prometheus_url
    where = _redact(grafana_url)
    api = GrafanaApi.from_url(grafana_url, credential=token, timeout=timeout_s)

    def fail(step: str, e: BaseException) -> ProvisionError:
        status = getattr(e, "status_code", None)
        if status == 401:
            why = f"Grafana rejected the token in {TOKEN_ENV} (401 Unauthorized)"
        elif status == 403:
            why = f"the token in {TOKEN_ENV} lacks the permission (403 Forbidden)"
        elif isinstance(e, GrafanaException) and status:
            why = f"Grafana answered {status}: {getattr(e, 'message', '')}"
        else:
            why = f"cannot reach Grafana ({type(e).__name__}: {e})"
        msg = f"{step} at {where} failed: {why}"
        return ProvisionError(msg.replace(token, "***"))

    result: dict[str, Any] = {}
    try:
        try:
            api.datasource.get_datasource_by_uid(ds["uid"])
            exists = True
        except GrafanaClientError as e:
            if e.status_code != 404:
                raise
            exists = False
        if exists:
            api.datasource.update_datasource_by_uid(ds["uid"], ds)
            result["datasource"] = "updated"
        else:
            api.datasource.create_datasource(ds)
            result["datasource"] = "created"
    except Exception as e:
        raise fail("provisioning the datasource", e) from None
    try:
        result["dashboard"] = api.dashboard.update_dashboard(
            {"dashboard": dash, "overwrite": True, "message": "moeyard dashboard provision"}
        )
    except Exception as e:
        raise fail("provisioning the dashboard", e) from None
    return result


def token_from_env() -> str:
    return os.environ.get(TOKEN_ENV, "")
