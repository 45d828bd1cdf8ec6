"""``segexport-sandbox``: start every vendor emulator and run until stopped.

Prints one JSON line with the base URLs, credentials and the CA bundle once it is listening.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys

from airflow_provider_segexport.sandbox.core import Latency
from airflow_provider_segexport.sandbox.runner import SandboxServer


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="segexport-sandbox", description=__doc__)
    p.add_argument("--host", default="localhost", help="host name to serve on (default: localhost)")
    p.add_argument("--port", type=int, default=8443, help="port (0 picks a free one; default 8443)")
    p.add_argument("--plain-http", action="store_true", help="serve plain HTTP instead of HTTPS")
    p.add_argument("--tls-dir", default=None, help="where to write the generated CA and certificate")
    p.add_argument("--latency-ms", type=float, default=0.0, help="base latency of every call, in ms")
    p.add_argument("--per-item-ms", type=float, default=0.0, help="extra latency per member in a call, in ms")
    p.add_argument("--token-ttl", type=int, default=3600, help="lifetime of issued OAuth tokens, in seconds")
    p.add_argument(
        "--faults", default="",
        help="faults to inject, e.g. 'burst429:vendor=mailchimp,count=5;status:status=503,count=2'",
    )
    p.add_argument("--seed", default=None, help="JSON file with pre-existing destination state (see README)")
    p.add_argument("--rng-seed", type=int, default=None, help="make generated credentials deterministic")
    p.add_argument("--tls-hostname", action="append", default=[],
                   help="extra host name for the TLS certificate (repeatable), e.g. a compose service name")
    p.add_argument("--public-host", default=None,
                   help="host name to use in the printed URLs (default: --host, or localhost for 0.0.0.0)")
    p.add_argument("--info-file", default=None, help="also write the start-up JSON line to this file")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    seed = None
    if args.seed:
        with open(args.seed, encoding="utf-8") as fh:
            seed = json.load(fh)
    server = SandboxServer(
        args.host, args.port, tls=not args.plain_http, tls_dir=args.tls_dir,
        latency=Latency(args.latency_ms, args.per_item_ms), token_ttl=args.token_ttl, seed=seed,
        faults=args.faults, rng_seed=args.rng_seed, log_level="warning", tls_hostnames=args.tls_hostname,
        public_host=args.public_host, info_file=args.info_file,
    )
    # The emulators keep every member in memory (1,000,000 in a benchmark): the collector's full passes
    # over that heap would stall the event loop for a second at a time, which no real vendor does.
    # Members hold no reference cycles; full passes are made rare, young ones less frequent.
    gc.freeze()
    gc.set_threshold(50_000, 50, 1000)
    # Big calls are processed on a worker thread; the event loop takes the interpreter back within 1 ms
    # (not 5) to send the answers that are due meanwhile.
    sys.setswitchinterval(0.001)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
