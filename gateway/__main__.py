"""Command line: ``serve`` (production), ``dev`` (``make run``), ``token`` (development) and ``schema``.

Installed as the ``candle-gateway`` console script; ``python -m gateway``
(``.venv/bin/python -m gateway`` without activating the virtualenv) is the same.
"""

from __future__ import annotations

import argparse
import logging
import logging.handlers
import os
import sys
from pathlib import Path

from gateway.config import load_settings, with_overrides
from gateway.errors import ConfigError
from gateway.logs import configure_logging

_EPILOG = """\
Every setting has a default in the package; a config file (--config, see the
repository's config.toml) and environment variables GATEWAY_<SECTION>_<KEY>
(e.g. GATEWAY_REDIS_URL or GATEWAY_SERVER_PORT) override them, the variables last.
Run without activating the virtualenv: .venv/bin/python -m gateway serve
(or the installed console script: candle-gateway serve).
"""


def _workers(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        count = int(value)
    except ValueError:
        count = 0
    if count < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1 or 'auto', got {value!r}")
    return count


def build_parser() -> argparse.ArgumentParser:
    """The command line: options of the program, and of each sub-command."""
    config_help = "TOML config file (optional: every setting has a default; GATEWAY_* variables override it)"
    # --config is accepted before or after the sub-command; SUPPRESS keeps the sub-command's
    # default from overwriting a value given before it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", type=Path, default=argparse.SUPPRESS, metavar="PATH", help=config_help)
    parser = argparse.ArgumentParser(
        prog="candle-gateway",
        description="Candle stream gateway: streams backtest candles over one SSE connection.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", type=Path, default=None, metavar="PATH", help=config_help)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser(
        "serve",
        parents=[common],
        help="run the gateway on the configured stores (production)",
        description="Run the gateway until SIGTERM/SIGINT, then drain open streams within "
        "server.shutdown_grace_s. Needs redis.url (GATEWAY_REDIS_URL); it never starts an embedded Valkey.",
    )
    serve.add_argument(
        "--workers",
        type=_workers,
        default=None,
        metavar="N|auto",
        help="processes serving the port together (SO_REUSEPORT); auto = one per usable CPU "
        "(default: server.workers, 1)",
    )
    commands.add_parser(
        "dev",
        parents=[common],
        help="run on embedded Valkey and a BigQuery emulator with a live demo job and dev tokens (make run)",
        description="Development: embedded Valkey, the BigQuery emulator, a local certificate endpoint, "
        "a demo job written live; prints a URL and a ready token. Stops everything on Ctrl-C or SIGTERM.",
    )
    token = commands.add_parser(
        "token",
        parents=[common],
        help="mint a development token that the `dev` gateway accepts",
        description="Print a token signed with the development key (dev.state_dir) for `dev`.",
    )
    token.add_argument("--uid", default="demo", help="user id, the token's sub (default: demo)")
    token.add_argument("--admin", action="store_true", help="set the admin claim")
    token.add_argument("--lifetime", type=int, default=3600, metavar="SECONDS", help="until expiry (default: 3600)")
    schema = commands.add_parser(
        "schema",
        help="print the OpenAPI 3.1 document of the endpoint (docs/openapi.yaml)",
        description="The OpenAPI document (or the events' TypeScript types), generated from the structs "
        "the gateway encodes; needs no settings.",
    )
    schema.add_argument("--output", "-o", type=Path, default=None, help="write it to this file instead of stdout")
    schema.add_argument(
        "--typescript", action="store_true", help="the event payloads as TypeScript (clients/js/src/events.d.ts)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "schema":
        return _schema(args.output, typescript=args.typescript)
    # What loading the settings logs (unknown GATEWAY_* variables) waits until the
    # settings say how logs are written.
    early = logging.handlers.MemoryHandler(capacity=1000, flushLevel=logging.CRITICAL + 1)
    logging.getLogger().addHandler(early)
    try:
        settings = load_settings(args.config)
        if getattr(args, "workers", None) is not None:
            settings = with_overrides(settings, server={"workers": args.workers})
    except ConfigError as exc:
        print(f"configuration error: {exc.message}", file=sys.stderr)
        return 2
    finally:
        logging.getLogger().removeHandler(early)
    handler = configure_logging(settings.log.format, getattr(logging, settings.log.level.upper()))
    early.setTarget(handler)
    early.close()  # flushes to the target

    try:
        if args.command == "serve":
            from gateway.server import serve

            return serve(settings)
        if args.command == "dev":
            from gateway.devtools.devserver import run_dev
            from gateway.server import StartupError

            try:
                run_dev(settings)
            except StartupError as exc:  # the port is taken, say: one line, as `serve` says it
                logging.getLogger("gateway.devtools.devserver").error("%s", exc)
                return 2
            return 0
    except ConfigError as exc:
        # A setting that only start-up can refuse: the same one line, not a traceback.
        print(f"configuration error: {exc.message}", file=sys.stderr)
        return 2
    from gateway.devtools.dev_auth import DevSigningKey, mint_token

    key = DevSigningKey.load_or_create(Path(settings.dev.state_dir))
    print(mint_token(key, settings.auth.firebase_project_id, args.uid, admin=args.admin, lifetime_s=args.lifetime))
    return 0


def _schema(output: Path | None, *, typescript: bool) -> int:
    # Needs no settings: the document is the code's, not a deployment's.
    from gateway.schema import openapi, to_typescript, to_yaml

    text = to_typescript() if typescript else to_yaml(openapi())
    if output is None:
        sys.stdout.write(text)
    else:
        output.write_text(text)
    return 0


def run() -> None:
    """The console script and ``python -m gateway``: ``main``, then exit at once.

    Everything has been closed by then; the interpreter's own teardown of the
    imported client libraries (google-cloud, grpc) takes 0.6 s on an idle
    machine and seconds on a busy one, time a replica that was told to stop
    should not take.
    """
    status = main()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


if __name__ == "__main__":
    run()
