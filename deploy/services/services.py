#!/usr/bin/env python3
"""The project's real services on 127.0.0.1, for integration tests and local runs without Docker:
a single-node Apache Kafka broker (KRaft, combined broker and controller, jars from Maven Central)
and a redis-server (the Debian package).

    python deploy/services/services.py start [--state-dir DIR] [--cache-dir DIR] [--owner-pid PID]
    python deploy/services/services.py env   [--state-dir DIR]
    python deploy/services/services.py stop  [--state-dir DIR]

``start`` prints, and writes to ``DIR/env``, the lines the processes read::

    KTO_BUS_URL=kafka://127.0.0.1:<port>
    KTO_REGISTRY_URL=redis://127.0.0.1:<port>/0

Rules:
- Each ``start`` picks free ports and begins with empty storage (these are throw-away services);
  if both services of DIR are already up it only prints their URLs again.
- The Kafka jars are fetched once by ``fetch-kafka.sh`` into ``CACHE/kafka-<version>/libs``.
- redis-server is installed with apt-get when missing, if we run as root (debian_packages.py); so is Debian's
  `prometheus` package (prometheus and promtool) by ``ensure_prometheus``, for the metrics tests,
  and `chromium-driver` (with chromium) by ``ensure_chromium``, for the chat page's browser tests.
- ``--owner-pid``: a small watcher stops both services when that process is gone, so a test run
  that is killed does not leave a broker behind.
- ``stop`` ends the processes named by the pid files, after checking that they are still ours.

Standard library only, so that it runs before anything is installed.
"""

from __future__ import annotations

import argparse
import base64
import logging
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # a script: its sibling module, however it is run
from debian_packages import ensure_chromium, ensure_prometheus, ensure_redis_server  # noqa: F401 (tests use all three)

logger = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
DEFAULT_CACHE = Path.home() / ".cache" / "kto-loop"
READY_DEADLINE_S = 90.0

LOG4J2 = """\
status = warn
appender.file.type = File
appender.file.name = file
appender.file.fileName = {log}
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = WARN
rootLogger.appenderRef.file.ref = file
# INFO for the server lifecycle only ("Kafka Server started", shutdown), WARN for the rest.
logger.server.name = kafka.server.KafkaRaftServer
logger.server.level = INFO
"""


def kafka_version() -> str:
    import xml.etree.ElementTree as ET

    ns = {"m": "http://maven.apache.org/POM/4.0.0"}
    version = ET.parse(HERE / "pom.xml").getroot().findtext("m:properties/m:kafka.version", namespaces=ns)
    if not version:
        raise SystemExit(f"no kafka.version in {HERE / 'pom.xml'}")
    return version.strip()


def ensure_kafka_libs(cache: Path) -> Path:
    libs = cache / f"kafka-{kafka_version()}" / "libs"
    if not (libs / ".complete").is_file():
        # Maven's console output goes to our stderr; the script prints the folder on stdout.
        subprocess.run(["bash", str(HERE / "fetch-kafka.sh"), str(cache)], check=True, stdout=subprocess.DEVNULL)
    return libs


def free_ports(n: int) -> list[int]:
    # All sockets stay bound until every port is chosen, so the n ports are distinct.
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def kafka_properties(data: Path, broker_port: int, controller_port: int) -> str:
    settings = {
        "process.roles": "broker,controller",
        "node.id": "1",
        "controller.quorum.voters": f"1@127.0.0.1:{controller_port}",
        "listeners": f"PLAINTEXT://127.0.0.1:{broker_port},CONTROLLER://127.0.0.1:{controller_port}",
        "advertised.listeners": f"PLAINTEXT://127.0.0.1:{broker_port}",
        "controller.listener.names": "CONTROLLER",
        "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
        "inter.broker.listener.name": "PLAINTEXT",
        "log.dirs": str(data),
        # One node: every internal topic with one replica; one partition starts faster.
        "offsets.topic.replication.factor": "1",
        "offsets.topic.num.partitions": "1",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "transaction.state.log.num.partitions": "1",
        "share.coordinator.state.topic.replication.factor": "1",
        "share.coordinator.state.topic.min.isr": "1",
        "default.replication.factor": "1",
        "min.insync.replicas": "1",
        "num.partitions": "1",
        # Tests: no 3 s wait before a new group's first assignment; allow short session timeouts.
        "group.initial.rebalance.delay.ms": "0",
        "group.min.session.timeout.ms": "1000",
        # Topics are created explicitly (the bus does it), never by a stray metadata request.
        "auto.create.topics.enable": "false",
        # Fewer threads: test machines have two cores.
        "num.network.threads": "2",
        "num.io.threads": "2",
        "background.threads": "2",
        "num.recovery.threads.per.data.dir": "1",
    }
    return "".join(f"{k}={v}\n" for k, v in settings.items())


def _send(sock: socket.socket, api_key: int, version: int, body: bytes) -> bytes:
    client = b"kto-loop-services"
    header = struct.pack(">hhih", api_key, version, 7, len(client)) + client
    request = header + body
    sock.sendall(struct.pack(">i", len(request)) + request)
    size = struct.unpack(">i", _recv(sock, 4))[0]
    return _recv(sock, size)[4:]  # drop the correlation id


def _recv(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("connection closed")
        data += chunk
    return data


def kafka_metadata_ok(port: int) -> bool:
    """True if the broker answers a Metadata request listing itself and a controller.

    Hand-made requests (ApiVersions v0, then Metadata v4-v7: fixed-width encodings) because
    this script cannot rely on kafka-python being installed yet.
    """
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=3.0) as sock:
            resp = _send(sock, 18, 0, b"")
            error, count = struct.unpack_from(">hi", resp, 0)
            ranges = {k: (lo, hi) for k, lo, hi in (struct.unpack_from(">hhh", resp, 6 + 6 * i) for i in range(count))}
            lo, hi = ranges.get(3, (99, -1))
            if error or max(lo, 4) > min(hi, 7):
                return False
            resp = _send(sock, 3, min(hi, 7), struct.pack(">ib", -1, 0))  # all topics, no auto-create
            pos = 4  # throttle_time_ms
            (brokers,) = struct.unpack_from(">i", resp, pos)
            pos += 4
            for _ in range(brokers):
                pos += 4  # node_id
                (host_len,) = struct.unpack_from(">h", resp, pos)
                pos += 2 + host_len + 4  # host, port
                (rack_len,) = struct.unpack_from(">h", resp, pos)
                pos += 2 + max(rack_len, 0)
            (cluster_len,) = struct.unpack_from(">h", resp, pos)
            pos += 2 + max(cluster_len, 0)
            (controller,) = struct.unpack_from(">i", resp, pos)
            return brokers >= 1 and controller >= 0
    except (OSError, struct.error):
        return False


def redis_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2.0) as sock:
            sock.sendall(b"*1\r\n$4\r\nPING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"({path} missing)"


def _ours(pid_file: Path, marker: str) -> int | None:
    """The pid in ``pid_file`` if that process is alive and its command line contains ``marker``."""
    try:
        pid = int(pid_file.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except (OSError, ValueError):
        return None
    return pid if marker in cmdline else None


def start_kafka(state: Path, libs: Path, port: int, controller_port: int, java: str, *, fresh: bool = True) -> None:
    """Start the broker of ``state``; ``fresh=False`` restarts it on the data of its last run."""
    kdir = state / "kafka"
    props = kdir / "server.properties"
    log4j = kdir / "log4j2.properties"
    classpath = f"{libs}/*"
    jvm = [
        java,
        "-Xms256m",
        "-Xmx512m",
        "-XX:+UseSerialGC",
        "-XX:TieredStopAtLevel=1",
        "-XX:+ExitOnOutOfMemoryError",
        "-Djava.awt.headless=true",
        f"-Dlog4j2.configurationFile={log4j}",
    ]
    if fresh or not props.is_file():
        shutil.rmtree(kdir, ignore_errors=True)
        (kdir / "data").mkdir(parents=True)
        props.write_text(kafka_properties(kdir / "data", port, controller_port))
        log4j.write_text(LOG4J2.format(log=kdir / "kafka.log"))
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        fmt = subprocess.run(
            [*jvm, "-cp", classpath, "kafka.tools.StorageTool", "format", "-t", cluster_id, "-c", str(props)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if fmt.returncode != 0:
            raise SystemExit(f"formatting Kafka storage failed:\n{fmt.stdout}{fmt.stderr}")
    with open(kdir / "kafka.out", "wb") as out:
        # A session of its own: Ctrl-C in the terminal that ran `make services` leaves it running.
        proc = subprocess.Popen(
            [*jvm, "-cp", classpath, "kafka.Kafka", str(props)],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    (kdir / "kafka.pid").write_text(f"{proc.pid}\n")
    deadline = time.monotonic() + READY_DEADLINE_S
    while not kafka_metadata_ok(port):
        if proc.poll() is not None or time.monotonic() > deadline:
            if proc.poll() is None:
                proc.kill()
            why = f"exited with {proc.returncode}" if proc.returncode is not None else "was not ready in time"
            raise SystemExit(
                f"the Kafka broker {why}\n--- {kdir / 'kafka.out'}\n{_tail(kdir / 'kafka.out')}"
                f"\n--- {kdir / 'kafka.log'}\n{_tail(kdir / 'kafka.log')}"
            )
        time.sleep(0.25)


def start_redis(state: Path, port: int, binary: str, *, fresh: bool = True, persistent: bool = False) -> None:
    """Start the redis-server of ``state``; ``fresh=False`` keeps its folder (with ``persistent``,
    its append-only file, so a restart comes back with the data, as production Redis does)."""
    rdir = state / "redis"
    if fresh:
        shutil.rmtree(rdir, ignore_errors=True)
    rdir.mkdir(parents=True, exist_ok=True)
    # Throw-away and fast by default: no snapshots, no append-only file.
    subprocess.run(
        [
            binary,
            "--bind",
            "127.0.0.1",
            "--port",
            str(port),
            "--save",
            "",
            "--appendonly",
            "yes" if persistent else "no",
            "--appendfsync",
            "always",
            "--daemonize",
            "yes",
            "--dir",
            str(rdir),
            "--pidfile",
            str(rdir / "redis.pid"),
            "--logfile",
            str(rdir / "redis.log"),
        ],
        check=True,
        stdin=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 20.0
    while not redis_ping(port):
        if time.monotonic() > deadline:
            raise SystemExit(f"redis-server did not answer PING\n{_tail(rdir / 'redis.log')}")
        time.sleep(0.05)


def running(state: Path) -> bool:
    return bool(
        _ours(state / "kafka" / "kafka.pid", "kafka.Kafka")
        and _ours(state / "redis" / "redis.pid", "redis-server")
        and (state / "env").is_file()
    )


def start(state: Path, cache: Path, owner_pid: int | None) -> str:
    if running(state):
        logger.info("services of %s are already running", state)
        return (state / "env").read_text()
    stop(state)  # whatever half of a previous start is left
    state.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    libs = ensure_kafka_libs(cache)
    redis_binary = ensure_redis_server()
    java = shutil.which("java")
    if not java:
        raise SystemExit("java not found: Kafka 4 needs Java 17 or newer")
    for attempt in range(3):
        kafka_port, controller_port, redis_port = free_ports(3)
        try:
            start_redis(state, redis_port, redis_binary)
            start_kafka(state, libs, kafka_port, controller_port, java)
            break
        except SystemExit as exc:
            stop(state)
            # Another process may take a port between our pick and the server's bind: pick again.
            if attempt == 2 or "Address already in use" not in str(exc):
                raise
            logger.warning("a port was taken meanwhile; trying other ports")
        except BaseException:
            stop(state)
            raise
    env = f"KTO_BUS_URL=kafka://127.0.0.1:{kafka_port}\nKTO_REGISTRY_URL=redis://127.0.0.1:{redis_port}/0\n"
    (state / "env").write_text(env)
    if owner_pid:
        subprocess.Popen(
            [
                sys.executable,
                str(Path(__file__).resolve()),
                "_watch",
                "--state-dir",
                str(state),
                "--owner-pid",
                str(owner_pid),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=open(state / "watch.log", "ab"),  # noqa: SIM115 - the detached watcher owns it
            start_new_session=True,
        )
    logger.info("services up in %.1f s (state in %s)", time.monotonic() - began, state)
    return env


def _terminate(pid_file: Path, marker: str, grace_s: float) -> None:
    pid = _ours(pid_file, marker)
    if pid is not None:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while _ours(pid_file, marker) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _ours(pid_file, marker):
            logger.warning("%s (pid %d) ignored SIGTERM for %.0f s; killing it", marker, pid, grace_s)
            os.kill(pid, signal.SIGKILL)
        logger.info("stopped %s (pid %d)", marker, pid)
    pid_file.unlink(missing_ok=True)


def stop(state: Path) -> None:
    # Kafka's controlled shutdown of a single node takes a few seconds; its data is thrown away.
    _terminate(state / "kafka" / "kafka.pid", "kafka.Kafka", grace_s=20.0)
    _terminate(state / "redis" / "redis.pid", "redis-server", grace_s=10.0)
    (state / "env").unlink(missing_ok=True)


def watch(state: Path, owner_pid: int) -> None:
    """Stop the services once ``owner_pid`` is gone; return early if they were stopped already."""
    while _ours(state / "kafka" / "kafka.pid", "kafka.Kafka"):
        try:
            os.kill(owner_pid, 0)
        except ProcessLookupError:
            logger.info("owner %d is gone; stopping the services of %s", owner_pid, state)
            stop(state)
            return
        except PermissionError:
            pass  # alive, owned by another user
        time.sleep(1.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["start", "stop", "env", "_watch"])
    parser.add_argument("--name", default="default", help="services name, for the default state dir")
    parser.add_argument("--state-dir", type=Path, help="default: CACHE/services/NAME")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help="default: ~/.cache/kto-loop")
    parser.add_argument("--owner-pid", type=int, help="stop the services when this process exits")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="services: %(message)s", stream=sys.stderr)
    state = (args.state_dir or args.cache_dir / "services" / args.name).resolve()
    if args.command == "start":
        sys.stdout.write(start(state, args.cache_dir.resolve(), args.owner_pid))
    elif args.command == "env":
        if not running(state):
            logger.error("no services running for %s (run `make services`)", state)
            return 1
        sys.stdout.write((state / "env").read_text())
    elif args.command == "stop":
        stop(state)
    else:
        watch(state, args.owner_pid)
    return 0


if __name__ == "__main__":
    sys.exit(main())
