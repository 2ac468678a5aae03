"""`kto-loop`: one command for the whole loop.

    kto-loop serve        the inference server (chat, feedback, admin, metrics)
    kto-loop up           everything on the embedded default: what `make run` starts
    kto-loop adapters …   list | activate VERSION | rollback [VERSION], against a running server

Options on the command line override `KTO_*` environment variables.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from pydantic import ValidationError

logger = logging.getLogger(__name__)


def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--host", help="address to listen on / talk to (default 127.0.0.1)")
    common.add_argument("--port", type=int, help="TCP port (default 8000)")
    common.add_argument("--data-dir", help="where every embedded file lives (default ./data)")
    common.add_argument("--model", help="base model: a local directory or a hub id (default: the offline demo model)")
    common.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return common


def build_parser() -> argparse.ArgumentParser:
    common = _common()  # on every leaf command, so options may follow the last word
    parser = argparse.ArgumentParser(prog="kto-loop", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", parents=[common], help="run the inference server")
    sub.add_parser("up", parents=[common], help="run the loop on the embedded default (what `make run` starts)")
    adapters = sub.add_parser("adapters", help="list, activate and roll back adapter versions")
    actions = adapters.add_subparsers(dest="action", required=True)
    actions.add_parser("list", parents=[common], help="versions with status, parent and metrics")
    activate = actions.add_parser("activate", parents=[common], help="make VERSION active (`base` for no adapter)")
    activate.add_argument("version")
    activate.add_argument("--reason", default="")
    rollback = actions.add_parser("rollback", parents=[common], help="go back to the previous version, or to VERSION")
    rollback.add_argument("version", nargs="?")
    rollback.add_argument("--reason", default="")
    actions.add_parser("history", parents=[common], help="every activation and rollback")
    return parser


def _overrides(args: argparse.Namespace) -> dict:
    names = {"host": "host", "port": "port", "data_dir": "data_dir", "model": "model"}
    return {field: getattr(args, arg) for arg, field in names.items() if getattr(args, arg, None) is not None}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from serve.settings import ServeSettings

    try:
        settings = ServeSettings(**_overrides(args))
    except ValidationError as exc:
        for error in exc.errors():
            where = ".".join(str(p) for p in error["loc"]) or "settings"
            sys.stderr.write(f"kto-loop: invalid setting {where} (KTO_{where.upper()}): {error['msg']}\n")
        return 2
    if args.command == "up":
        # The learner joins `up` with the learner issue; until then the loop is serve + the event log.
        logger.info("kto-loop up: serving on the embedded default (event log and registry in %s)", settings.data_dir)
    if args.command in ("serve", "up"):
        return _serve(settings)
    return _adapters(settings, args)


def _serve(settings) -> int:
    import uvicorn

    from serve.app import create_app

    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="info",
                timeout_graceful_shutdown=10)
    return 0


def _adapters(settings, args) -> int:
    import httpx

    if settings.admin_token is None:
        sys.stderr.write("kto-loop: set KTO_ADMIN_TOKEN to the server's admin token\n")
        return 2
    url = f"http://{settings.host}:{settings.port}/v1/adapters"
    headers = {"Authorization": f"Bearer {settings.admin_token.get_secret_value()}"}
    with httpx.Client(headers=headers, timeout=30) as client:
        try:
            if args.action == "list":
                reply = client.get(url)
            elif args.action == "history":
                reply = client.get(f"{url}/history")
            elif args.action == "activate":
                reply = client.post(f"{url}/{args.version}/activate", json={"reason": args.reason})
            else:
                reply = client.post(f"{url}/rollback", json={"to": args.version, "reason": args.reason})
        except httpx.HTTPError as exc:
            sys.stderr.write(f"kto-loop: cannot reach the server at {url}: {exc}\n")
            return 1
    if reply.is_error:
        message = reply.json().get("error", {}).get("message", reply.text) if reply.headers.get(
            "content-type", "").startswith("application/json") else reply.text
        sys.stderr.write(f"kto-loop: {reply.status_code}: {message}\n")
        return 1
    print(_render(args.action, reply.json()))
    return 0


def _render(action: str, body: dict) -> str:
    if action == "list":
        rows = [f"active: {body['active'] or 'base'}   serving here: {body['serving'] or 'base'}"]
        for v in body["versions"]:
            mark = "*" if v["version"] == body["active"] else " "
            rows.append(f"{mark} {v['version']:<8} {v['status']:<9} parent={v['parent'] or 'base':<8} "
                        f"metrics={json.dumps(v['metrics'], sort_keys=True)}")
        return "\n".join(rows)
    if action == "history":
        return "\n".join(f"{e['seq']:>4} {e['action']:<9} {e['previous'] or 'base'} -> {e['version'] or 'base'} "
                         f"by {e['actor']}: {e['reason']}" for e in body["history"])
    return f"active: {body['active'] or 'base'} (serving here: {body['serving'] or 'base'})"


if __name__ == "__main__":
    sys.exit(main())
