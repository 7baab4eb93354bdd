"""deploy/compose.yaml: the Compose Spec schema, the stack's structure, and its settings."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml
from pydantic import TypeAdapter

from orchestrator.cli.common import load_workflows
from orchestrator.settings import Settings
from tests.deploy.manifests import (
    COMPOSE,
    DEPLOY,
    DOCKERFILE,
    PROMETHEUS_CONFIG,
    REPO,
    RULES,
    SETTINGS_PREFIX,
    MissingVariable,
    compose,
    duration_s,
    interpolate,
    load_all,
    load_yaml,
    plain,
    service_env,
)

ORCHESTRATOR_SERVICES = ("worker", "supervisor")
METRICS_PORTS = {"worker": 9100, "supervisor": 9101}
PASSWORD = "0123456789abcdef0123456789abcdef"  # what deploy/README.md's openssl line makes: hex
GRAFANA_MOUNTS = [
    "../grafana/provisioning:/etc/grafana/provisioning:ro",
    "../grafana/dashboards:/var/lib/grafana/dashboards:ro",
]


def services() -> dict[str, Any]:
    found: dict[str, Any] = compose()["services"]
    return found


def compose_spec_schema() -> dict[str, Any]:
    """The official Compose Spec JSON schema, as vendored by check-jsonschema."""
    pytest.importorskip("check_jsonschema", reason="pip install check-jsonschema (it vendors the Compose Spec)")
    from importlib.resources import files

    schema: dict[str, Any] = json.loads(
        (files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json").read_text()
    )
    return schema


def test_every_yaml_file_of_deploy_and_its_tests_parses() -> None:
    paths = sorted([*DEPLOY.rglob("*.yml"), *DEPLOY.rglob("*.yaml"), *Path(__file__).parent.glob("*.yml")])
    assert len(paths) >= 10, paths
    for path in paths:
        docs = load_all(path)
        if len(docs) == 1 and isinstance(docs[0], list):  # a kustomize patch: JSON 6902 operations
            assert docs[0] and all(isinstance(op, dict) and {"op", "path"} <= set(op) for op in docs[0]), path
            continue
        assert docs and all(isinstance(doc, dict) for doc in docs), f"{path}: expected YAML mappings"


def test_compose_file_is_valid_against_the_compose_spec_schema() -> None:
    schema = compose_spec_schema()
    validator_class = jsonschema.validators.validator_for(schema)
    validator = validator_class(schema, format_checker=validator_class.FORMAT_CHECKER)
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(compose())]
    assert errors == []
    # the schema is strict: a misspelled key is an error, so a clean pass above means something
    typo = yaml.safe_load(COMPOSE.read_text())
    typo["services"]["worker"]["stop_grace_perod"] = "45s"
    assert any("stop_grace_perod" in e.message for e in validator.iter_errors(typo))


def test_the_stack_has_its_five_services_and_scalable_ones_have_no_fixed_names_or_host_ports() -> None:
    assert set(services()) == {"redis", "supervisor", "worker", "prometheus", "grafana"}
    assert services()["supervisor"]["deploy"]["replicas"] == 2
    for name in ORCHESTRATOR_SERVICES:
        service = services()[name]
        assert "container_name" not in service, f"{name}: a container_name makes --scale impossible"
        assert "ports" not in service, f"{name}: a fixed host port collides as soon as there are two replicas"
        assert f"{METRICS_PORTS[name]}" in [str(p) for p in service["expose"]]


def test_worker_and_supervisor_are_built_from_deploy_dockerfile_with_the_repository_as_context() -> None:
    for name in ORCHESTRATOR_SERVICES:
        build = services()[name]["build"]
        context = (COMPOSE.parent / build["context"]).resolve()
        assert context == REPO
        assert (context / build["dockerfile"]).resolve() == DOCKERFILE
        assert services()[name]["depends_on"]["redis"]["condition"] == "service_healthy"


def redis_config() -> tuple[str, str]:
    """(where the redis service mounts its config file, the file's content as compose writes it)."""
    (mount,) = services()["redis"]["configs"]
    content: str = compose()["configs"][mount["source"]]["content"]
    return mount["target"], interpolate(content, {"REDIS_PASSWORD": PASSWORD})


def test_redis_is_durable_and_never_evicts() -> None:
    redis = services()["redis"]
    assert redis["image"].split(":")[0] == "redis" and redis["image"].split(":")[1].startswith("7")
    command = redis["command"]
    assert command[0] == "redis-server"
    assert command[1] == redis_config()[0], "the config file with the password comes first (redis-server's rule)"
    flags = dict(zip(command[2::2], command[3::2], strict=True))
    assert flags == {"--appendonly": "yes", "--appendfsync": "always", "--maxmemory-policy": "noeviction"}
    volume, target = redis["volumes"][0].split(":")[:2]
    assert target == "/data" and volume in compose()["volumes"], "Redis data must live in a named volume"
    assert "redis-cli ping" in " ".join(redis["healthcheck"]["test"])


def test_redis_requires_a_password_that_comes_from_the_environment() -> None:
    """The password is REDIS_PASSWORD (deploy/.env or the shell; compose refuses to start without
    it), given to Redis in a config file (not on a command line, which `ps` shows) and to the
    workers and supervisors in their URL; no password is written in the file itself."""
    target, content = redis_config()
    assert content == f"requirepass {PASSWORD}\n"
    raw = COMPOSE.read_text()
    assert raw.count("${REDIS_PASSWORD:?") == 2, "the config file and the URL, both required"
    assert "requirepass" not in " ".join(services()["redis"]["command"])
    assert target in " ".join(services()["redis"]["healthcheck"]["test"]), "the healthcheck authenticates"
    with pytest.raises(MissingVariable, match="REDIS_PASSWORD"):
        interpolate(compose()["configs"]["redis-auth"]["content"])
    for name in ORCHESTRATOR_SERVICES:
        url = urlsplit(interpolate(service_env(services()[name])["REDIS_URL"], {"REDIS_PASSWORD": PASSWORD}))
        assert url.password == PASSWORD and url.username in (None, ""), f"{name}: {url}"
        with pytest.raises(MissingVariable):
            interpolate(service_env(services()[name])["REDIS_URL"])
    # deploy/.env holds the password: git ignores it
    assert ".env" in (DEPLOY / ".gitignore").read_text().split()


def test_images_are_pinned_to_exact_versions() -> None:
    """Third-party images by an exact release tag (or a digest), never a moving one like `7` or
    `latest`: a rebuild next month must run what was tested."""
    for name, service in services().items():
        if "build" in service:
            continue  # built here from this repository
        image = service["image"]
        assert re.fullmatch(r"[\w./-]+(:v?\d+\.\d+\.\d+[\w.-]*)?(@sha256:[0-9a-f]{64})?", image), image
        assert re.search(r":v?\d+\.\d+\.\d+|@sha256:", image), f"{name}: {image} is not pinned"


def test_workers_and_supervisors_reach_redis_and_serve_metrics_to_prometheus() -> None:
    for name in ORCHESTRATOR_SERVICES:
        env = service_env(services()[name])
        url = interpolate(env["REDIS_URL"], {"REDIS_PASSWORD": PASSWORD})
        assert url == f"redis://:{PASSWORD}@redis:6379/0", f"{name}: the URL must name the redis service"
        assert env["ORCHESTRATOR_METRICS_HOST"] == "0.0.0.0", f"{name}: /metrics must be reachable from Prometheus"
        assert env["ORCHESTRATOR_METRICS_PORT"] == str(METRICS_PORTS[name])


def test_stop_grace_period_outlasts_the_worker_drain() -> None:
    for name in ORCHESTRATOR_SERVICES:
        service = services()[name]
        default_s = Settings.model_fields["drain_grace_s"].default
        drain_s = float(service_env(service).get("ORCHESTRATOR_DRAIN_GRACE_S", default_s))
        grace_s = duration_s(service["stop_grace_period"])
        assert grace_s >= drain_s + 10, (
            f"{name}: stop_grace_period {grace_s} s leaves no time after a {drain_s} s drain"
        )


@pytest.mark.parametrize("name", ORCHESTRATOR_SERVICES)
def test_every_orchestrator_variable_is_a_real_setting_with_a_valid_value(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = service_env(services()[name])
    settings_env = {k: v for k, v in env.items() if k.startswith(SETTINGS_PREFIX)}
    assert settings_env, f"{name}: no ORCHESTRATOR_* variables?"
    unknown = [k for k in settings_env if k.removeprefix(SETTINGS_PREFIX).lower() not in Settings.model_fields]
    assert unknown == [], f"{name}: not settings (pydantic-settings would silently ignore them): {unknown}"
    for key in [k for k in os.environ if k.startswith(SETTINGS_PREFIX) or k == "REDIS_URL"]:
        monkeypatch.delenv(key)
    env = {key: interpolate(value, {"REDIS_PASSWORD": PASSWORD}) for key, value in env.items()}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = Settings()  # read from exactly this environment, as the container does
    assert plain(settings.redis_url) == env["REDIS_URL"]
    for key, value in settings_env.items():
        field = key.removeprefix(SETTINGS_PREFIX).lower()
        expected = TypeAdapter(Settings.model_fields[field].annotation).validate_python(value)
        assert getattr(settings, field) == expected, f"{key}={value!r} did not reach Settings.{field}"


def test_worker_command_serves_the_demo_agent_and_the_supervisor_needs_no_code() -> None:
    command = services()["worker"]["command"]
    assert command == ["worker", "orchestrator.demo.agent:research", "--concurrency", "16"]
    (workflow,) = load_workflows((command[1],))
    assert workflow.name == "research"
    assert services()["supervisor"]["command"] == ["supervisor"]


def test_prometheus_loads_the_scrape_config_and_the_rules_from_deploy() -> None:
    prometheus = services()["prometheus"]
    assert prometheus["image"].startswith("prom/prometheus:")
    mounts = {}
    for volume in prometheus["volumes"]:
        source, target = volume.split(":")[:2]
        if source.startswith("."):
            mounts[target] = (COMPOSE.parent / source).resolve()
    config_flag = next(arg for arg in prometheus["command"] if arg.startswith("--config.file="))
    config_target = config_flag.split("=", 1)[1]
    assert mounts[config_target] == PROMETHEUS_CONFIG
    for rule_file in load_yaml(PROMETHEUS_CONFIG)["rule_files"]:
        in_container = str(PurePosixPath(config_target).parent / rule_file)
        assert mounts.get(in_container) == RULES, f"rule_files entry {rule_file} is not the mounted rules.yml"


def test_grafana_is_provisioned_from_the_repository_and_reaches_prometheus() -> None:
    grafana = services()["grafana"]
    assert grafana["image"].startswith("grafana/grafana:")
    assert grafana["volumes"] == GRAFANA_MOUNTS
    # Grafana's datasource is http://prometheus:9090: the service name on the default network
    prometheus = services()["prometheus"]
    assert "networks" not in prometheus and "networks" not in grafana
    assert [interpolate(p).rsplit(":", 1)[1] for p in prometheus["ports"]] == ["9090"]
    # what grafana/provisioning expects of this stack, where it says so
    scrape_interval = load_yaml(PROMETHEUS_CONFIG)["global"]["scrape_interval"]
    for path in sorted((REPO / "grafana" / "provisioning" / "datasources").glob("*.y*ml")):
        for source in load_yaml(path).get("datasources", []):
            if source.get("type") == "prometheus":
                assert source["url"].rstrip("/") == "http://prometheus:9090", f"{path}: {source['url']}"
                interval = source.get("jsonData", {}).get("timeInterval", scrape_interval)
                assert interval == scrape_interval, f"{path}: timeInterval differs from Prometheus' scrape_interval"
    dashboards_target = GRAFANA_MOUNTS[1].split(":")[1]
    for path in sorted((REPO / "grafana" / "provisioning" / "dashboards").glob("*.y*ml")):
        for provider in load_yaml(path).get("providers", []):
            folder = PurePosixPath(provider["options"]["path"])
            assert folder == PurePosixPath(dashboards_target) or PurePosixPath(dashboards_target) in folder.parents


def test_published_ports_listen_on_loopback_only() -> None:
    published = [interpolate(p) for s in services().values() for p in s.get("ports", [])]
    assert published and all(p.startswith("127.0.0.1:") for p in published), published
