"""`moeyard dashboard`: `provision` sets up Grafana (datasource + dashboard from
infra/grafana/) through its API; `serve` runs the built-in ops page for one run."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ops.grafana import DASHBOARD_FILE, DATASOURCE_FILE, TOKEN_ENV, ProvisionError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="moeyard dashboard", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="action", required=True)
    prov = sub.add_parser(
        "provision",
        help="create or update the Prometheus datasource and the dashboard in Grafana",
        description=f"The API token is read from ${TOKEN_ENV} (a service-account token).",
    )
    prov.add_argument("--grafana-url", required=True, help="e.g. http://grafana:3000")
    prov.add_argument(
        "--prometheus-url", help="the datasource's URL (default: the one in the YAML)"
    )
    prov.add_argument("--dashboard", type=Path, default=DASHBOARD_FILE)
    prov.add_argument("--datasource", type=Path, default=DATASOURCE_FILE)
    prov.add_argument("--timeout", type=float, default=10.0, help="seconds per request")
    srv = sub.add_parser("serve", help="serve the built-in ops page for a run directory")
    srv.add_argument("run_dir", help="the run's output_dir (a local path or an fsspec URL)")
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8765)
    args = p.parse_args(argv)

    if args.action == "provision":
        from ops.grafana import provision, token_from_env

        try:
            result = provision(
                args.grafana_url,
                token=token_from_env(),
                prometheus_url=args.prometheus_url,
                dashboard_path=args.dashboard,
                datasource_path=args.datasource,
                timeout_s=args.timeout,
            )
        except ProvisionError as e:
            print(f"moeyard dashboard provision: {e}", file=sys.stderr)
            return 1
        dash = result["dashboard"] or {}
        print(
            f"datasource {result['datasource']}; dashboard {dash.get('status', 'saved')} "
            f"at {dash.get('url', '')}"
        )
        return 0

    from ops.page import serve

    try:
        serve(args.run_dir, host=args.host, port=args.port)
    except ValueError as e:
        print(f"moeyard dashboard serve: {e}", file=sys.stderr)
        return 1
    return 0
