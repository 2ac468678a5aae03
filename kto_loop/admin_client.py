"""The admin commands (`kto-loop adapters …`, `users erase`, `keys …`, `annotations …`): a client of the server's
admin API, sending KTO_ADMIN_TOKEN as the bearer credential (the server's token, or an admin's
API key or JWT), to http://KTO_HOST:KTO_PORT."""

from __future__ import annotations

import json
import sys
from urllib.parse import quote


def add_commands(sub, common) -> None:
    """The admin commands' parsers (`adapters`, `users`, `keys`, `annotations`), under `sub`."""
    adapters = sub.add_parser("adapters", help="list, activate and roll back adapter versions")
    actions = adapters.add_subparsers(dest="action", required=True)
    actions.add_parser("list", parents=[common], help="versions with status, parent and metrics")
    activate = actions.add_parser("activate", parents=[common], help="make VERSION active (`base` for no adapter)")
    activate.add_argument("version")
    activate.add_argument("--reason", default="")
    rollback = actions.add_parser("rollback", parents=[common], help="go back to the previous version, or to VERSION")
    rollback.add_argument("version", nargs="?")
    rollback.add_argument("--reason", default="")
    actions.add_parser("history", parents=[common], help="every activation, rollback, canary step and erasure")
    prune = actions.add_parser("prune", parents=[common], help="delete the files of versions retention lets go")
    prune.add_argument("--dry-run", action="store_true", help="only say which versions would go, and why others stay")
    prune.add_argument("--reason", default="")
    for verb, what in (("pin", "keep VERSION's files whatever retention says"), ("unpin", "let retention decide")):
        pinning = actions.add_parser(verb, parents=[common], help=what)
        pinning.add_argument("version")
        pinning.add_argument("--reason", default="")
    show = actions.add_parser("show", parents=[common], help="VERSION's lineage, flags, history, responses and votes")
    show.add_argument("version")
    canary = actions.add_parser("canary", help="a new version for a share of users first: show, start, decide")
    steps = canary.add_subparsers(dest="step", required=True)
    steps.add_parser("show", parents=[common], help="the running canary, its latest evidence, the last decision")
    start = steps.add_parser("start", parents=[common], help="route a share of users to VERSION")
    start.add_argument("version")
    start.add_argument("--share", type=float, default=0.2, help="fraction of users, in (0, 1] (default 0.2)")
    start.add_argument("--reason", default="")
    for step, what in (
        ("promote", "make the candidate active"),
        ("rollback", "reject the candidate forever"),
        ("pause", "route nobody to the candidate; no automatic decision"),
        ("resume", "undo pause"),
    ):
        decide = steps.add_parser(step, parents=[common], help=what)
        decide.add_argument("--version", help="only if the canary is of this version (default: whatever runs)")
        decide.add_argument("--reason", default="")
    users = sub.add_parser("users", help="erase a user's data on request")
    user_actions = users.add_subparsers(dest="action", required=True)
    erase = user_actions.add_parser("erase", parents=[common], help="erase USER everywhere it is kept (keys too)")
    erase.add_argument("user")
    erase.add_argument("--reason", default="", help="recorded in the history (e.g. the ticket)")
    keys = sub.add_parser("keys", help="API keys of a user (KTO_AUTH=api-key): create, list, revoke")
    key_actions = keys.add_subparsers(dest="action", required=True)
    create = key_actions.add_parser("create", parents=[common], help="issue a key to USER; printed once, never again")
    create.add_argument("user")
    create.add_argument("--role", choices=["user", "annotator", "admin"], default="user")
    create.add_argument("--name", default="", help="a label for the key, shown in lists")
    listing = key_actions.add_parser("list", parents=[common], help="USER's live keys (never the keys themselves)")
    listing.add_argument("user")
    revoke = key_actions.add_parser("revoke", parents=[common], help="revoke USER's key KEY_ID on every replica")
    revoke.add_argument("user")
    revoke.add_argument("key_id")
    annotating = sub.add_parser("annotations", help="the annotation queue: agreement, strategy and guidelines")
    annotation_actions = annotating.add_subparsers(dest="action", required=True)
    annotation_actions.add_parser(
        "agreement", parents=[common], help="Krippendorff's alpha of the annotators, overall and each"
    )
    config = annotation_actions.add_parser(
        "config", parents=[common], help="the strategy and guidelines in force; set either with the options"
    )
    config.add_argument("--strategy", choices=["uniform", "newest", "canary", "uncertain"])
    config.add_argument("--guidelines", help="the text annotators are shown")


def run(settings, args) -> int:
    import httpx

    if settings.admin_token is None:
        sys.stderr.write("kto-loop: set KTO_ADMIN_TOKEN to an admin credential (the server's token or an admin key)\n")
        return 2
    base = f"http://{settings.host}:{settings.port}"
    headers = {"Authorization": f"Bearer {settings.admin_token.get_secret_value()}"}
    with httpx.Client(headers=headers, timeout=30) as client:
        try:
            reply = _request(client, base, args)
        except httpx.HTTPError as exc:
            sys.stderr.write(f"kto-loop: cannot reach the server at {base}: {exc}\n")
            return 1
    if reply.is_error:
        message = (
            reply.json().get("error", {}).get("message", reply.text)
            if reply.headers.get("content-type", "").startswith("application/json")
            else reply.text
        )
        sys.stderr.write(f"kto-loop: {reply.status_code}: {message}\n")
        return 1
    print(_render(args.command, args.action, reply))
    return 0


def _request(client, base: str, args):
    if args.command == "annotations":
        if args.action == "agreement":
            return client.get(f"{base}/v1/annotations/agreement")
        changes = {k: v for k, v in (("strategy", args.strategy), ("guidelines", args.guidelines)) if v is not None}
        if changes:
            return client.put(f"{base}/v1/annotations/config", json=changes)
        return client.get(f"{base}/v1/annotations/config")
    if args.command == "users":
        return client.delete(f"{base}/v1/users/{quote(args.user, safe='')}", params={"reason": args.reason})
    if args.command == "keys":
        keys = f"{base}/v1/users/{quote(args.user, safe='')}/keys"
        if args.action == "create":
            return client.post(keys, json={"role": args.role, "name": args.name})
        if args.action == "list":
            return client.get(keys)
        return client.delete(f"{keys}/{quote(args.key_id, safe='')}")
    url = f"{base}/v1/adapters"
    if args.action == "list":
        return client.get(url)
    if args.action == "history":
        return client.get(f"{url}/history")
    if args.action == "show":
        return client.get(f"{url}/{args.version}")
    if args.action == "activate":
        return client.post(f"{url}/{args.version}/activate", json={"reason": args.reason})
    if args.action == "canary":
        return _canary_request(client, f"{url}/canary", args)
    if args.action == "prune":
        return client.post(f"{url}/prune", json={"dry_run": args.dry_run, "reason": args.reason})
    if args.action == "pin":
        return client.put(f"{url}/{args.version}/pin", json={"reason": args.reason})
    if args.action == "unpin":
        return client.delete(f"{url}/{args.version}/pin")
    return client.post(f"{url}/rollback", json={"to": args.version, "reason": args.reason})


def _canary_request(client, url: str, args):
    if args.step == "show":
        return client.get(url)
    if args.step == "start":
        return client.post(url, json={"version": args.version, "share": args.share, "reason": args.reason})
    return client.post(f"{url}/{args.step}", json={"version": args.version, "reason": args.reason})


def _render(command: str, action: str, reply) -> str:
    if command == "keys":
        return _render_keys(action, reply)
    if command == "annotations":
        return _render_agreement(reply.json()) if action == "agreement" else json.dumps(reply.json(), indent=2)
    body = reply.json()
    if action == "list":
        rows = [f"active: {body['active'] or 'base'}   serving here: {body['serving'] or 'base'}"]
        for v in body["versions"]:
            mark = "*" if v["version"] == body["active"] else " "
            rows.append(
                f"{mark} {v['version']:<8} {v['status']:<9} parent={v['parent'] or 'base':<8} "
                f"metrics={json.dumps(v['metrics'], sort_keys=True)}"
            )
        return "\n".join(rows)
    if action == "history":
        return "\n".join(_entry(e) for e in body["history"])
    if action == "canary":
        return _render_canary(body)
    if action == "prune":
        return _render_prune(body)
    if action in ("pin", "unpin"):
        return f"{body['version']} {'pinned' if body['pinned'] else 'unpinned'}" + ("" if body["entry"] else " already")
    if action in ("show", "erase"):
        return json.dumps(body, indent=2)
    return f"active: {body['active'] or 'base'} (serving here: {body['serving'] or 'base'})"


def _entry(e: dict) -> str:
    if e["action"] in ("activate", "rollback", "canary_promote"):
        move = f"{e['previous'] or 'base'} -> {e['version'] or 'base'}"
    elif e["action"] == "prune":
        move = f"{e['version']} files deleted ({e['evidence']['bytes']} bytes)"
    elif e["action"] == "erasure":
        move = f"{e['evidence']['request_id']} flagged {', '.join(e['evidence']['flagged_versions']) or 'nothing'}"
    else:  # a canary step: the pointer stayed on `previous`
        move = f"{e['version']} (active {e['previous'] or 'base'})"
    return f"{e['seq']:>4} {e['action']:<15} {move} by {e['actor']}: {e['reason']}"


def _render_prune(body: dict) -> str:
    verb = "would prune" if body["dry_run"] else "pruned"
    rows = [f"{verb}: {', '.join(body['pruned']) or 'nothing'} ({body['freed_bytes']} bytes)"]
    rows += [f"kept {version}: {why}" for version, why in body["kept"].items()]
    rows.append(f"on disk: {body['on_disk']['versions']} versions, {body['on_disk']['bytes']} bytes")
    return "\n".join(rows)


def _render_canary(body: dict) -> str:
    rows = [f"active: {body['active'] or 'base'}"]
    canary = body.get("canary")
    if canary is None:
        rows.append("canary: none running")
    else:
        rows.append(
            f"canary: {canary['version']} for {canary['share']:.0%} of users against "
            f"{canary['baseline'] or 'base'}{' (PAUSED)' if canary['paused'] else ''}, started by "
            f"{canary['actor']}"
        )
        if len(canary.get("versions") or ()) > 1:
            rows.append("lineage: " + " -> ".join(canary["versions"]))
        evidence = canary.get("evidence")
        if evidence:
            c, b = evidence["candidate"], evidence["baseline"]
            low, high = evidence["interval"]
            rows.append(
                f"evidence: candidate {c['desirable']}/{c['n']} desirable, baseline {b['desirable']}/{b['n']}; "
                f"difference in [{low:+.3f}, {high:+.3f}] (alpha {evidence['alpha']}, margin "
                f"{evidence['margin']}): {evidence['decision']}"
            )
        else:
            rows.append("evidence: none reported yet")
    last = body.get("last") or body.get("entry")
    if last:
        rows.append("last: " + _entry(last).strip())
    return "\n".join(rows)


def _render_keys(action: str, reply) -> str:
    if action == "revoke":
        return "revoked"
    if action == "create":
        key = reply.json()
        return f"{key['key']}\n(key {key['id']} for {key['user']}, role {key['role']}: shown once, keep it now)"
    keys = reply.json()["keys"]
    return (
        "\n".join(f"{k['id']}  {k['role']:<9} {k['name'] or '-':<16} by {k['created_by']}" for k in keys) or "no keys"
    )


def _render_agreement(body: dict) -> str:
    def line(who: str, a: dict) -> str:
        alpha = "undefined" if a["krippendorff_alpha"] is None else f"{a['krippendorff_alpha']:+.3f}"
        observed = "-" if a["observed_agreement"] is None else f"{a['observed_agreement']:.0%}"
        return f"{who:<20} alpha {alpha:<9} on {a['items']:>5} shared answers, pairs agreeing {observed}"

    rows = [line("all annotators", body["overall"])]
    rows += [line(who, a) for who, a in sorted(body["annotators"].items())]
    rows.append(f"{body['annotations']} annotations; {body['open_items']} answers waiting")
    return "\n".join(rows)
