"""deploy/compose.cluster.yaml: the Compose Spec schema, the six Redis nodes and the service that
forms the cluster, and compose.yaml's other services unchanged but for the URL they get and
what they wait for. (tests/deploy/test_cluster_processes.py runs the nodes and the create
command as local processes.)"""

from __future__ import annotations

import copy
import re
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml

from orchestrator.settings import Settings
from tests.deploy.manifests import (
    COMPOSE_CLUSTER,
    MissingVariable,
    compose,
    compose_cluster,
    interpolate,
    plain,
    service_env,
)
from tests.deploy.test_compose import PASSWORD, compose_spec_schema

NODES = [f"redis-node-{i}" for i in range(6)]
CREATE = "redis-cluster-create"
SHARED = ("supervisor", "worker", "prometheus", "grafana")  # compose.yaml's, unchanged but for Redis
NODE_PORT = 6379  # neither the nodes' command nor their config file sets another
CONFIG_TARGET = "/usr/local/etc/redis/node.conf"


def services() -> dict[str, Any]:
    found: dict[str, Any] = compose_cluster()["services"]
    return found


def node_config(password: str = PASSWORD) -> dict[str, str]:
    """The nodes' config file as compose writes it, as directive -> value."""
    content = compose_cluster()["configs"]["redis-cluster-node"]["content"]
    lines = [line.split(None, 1) for line in interpolate(content, {"REDIS_PASSWORD": password}).splitlines() if line]
    config = dict((k, v) for k, v in lines)
    assert len(config) == len(lines), "a directive given twice"
    return config


def create_script() -> str:
    """The create service's shell script, after compose's interpolation (``$$`` is ``$``)."""
    command = services()[CREATE]["command"]
    assert command[:2] == ["sh", "-c"] and len(command) == 3
    return interpolate(command[2])


def test_the_cluster_file_is_valid_against_the_compose_spec_schema() -> None:
    schema = compose_spec_schema()
    validator_class = jsonschema.validators.validator_for(schema)
    validator = validator_class(schema, format_checker=validator_class.FORMAT_CHECKER)
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(compose_cluster())]
    assert errors == []
    typo = yaml.safe_load(COMPOSE_CLUSTER.read_text())
    typo["services"][CREATE]["depend_on"] = {}
    assert any("depend_on" in e.message for e in validator.iter_errors(typo))


def test_the_stack_is_six_nodes_the_create_service_and_compose_yamls_other_services() -> None:
    assert list(services()) == [*NODES, CREATE, *SHARED]
    assert compose_cluster()["name"] != compose()["name"], (
        "a project of its own: its volumes are not the single server's"
    )
    for name in SHARED:
        ours, theirs = copy.deepcopy(services()[name]), copy.deepcopy(compose()["services"][name])
        if name in ("worker", "supervisor"):  # what may differ: the URL, and what they wait for
            for service in (ours, theirs):
                service.pop("depends_on")
                service["environment"].pop("REDIS_URL")
        assert ours == theirs, f"{name} differs from compose.yaml's"
    assert set(compose_cluster()["volumes"]) == {*NODES, "prometheus-data"}


def test_the_nodes_run_the_pinned_redis_with_the_shared_config_and_announce_their_service_names() -> None:
    single = compose()["services"]["redis"]
    for name in NODES:
        node = services()[name]
        assert node["image"] == single["image"], "the Redis compose.yaml runs (pinned there)"
        assert node["command"] == ["redis-server", CONFIG_TARGET, "--cluster-announce-hostname", name]
        assert node["configs"] == [{"source": "redis-cluster-node", "target": CONFIG_TARGET}]
        assert node["volumes"] == [f"{name}:/data"], "nodes.conf and the AOF live in the node's own volume"
        assert "ports" not in node, "clients follow the names the nodes announce, which only compose's DNS knows"
        assert "container_name" not in node
        kind, shell = node["healthcheck"]["test"]
        assert kind == "CMD-SHELL" and CONFIG_TARGET in shell and "redis-cli ping" in shell
        assert node["restart"] == "unless-stopped"


def test_the_node_config_holds_the_password_cluster_mode_and_compose_yamls_durability() -> None:
    config = node_config()
    assert config == {
        "requirepass": PASSWORD,
        "masterauth": PASSWORD,  # replicas authenticate to their master with it
        "cluster-enabled": "yes",
        "cluster-config-file": "nodes.conf",
        "cluster-preferred-endpoint-type": "hostname",
        "cluster-node-timeout": "5000",
        "cluster-require-full-coverage": "no",
        "appendonly": "yes",
        "appendfsync": "always",
        "maxmemory-policy": "noeviction",
    }
    single = compose()["services"]["redis"]["command"]
    assert dict(zip(single[2::2], single[3::2], strict=True)) == {
        f"--{k}": config[k] for k in ("appendonly", "appendfsync", "maxmemory-policy")
    }
    with pytest.raises(MissingVariable, match="REDIS_PASSWORD"):
        interpolate(compose_cluster()["configs"]["redis-cluster-node"]["content"])
    assert "requirepass" not in str([services()[name]["command"] for name in NODES])


def test_the_create_service_forms_the_cluster_once_every_node_is_healthy() -> None:
    create = services()[CREATE]
    assert create["depends_on"] == {name: {"condition": "service_healthy"} for name in NODES}
    assert create["image"] == services()[NODES[0]]["image"], "redis-cli of the nodes' release"
    assert create["restart"] == "no", "a one-shot: it exits once the cluster is formed"
    assert create["configs"] == services()[NODES[0]]["configs"], "it reads the password where the nodes do"
    env = service_env(create)
    assert env["CLUSTER_NODES"].split() == [f"{name}:{NODE_PORT}" for name in NODES]
    assert int(env["CLUSTER_READY_TIMEOUT_S"]) >= 30
    script = create_script()
    assert "redis-cli --cluster create $CLUSTER_NODES --cluster-replicas 1 --cluster-yes" in script
    assert len(NODES) == 3 * (1 + 1), "3 masters with one replica each"
    assert re.search(r"REDISCLI_AUTH=.*requirepass.*" + re.escape(CONFIG_TARGET), script)
    assert "-a " not in script, "the password stays off command lines"


def test_workers_and_supervisors_get_a_plain_url_of_one_node_and_start_once_the_cluster_is_ok() -> None:
    for name in ("worker", "supervisor"):
        service = services()[name]
        url = interpolate(service_env(service)["REDIS_URL"], {"REDIS_PASSWORD": PASSWORD})
        assert url == f"redis://:{PASSWORD}@{NODES[0]}:{NODE_PORT}/0"
        assert plain(Settings(redis_url=url).redis_url) == url
        assert urlsplit(url).hostname in services()
        assert service["depends_on"] == {CREATE: {"condition": "service_completed_successfully"}}
        with pytest.raises(MissingVariable):
            interpolate(service_env(service)["REDIS_URL"])
    for name, service in services().items():  # every dependency is a service of this file (no `redis`)
        assert set(service.get("depends_on", {})) <= set(services()) - {name}, name


def test_images_are_pinned_and_published_ports_listen_on_loopback_only() -> None:
    for name, service in services().items():
        if "build" not in service:
            assert re.search(r":v?\d+\.\d+\.\d+|@sha256:", service["image"]), (
                f"{name}: {service['image']} is not pinned"
            )
    published = [interpolate(p) for s in services().values() for p in s.get("ports", [])]
    assert published and all(p.startswith("127.0.0.1:") for p in published), published
