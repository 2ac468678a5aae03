"""`kto-loop`: one command for the whole loop.

    kto-loop serve        the inference server (chat, feedback, admin, metrics)
    kto-loop learn        the KTO learner: events in, adapter versions out (--port: its /metrics)
    kto-loop label        the rule labeler: the operator's rules' labels on served answers
    kto-loop up           serve + learn + label on the embedded default: what `make run` starts
    kto-loop simulate     users who chat and rate by rules (thumbs or signals), with a learning curve
    kto-loop adapters …   list | show VERSION | activate VERSION | rollback [VERSION] | history
                          | prune [--dry-run] | pin VERSION | unpin VERSION
                          | canary show | start VERSION | promote | rollback | pause | resume,
                          against a running server
    kto-loop users erase USER   erase a user's data (ledger, keys, learner buffer; flags versions)
    kto-loop keys …       create USER [--role R] | list USER | revoke USER KEY_ID (KTO_AUTH=api-key)
    kto-loop annotations agreement | config [--strategy S] [--guidelines TEXT]   the annotation queue
    kto-loop bus delete-group GROUP   forget a consumer group of the embedded bus that is gone

Options on the command line override `KTO_*` environment variables.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pydantic import ValidationError

from kto_loop import admin_client

logger = logging.getLogger(__name__)


def _common(port_help: str = "TCP port (default 8000)") -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--host", help="address to listen on / talk to (default 127.0.0.1)")
    common.add_argument("--port", type=int, help=port_help)
    common.add_argument("--data-dir", help="where every embedded file lives (default ./data)")
    common.add_argument("--model", help="base model: a local directory or a hub id (default: the offline demo model)")
    common.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return common


def build_parser() -> argparse.ArgumentParser:
    common = _common()  # on every leaf command, so options may follow the last word
    parser = argparse.ArgumentParser(prog="kto-loop", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", parents=[common], help="run the inference server")
    sub.add_parser(
        "learn",
        parents=[_common("serve /metrics and /healthz on this TCP port (default: none; KTO_METRICS_PORT)")],
        help="run the KTO learner",
    )
    sub.add_parser(
        "label",
        parents=[_common("serve /metrics on this TCP port (default: none; KTO_METRICS_PORT)")],
        help="label served answers by the operator's rules (KTO_RULES_PATH, PUT /v1/rules)",
    )
    sub.add_parser(
        "up", parents=[common], help="serve + learn + label on the embedded default (what `make run` starts)"
    )
    sim = sub.add_parser("simulate", parents=[common], help="simulated users who chat and rate by rules")
    sim.add_argument("--ratings", type=int, default=600, help="stop after this many ratings")
    sim.add_argument("--users", type=int, default=60, help="simulated users, each chatting in turn")
    sim.add_argument(
        "--rule",
        action="append",
        dest="rules",
        metavar="KIND:ARG",
        help="what users like: prefix:aeiou (starts with one of these characters; prefix:Hi,Yes for "
        "strings), avoid:WORD (does not contain it), shorter-than:N (characters); repeat to "
        "require several (default prefix:aeiou)",
    )
    sim.add_argument("--flip", type=float, default=0.0, help="share of labels sent inverted (noisy raters)")
    sim.add_argument(
        "--rate-liked",
        type=float,
        default=1.0,
        help="chance that a liked answer is rated at all (disliked ones always are)",
    )
    sim.add_argument(
        "--feedback",
        choices=["thumbs", "implicit"],
        default="thumbs",
        help="how users say what they think: thumbs (default), or implicit: never a thumb; they "
        "regenerate an answer they dislike (and ask the same prompt again) and copy one they like",
    )
    sim.add_argument(
        "--copy-liked",
        type=float,
        default=1.0,
        help="with --feedback implicit: chance that a liked answer is copied (default 1, as --rate-liked)",
    )
    sim.add_argument(
        "--think-time",
        type=float,
        default=8.0,
        help="seconds each user reads before the next turn (times a random 0.5-1.5; default 8, "
        "about 7 ratings/s from 60 users); 0: back to back, faster than the learner can follow",
    )
    sim.add_argument("--seed", type=int, default=None, help="seed the users' choices and the answers' sampling")
    sim.add_argument("--max-tokens", type=int, default=8)
    sim.add_argument("--plot", default=None, help="PNG learning curve (default <data-dir>/learning-curve.png)")
    sim.add_argument(
        "--url",
        action="append",
        dest="urls",
        metavar="URL",
        help="a server to chat with (repeat for replicas; default http://HOST:PORT from the settings)",
    )
    admin_client.add_commands(sub, common)
    bus = sub.add_parser("bus", help="the embedded event log (on Kafka: kafka-consumer-groups)")
    bus_actions = bus.add_subparsers(dest="action", required=True)
    forget = bus_actions.add_parser(
        "delete-group",
        parents=[common],
        help="forget consumer group GROUP, gone for good, so it holds back no retention",
    )
    forget.add_argument("group")
    return parser


def _overrides(args: argparse.Namespace) -> dict:
    # The learner's --port is its metrics endpoint's, a setting of its own (not the server's KTO_PORT).
    port = "metrics_port" if args.command in ("learn", "label") else "port"
    names = {"host": "host", "port": port, "data_dir": "data_dir", "model": "model"}
    return {field: getattr(args, arg) for arg, field in names.items() if getattr(args, arg, None) is not None}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from labelers.labeler import LabelerSettings
    from learner.settings import LearnerSettings
    from serve.settings import ServeSettings

    kind = {"learn": LearnerSettings, "label": LabelerSettings}.get(args.command, ServeSettings)
    try:
        settings = kind(**_overrides(args))
    except ValidationError as exc:
        for error in exc.errors():
            where = ".".join(str(p) for p in error["loc"]) or "settings"
            sys.stderr.write(f"kto-loop: invalid setting {where} (KTO_{where.upper()}): {error['msg']}\n")
        return 2
    if args.command in ("serve", "up"):
        from serve.auth import UnsafeExposure, refuse_unsafe_exposure

        try:
            refuse_unsafe_exposure(settings)  # before anything starts, children included
        except UnsafeExposure as exc:
            sys.stderr.write(f"kto-loop: {exc}\n")
            return 2
    if args.command == "learn":
        return _learn(settings)
    if args.command == "label":
        return _label(settings)
    if args.command == "serve":
        return _serve(settings, args.log_level)
    if args.command == "up":
        return _up(settings, argv if argv is not None else sys.argv[1:], args.log_level)
    if args.command == "simulate":
        return _simulate(settings, args)
    if args.command == "bus":
        return _delete_group(settings, args.group)
    return admin_client.run(settings, args)


def _delete_group(settings, group: str) -> int:
    """The embedded bus's `kafka-consumer-groups --delete`: on the bus file itself, no server needed."""
    from ingest.bus import open_bus
    from ingest.sqlite_bus import SqliteBus

    bus = open_bus(settings.bus_url)
    try:
        if not isinstance(bus, SqliteBus):
            sys.stderr.write("kto-loop: the bus is Kafka: kafka-consumer-groups --delete --group " + group + "\n")
            return 2
        try:
            deleted = bus.delete_group(group)
        except ValueError as exc:  # a member is alive: stop it first
            sys.stderr.write(f"kto-loop: {exc}\n")
            return 1
    finally:
        bus.close()
    print(f"deleted group {group}" if deleted else f"no group {group}")
    return 0


def _learn(settings) -> int:
    """Exit 2 with one line on what a restart cannot fix (kto_loop.supervisor does not retry it),
    1 with one line on a disk full at start-up (a restart once space is freed goes on)."""
    from foundation.disk import is_disk_full
    from foundation.sqlite import NewerLayout
    from learner.loop import CannotStart
    from learner.loop import main as learn

    try:
        learn(settings)
    except Exception as exc:
        newer = _cause(exc, NewerLayout)
        if isinstance(exc, CannotStart) or newer is not None:
            sys.stderr.write(f"kto-loop: {newer or exc}; a restart cannot fix this\n")
            return 2
        if is_disk_full(exc):
            sys.stderr.write(f"kto-loop: the disk is full ({exc}); start the learner again once space is freed\n")
            return 1
        raise
    return 0


def _cause(exc: BaseException | None, kind: type[BaseException]) -> BaseException | None:
    """The first exception of `kind` in `exc`'s cause/context chain."""
    while exc is not None and not isinstance(exc, kind):
        exc = exc.__cause__ or exc.__context__
    return exc


def _label(settings) -> int:
    from labelers.labeler import run_labeler
    from labelers.plugins import PluginError
    from labelers.rules import RulesFileError

    try:
        run_labeler(settings)
    except (RulesFileError, PluginError) as exc:
        sys.stderr.write(f"kto-loop: {exc}\n")
        return 2
    return 0


def _up(settings, argv: list[str], log_level: str) -> int:
    """The learner and the labeler as child processes (training must not steal the server's GIL),
    restarted when they die (kto_loop.supervisor) and reported in /readyz and /metrics; serve here.

    Unless KTO_TORCH_THREADS says otherwise, the cores are split between the two: each starting
    one torch thread per core made updates 40x slower on a busy 2-core machine (bench/learner.py).
    """
    import os
    import signal

    from kto_loop.supervisor import Supervisor

    if settings.torch_threads is None:
        settings.torch_threads = max(1, (os.cpu_count() or 2) // 2)
    env = {**os.environ, "KTO_TORCH_THREADS": str(settings.torch_threads)}

    from foundation.models import ensure_demo_model

    if settings.model is None:
        ensure_demo_model(settings.data_dir)  # once, before two processes would both build it
    learner_args = _without_port([a if a != "up" else "learn" for a in argv])  # --port is the server's
    labeler_args = [a if a != "learn" else "label" for a in learner_args]
    # uvicorn shuts down on SIGTERM, then raises it again: leave through the `finally` below, which
    # stops the children, rather than die at once and leave them running.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    children = Supervisor()
    learner = children.start("learner", [sys.executable, "-m", "kto_loop.cli", *learner_args], env)
    # KTO_METRICS_PORT is the learner's under `up`; two processes cannot listen on it.
    labeler_env = {k: v for k, v in env.items() if k != "KTO_METRICS_PORT"}
    labeler = children.start("labeler", [sys.executable, "-m", "kto_loop.cli", *labeler_args], labeler_env)
    logger.info(
        "learner (pid %d) and labeler (pid %d) started; chat in a browser at http://%s:%d/ (API under /v1)",
        learner,
        labeler,
        settings.host,
        settings.port,
    )
    try:
        return _serve(settings, log_level, processes=children.status)
    finally:
        children.stop()


def _without_port(argv: list[str]) -> list[str]:
    """argv less `--port N` / `--port=N` (the learner's metrics port comes from KTO_METRICS_PORT under `up`)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--port":
            skip = True
        elif not arg.startswith("--port="):
            out.append(arg)
    return out


def _simulate(settings, args) -> int:
    from kto_loop.curve import plot
    from kto_loop.simulate import Raters, parse_rule, simulate, two_proportion_p

    if args.log_level != "debug":  # one line per request only when asked for
        for noisy in ("httpx", "httpcore"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        raters = Raters(
            tuple(parse_rule(r) for r in args.rules or ["prefix:aeiou"]),
            flip=args.flip,
            rate_liked=args.rate_liked,
            feedback=args.feedback,
            copy_liked=args.copy_liked,
        )
    except ValueError as exc:
        sys.stderr.write(f"kto-loop: {exc}\n")
        return 2
    urls = args.urls or [f"http://{settings.host}:{settings.port}"]
    logger.info(
        "%d users liking %s, %s",
        args.users,
        raters,
        f"{args.think_time:g} s between turns" if args.think_time else "back to back",
    )
    result = simulate(
        urls,
        ratings=args.ratings,
        users=args.users,
        raters=raters,
        max_tokens=args.max_tokens,
        think_time=args.think_time,
        seed=args.seed,
    )
    for version, (n, rate) in result.rate_by_version().items():
        print(f"{version:<24} n={n:<5} desirable={rate:.3f}")
    if raters.feedback == "implicit":
        signals = [t.signal for t in result.ratings]
        print(f"signals: {signals.count('regenerate')} regenerate, {signals.count('copy')} copy, no thumbs")
    turns, k = result.turns, min(100, len(result.turns) // 2)
    if k:
        first, last = sum(t.liked for t in turns[:k]), sum(t.liked for t in turns[-k:])
        print(
            f"liked: first {k} answers {first / k:.2f}, last {k} {last / k:.2f} "
            f"({(last - first) / k:+.2f}, one-sided p {two_proportion_p(first, k, last, k):.2g})"
        )
    if result.errors:
        print(f"{len(result.errors)} requests failed, e.g. {result.errors[0]}")
    path = plot(result, Path(args.plot) if args.plot else settings.data_dir / "learning-curve.png")
    print(f"learning curve: {path}")
    return 0


def _serve(settings, log_level: str = "info", processes=None) -> int:
    """``processes``: what `up` runs beside the server, for /readyz and /metrics (serve.processes)."""
    import uvicorn

    from foundation.models import ModelRefused
    from serve.app import check_servable, create_app, server_config

    try:
        check_servable(settings)
    except ModelRefused as exc:  # kto_loop.supervisor does not retry status 2
        sys.stderr.write(f"kto-loop: {exc}; a restart cannot fix this\n")
        return 2
    app = create_app(settings, processes=processes)
    uvicorn.Server(server_config(settings, app, log_level=log_level)).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
