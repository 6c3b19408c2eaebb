"""Command line: ``serve`` (production), ``dev`` (``make run``), ``token`` (development) and ``schema``."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from gateway.config import load_settings
from gateway.errors import ConfigError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gateway", description="Candle stream gateway (SSE).")
    parser.add_argument("--config", type=Path, default=None, help="config file (default: config.toml)")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("serve", help="run the gateway with the configured stores")
    commands.add_parser(
        "dev",
        help="run the gateway on embedded Valkey and BigQuery emulator with demo data and dev tokens (make run)",
    )
    token = commands.add_parser("token", help="mint a development token that the `dev` gateway accepts")
    token.add_argument("--uid", default="demo", help="user id (the token's sub)")
    token.add_argument("--admin", action="store_true", help="set the admin claim")
    token.add_argument("--lifetime", type=int, default=3600, help="seconds until the token expires")
    schema = commands.add_parser("schema", help="print the OpenAPI 3.1 document of the endpoint (docs/openapi.yaml)")
    schema.add_argument("--output", "-o", type=Path, default=None, help="write it to this file instead of stdout")
    schema.add_argument(
        "--typescript", action="store_true", help="the event payloads as TypeScript (clients/js/src/events.d.ts)"
    )
    args = parser.parse_args(argv)

    if args.command == "schema":
        # Needs no settings: the document is the code's, not a deployment's.
        from gateway.schema import openapi, to_typescript, to_yaml

        text = to_typescript() if args.typescript else to_yaml(openapi())
        if args.output is None:
            sys.stdout.write(text)
        else:
            args.output.write_text(text)
        return 0

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"configuration error: {exc.message}", file=sys.stderr)
        return 2

    if args.command in ("serve", "dev"):
        try:
            if args.command == "serve":
                from gateway.server import serve

                serve(settings)
            else:
                from gateway.devtools.devserver import run_dev

                run_dev(settings)
        except ConfigError as exc:
            # A setting that only start-up can refuse: the same one line, not a traceback.
            print(f"configuration error: {exc.message}", file=sys.stderr)
            return 2
    else:
        from gateway.devtools.dev_auth import DevSigningKey, mint_token

        key = DevSigningKey.load_or_create(Path(settings.dev.state_dir))
        uid = args.uid
        print(mint_token(key, settings.auth.firebase_project_id, uid, admin=args.admin, lifetime_s=args.lifetime))
    return 0


if __name__ == "__main__":
    sys.exit(main())
