"""The deployment files, checked without a Docker engine.

Every compose file is parsed with PyYAML (merge keys resolved; `${…}` left as written) and
checked against what actually runs: the KTO_* names against the settings classes' fields, the
bind mounts against the repository, the Prometheus and nginx targets and the backend URLs
against the compose services and the ports they listen on, and the Dockerfile against what the
compose files assume of the image.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path, PurePosixPath

import pytest
import yaml

from labelers.labeler import LabelerSettings
from learner.settings import LearnerSettings
from serve.settings import ServeSettings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DOCKERFILE = ROOT / "Dockerfile"
PRODUCTION = DEPLOY / "docker-compose.yml"
SINGLE = DEPLOY / "docker-compose.single.yml"
GPU = DEPLOY / "docker-compose.gpu.yml"

# `kto-loop <command>` -> the settings classes of the processes it starts.
SETTINGS_OF = {
    "serve": (ServeSettings,),
    "learn": (LearnerSettings,),
    "label": (LabelerSettings,),
    "up": (ServeSettings, LearnerSettings, LabelerSettings),
}


# ---- reading the files ----


def load_yaml(path: Path):
    return yaml.safe_load(path.read_text())


def merge(base, override):
    """Compose's merge of a later -f file over an earlier one, for mappings (all we use)."""
    if isinstance(base, dict) and isinstance(override, dict):
        out = dict(base)
        for key, value in override.items():
            out[key] = merge(base[key], value) if key in base else value
        return out
    return override


# (name, compose document, the folder its relative paths are resolved from)
COMPOSES = {
    "production": (lambda: load_yaml(PRODUCTION), PRODUCTION.parent),
    "single": (lambda: load_yaml(SINGLE), SINGLE.parent),
    "production+gpu": (lambda: merge(load_yaml(PRODUCTION), load_yaml(GPU)), PRODUCTION.parent),
}


@pytest.fixture(params=sorted(COMPOSES))
def compose(request):
    loader, base_dir = COMPOSES[request.param]
    return loader(), base_dir


@pytest.fixture(scope="module")
def prod() -> dict:
    return load_yaml(PRODUCTION)


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    instructions, pending = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        whole = (pending + line).strip()
        pending = ""
        word, _, rest = whole.partition(" ")
        instructions.append((word.upper(), rest.strip()))
    return instructions


def dockerfile_env() -> dict[str, str]:
    env = {}
    for word, rest in dockerfile_instructions():
        if word == "ENV":
            for item in shlex.split(rest):
                key, _, value = item.partition("=")
                env[key] = value
    return env


def dockerfile_cmd() -> list[str]:
    cmds = [rest for word, rest in dockerfile_instructions() if word == "CMD"]
    assert cmds, "the Dockerfile has no CMD"
    return json.loads(cmds[-1])


def is_kto(service: dict) -> bool:
    return "build" in service or str(service.get("image", "")).startswith("kto-loop")


def kto_command(service: dict) -> str:
    """The kto-loop subcommand a service runs (the image's CMD when it sets none)."""
    command = service.get("command", dockerfile_cmd())
    argv = shlex.split(command) if isinstance(command, str) else list(command)
    assert argv[0] == "kto-loop" and argv[1] in SETTINGS_OF, f"unexpected command {argv}"
    return argv[1]


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {key: "" if value is None else str(value) for key, value in env.items()}


def field_env_names(cls) -> set[str]:
    prefix = cls.model_config["env_prefix"]
    return {f"{prefix}{name}".upper() for name in cls.model_fields}


def container_port(spec) -> int:
    if isinstance(spec, dict):
        return int(spec["target"])
    return int(str(spec).split("/")[0].rsplit(":", 1)[-1])


def listening_ports(service: dict) -> set[int]:
    """Ports a service declares inside the network: `ports` (container side) and `expose`."""
    return {container_port(p) for p in service.get("ports", [])} | {int(p) for p in service.get("expose", [])}


def mounts(service: dict) -> list[tuple[str, str, str]]:
    """(kind, source, target) of each volume entry: kind is `bind` or `volume`."""
    out = []
    for entry in service.get("volumes", []):
        if isinstance(entry, dict):
            out.append((entry["type"], entry["source"], entry["target"]))
            continue
        source, target = entry.split(":")[:2]
        out.append(("bind" if source.startswith((".", "/", "~")) else "volume", source, target))
    return out


def mount_for(service: dict, path: str) -> tuple[str, str, str]:
    """The mount a container path lies on (the deepest one)."""
    candidates = [m for m in mounts(service) if PurePosixPath(path).is_relative_to(m[2])]
    assert candidates, f"{path} is on no mount of this service"
    return max(candidates, key=lambda m: len(m[2]))


def bind_source(base_dir: Path, service: dict, target: str) -> Path:
    kind, source, _ = next(m for m in mounts(service) if m[2] == target)
    assert kind == "bind", f"{target} is not bind-mounted"
    return (base_dir / source).resolve()


def host_port(url: str) -> tuple[str, int]:
    match = re.fullmatch(r"(?:[a-z]+://)?([A-Za-z0-9._-]+):(\d+)(?:/.*)?", url)
    assert match, f"no host:port in {url!r}"
    return match[1], int(match[2])


def services_running(doc: dict, subcommand: str) -> dict[str, dict]:
    return {name: s for name, s in doc["services"].items() if is_kto(s) and kto_command(s) == subcommand}


def assert_listens(doc: dict, host: str, port: int, what: str) -> None:
    assert host in doc["services"], f"{what}: {host} is not a compose service"
    ports = listening_ports(doc["services"][host])
    assert port in ports, f"{what}: {host} does not listen on {port} (declares {sorted(ports)})"


# ---- the compose files ----


def test_every_compose_file_is_covered():
    assert {p.name for p in DEPLOY.glob("docker-compose*.yml")} == {PRODUCTION.name, SINGLE.name, GPU.name}


def test_production_has_the_whole_topology(prod):
    services = prod["services"]
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert services["redis"]["image"].startswith("redis:")
    assert services["prometheus"]["image"].startswith("prom/prometheus:")
    assert services["grafana"]["image"].startswith("grafana/grafana:")
    replicas = services_running(prod, "serve")
    assert len(replicas) >= 2, f"serve replicas: {sorted(replicas)}"
    names = [environment(s).get("KTO_REPLICA") for s in replicas.values()]
    assert None not in names and len(set(names)) == len(names), f"KTO_REPLICA must be set and distinct: {names}"
    assert len(services_running(prod, "learn")) == 1
    balancers = [s for s in services.values() if str(s.get("image", "")).startswith("nginx:")]
    assert len(balancers) == 1 and balancers[0].get("ports"), "one load balancer, published on the host"


def test_kafka_is_a_kraft_node_that_advertises_its_service_name(prod):
    env = environment(prod["services"]["kafka"])
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    node, _, voter = env["KAFKA_CONTROLLER_QUORUM_VOTERS"].partition("@")
    assert node == env["KAFKA_NODE_ID"], "the node must be the quorum's voter"
    host, port = host_port(voter)
    assert host == "kafka" and f"CONTROLLER://:{port}" in env["KAFKA_LISTENERS"]
    assert "CONTROLLER" in env["KAFKA_CONTROLLER_LISTENER_NAMES"]


def test_kto_environment_names_are_settings_fields(compose):
    doc, _ = compose
    for name, service in doc["services"].items():
        used = {key for key in environment(service) if key.startswith("KTO_")}
        if not is_kto(service):
            assert not used, f"{name} is not kto-loop but sets {sorted(used)}"
            continue
        valid = set().union(*(field_env_names(cls) for cls in SETTINGS_OF[kto_command(service)]))
        assert used <= valid, f"{name} ({kto_command(service)}) sets unknown settings {sorted(used - valid)}"


def test_dockerfile_env_names_are_settings_fields():
    used = {key for key in dockerfile_env() if key.startswith("KTO_")}
    valid = field_env_names(ServeSettings) | field_env_names(LearnerSettings)
    assert used and used <= valid, f"unknown settings in the Dockerfile: {sorted(used - valid)}"


def test_mounts_exist(compose):
    doc, base_dir = compose
    declared = set(doc.get("volumes") or {})
    for name, service in doc["services"].items():
        for kind, source, _target in mounts(service):
            if kind == "bind":
                assert (base_dir / source).exists(), f"{name} mounts {source}, missing from the repository"
            else:
                assert source in declared, f"{name} mounts volume {source}, not declared under volumes:"


def test_healthy_conditions_wait_on_real_healthchecks(compose):
    doc, _ = compose
    for name, service in doc["services"].items():
        depends = service.get("depends_on") or {}
        for target, spec in depends.items() if isinstance(depends, dict) else []:
            assert target in doc["services"], f"{name} depends on unknown {target}"
            if spec.get("condition") == "service_healthy":
                check = doc["services"][target].get("healthcheck")
                assert check and not check.get("disable"), f"{name} waits for {target} healthy; it has no healthcheck"


def test_replicas_wait_for_their_backends_and_are_health_checked(prod):
    port = int(dockerfile_env()["KTO_PORT"])
    for name, service in services_running(prod, "serve").items():
        own = int(environment(service).get("KTO_PORT", port))
        assert own in listening_ports(service), f"{name} listens on {own} but declares {listening_ports(service)}"
        check = service.get("healthcheck") or {}
        test = " ".join(check.get("test", []))
        assert not check.get("disable") and re.search(rf":{own}/(readyz|healthz)\b", test), f"{name}: {check}"
        for backend in ("kafka", "redis"):
            assert service["depends_on"][backend]["condition"] == "service_healthy", f"{name} -> {backend}"


def test_learner_serves_metrics_where_it_is_scraped_and_health_checked(prod):
    """`kto-loop learn` listens on KTO_METRICS_PORT (or --port), on all interfaces, and that port
    is declared, health-checked at /healthz and scraped."""
    ((name, learner),) = services_running(prod, "learn").items()
    command = learner.get("command", dockerfile_cmd())
    argv = shlex.split(command) if isinstance(command, str) else list(command)
    port = int(argv[argv.index("--port") + 1]) if "--port" in argv else int(environment(learner)["KTO_METRICS_PORT"])
    assert port in listening_ports(learner), f"{name} listens on {port} but declares {listening_ports(learner)}"
    host = environment(learner).get("KTO_HOST", dockerfile_env().get("KTO_HOST"))
    assert host == "0.0.0.0", f"{name} listens on {host}: unreachable from Prometheus"
    check = learner.get("healthcheck") or {}
    assert not check.get("disable") and re.search(rf":{port}/healthz\b", " ".join(check.get("test", []))), check
    config = load_yaml(bind_source(DEPLOY, prod["services"]["prometheus"], "/etc/prometheus/prometheus.yml"))
    targets = {
        t for job in config["scrape_configs"] for static in job.get("static_configs", []) for t in static["targets"]
    }
    assert f"{name}:{port}" in targets, f"Prometheus does not scrape {name}:{port}: {sorted(targets)}"


def test_the_labeler_serves_metrics_where_it_is_scraped(prod):
    ((name, labeler),) = services_running(prod, "label").items()
    port = int(environment(labeler)["KTO_METRICS_PORT"])
    assert port in listening_ports(labeler), f"{name} listens on {port} but declares {listening_ports(labeler)}"
    assert environment(labeler).get("KTO_HOST", dockerfile_env().get("KTO_HOST")) == "0.0.0.0"
    config = load_yaml(bind_source(DEPLOY, prod["services"]["prometheus"], "/etc/prometheus/prometheus.yml"))
    targets = {
        t for job in config["scrape_configs"] for static in job.get("static_configs", []) for t in static["targets"]
    }
    assert f"{name}:{port}" in targets, f"Prometheus does not scrape {name}:{port}: {sorted(targets)}"


def test_backend_urls_name_services_that_listen_there(prod):
    kto = {name: s for name, s in prod["services"].items() if is_kto(s)}
    for setting in ("KTO_BUS_URL", "KTO_REGISTRY_URL"):
        urls = {environment(s).get(setting) for s in kto.values()}
        assert len(urls) == 1 and None not in urls, f"{setting} differs between processes: {urls}"
        url = urls.pop()
        assert url is not None  # as asserted above
        host, port = host_port(url)
        assert_listens(prod, host, port, setting)
    bus_host, bus_port = host_port(environment(next(iter(kto.values())))["KTO_BUS_URL"])
    advertised = environment(prod["services"][bus_host])["KAFKA_ADVERTISED_LISTENERS"]
    assert f"//{bus_host}:{bus_port}" in advertised, "clients would be sent to an address they cannot reach"


def test_replicas_share_the_adapter_volume_with_the_learner(prod):
    processes = {**services_running(prod, "serve"), **services_running(prod, "learn")}
    sources = {}
    for name, service in processes.items():
        adapter_dir = environment(service).get("KTO_ADAPTER_DIR")
        assert adapter_dir, f"{name} has no KTO_ADAPTER_DIR"
        kind, source, _ = mount_for(service, adapter_dir)
        assert kind == "volume", f"{name}: adapters on a {kind} mount"
        sources[name] = (source, adapter_dir)
    assert len(set(sources.values())) == 1, f"adapters are not shared: {sources}"


def test_replicas_share_one_ledger(prod):
    """A rating may reach another replica than the answer: the ledger must be common to all."""
    replicas = services_running(prod, "serve")
    urls = {environment(s).get("KTO_LEDGER_URL") for s in replicas.values()}
    assert len(urls) == 1 and None not in urls, f"each replica would keep its own ledger: {urls}"
    url = urls.pop()
    assert url is not None  # as asserted above
    if url.startswith("sqlite:///"):
        places = {mount_for(s, url.removeprefix("sqlite:///"))[:2] for s in replicas.values()}
        assert len(places) == 1 and next(iter(places))[0] == "volume", f"ledger file not on one shared volume: {places}"
    else:
        assert_listens(prod, *host_port(url), "KTO_LEDGER_URL")


def test_each_replica_spools_to_a_file_of_its_own_on_a_volume(prod):
    """Events wait in the spool while Kafka is away: a file per replica (two would lock each other
    out), on a volume, so that what waits survives a new container."""
    replicas = services_running(prod, "serve")
    paths = {name: environment(s).get("KTO_SPOOL_PATH") for name, s in replicas.items()}
    assert None not in paths.values() and len(set(paths.values())) == len(paths), paths
    for name, service in replicas.items():
        path = paths[name]
        assert path is not None  # as asserted above
        assert mount_for(service, path)[0] == "volume", f"{name}: spool not on a volume"


def test_admin_token_must_be_given(prod):
    for name, service in services_running(prod, "serve").items():
        assert environment(service)["KTO_ADMIN_TOKEN"].startswith("${KTO_ADMIN_TOKEN:?"), name


def test_gpu_override_reserves_a_gpu_for_the_learner_only():
    override = load_yaml(GPU)["services"]
    assert set(override) == {"learner"}
    learner = merge(load_yaml(PRODUCTION), load_yaml(GPU))["services"]["learner"]
    devices = learner["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices)
    assert learner["build"]["args"]["BASE_IMAGE"].startswith("nvidia/cuda:")
    assert learner["build"]["context"] == "..", "the override keeps the base file's build context"
    assert learner["image"] != load_yaml(PRODUCTION)["services"]["learner"]["image"], "CUDA image under its own tag"


# ---- what the topology's config files point at ----


def test_prometheus_scrapes_every_process_where_it_listens(prod):
    config = load_yaml(bind_source(DEPLOY, prod["services"]["prometheus"], "/etc/prometheus/prometheus.yml"))
    targets = [
        t for job in config["scrape_configs"] for static in job.get("static_configs", []) for t in static["targets"]
    ]
    for target in targets:
        assert_listens(prod, *host_port(target), f"scrape target {target}")
    scraped = {host_port(t)[0] for t in targets}
    processes = {**services_running(prod, "serve"), **services_running(prod, "learn")}
    assert set(processes) <= scraped, f"not scraped: {sorted(set(processes) - scraped)}"
    assert "lb" not in scraped


def test_load_balancer_fronts_every_replica_streaming_friendly(prod):
    (lb,) = [s for s in prod["services"].values() if str(s.get("image", "")).startswith("nginx:")]
    conf = bind_source(DEPLOY, lb, "/etc/nginx/nginx.conf").read_text()
    conf = re.sub(r"#.*", "", conf)
    upstreams = re.findall(r"upstream\s+\S+\s*\{(.*?)\}", conf, re.S)
    assert len(upstreams) == 1, "one upstream block"
    servers = re.findall(r"^\s*server\s+([^\s;]+)", upstreams[0], re.M)
    for server in servers:
        assert_listens(prod, *host_port(server), f"nginx upstream {server}")
    assert {host_port(s)[0] for s in servers} == set(services_running(prod, "serve"))
    assert re.search(r"^\s*least_conn;", upstreams[0], re.M)
    assert re.search(r"proxy_buffering\s+off;", conf), "SSE needs proxy_buffering off"
    assert container_port(lb["ports"][0]) in {int(p) for p in re.findall(r"listen\s+(\d+)", conf)}


def test_replicas_trust_only_the_load_balancer_which_strips_identity_headers(prod):
    import ipaddress

    (lb,) = [s for s in prod["services"].values() if str(s.get("image", "")).startswith("nginx:")]
    lb_address = lb["networks"]["default"]["ipv4_address"]
    subnets = [c["subnet"] for c in prod["networks"]["default"]["ipam"]["config"]]
    assert any(ipaddress.ip_address(lb_address) in ipaddress.ip_network(n) for n in subnets)
    for name in services_running(prod, "serve"):
        env = prod["services"][name]["environment"]
        assert env["KTO_TRUSTED_PROXIES"] == lb_address, name
        assert env["KTO_AUTH"].startswith("${KTO_AUTH:-api-key}"), name  # a verified credential by default
    conf = re.sub(r"#.*", "", bind_source(DEPLOY, lb, "/etc/nginx/nginx.conf").read_text())
    for header in ("X-User-Id", "X-OpenWebUI-User-Id", "X-User-Role"):
        assert re.search(rf'proxy_set_header\s+{header}\s+"";', conf), f"nginx passes a client's {header}"


def test_grafana_provisioning_points_at_mounted_files(prod):
    grafana = prod["services"]["grafana"]
    provisioning = bind_source(DEPLOY, grafana, "/etc/grafana/provisioning")
    datasources = [d for f in sorted((provisioning / "datasources").glob("*.yml")) for d in load_yaml(f)["datasources"]]
    assert any(d["type"] == "prometheus" for d in datasources)
    for source in datasources:
        assert_listens(prod, *host_port(source["url"]), f"Grafana data source {source['name']}")
    providers = [p for f in sorted((provisioning / "dashboards").glob("*.yml")) for p in load_yaml(f)["providers"]]
    assert providers
    for provider in providers:
        assert bind_source(DEPLOY, grafana, provider["options"]["path"]).is_dir()


# ---- the image ----


def test_dockerfile_builds_cpu_or_cuda_as_non_root_with_a_healthcheck():
    instructions = dockerfile_instructions()
    first_from = next(i for i, (word, _) in enumerate(instructions) if word == "FROM")
    global_args = dict(rest.partition("=")[::2] for word, rest in instructions[:first_from] if word == "ARG")
    assert "BASE_IMAGE" in global_args and not global_args["BASE_IMAGE"].startswith("nvidia/"), "CPU by default"
    assert any(word == "FROM" and rest.split()[0] == "${BASE_IMAGE}" for word, rest in instructions)
    users = [rest for word, rest in instructions if word == "USER"]
    assert users and users[-1].split(":")[0] not in {"root", "0"}, "the image must run as a non-root user"
    checks = [rest for word, rest in instructions if word == "HEALTHCHECK"]
    assert checks and not checks[-1].upper().startswith("NONE") and "/healthz" in checks[-1]
