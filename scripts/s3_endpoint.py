"""A local S3-compatible endpoint for the demo: moto's server on 127.0.0.1, run from the shell.

    python scripts/s3_endpoint.py --port 0 --bucket moeyard-demo --ready-file /tmp/s3.url

Binds the port (0 = a free one chosen by the OS), creates the buckets, writes the endpoint
URL to `--ready-file` (and stdout) once it answers, then serves until it gets SIGTERM or
SIGINT. The same server the tests start (tests/s3_server.py); clients reach it through the
standard AWS_ENDPOINT_URL / AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY variables.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import urllib.request


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="s3_endpoint", description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=0, help="0 = a free port")
    p.add_argument("--bucket", action="append", default=[], help="bucket to create (repeat)")
    p.add_argument("--ready-file", default="", help="write the endpoint URL here when up")
    args = p.parse_args(argv)

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=args.port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{server.get_host_and_port()[1]}"
    urllib.request.urlopen(url + "/moto-api/", timeout=10)  # answers before we say so
    if args.bucket:
        import boto3

        # moto accepts any credentials; these only satisfy the client.
        s3 = boto3.client(
            "s3",
            endpoint_url=url,
            region_name="us-east-1",
            aws_access_key_id=os.environ.get("AWS_ACCESS_KEY_ID", "local"),
            aws_secret_access_key=os.environ.get("AWS_SECRET_ACCESS_KEY", "local"),
        )
        for b in args.bucket:
            s3.create_bucket(Bucket=b)
    if args.ready_file:
        tmp = args.ready_file + ".tmp"
        with open(tmp, "w") as f:
            f.write(url + "\n")
        os.replace(tmp, args.ready_file)  # readers never see a half-written URL
    print(url, flush=True)

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
