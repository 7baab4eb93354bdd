"""deploy/k8s/components: the Redis ACL and TLS variants, rendered by kustomize on the base and
checked like the base (tests/deploy/test_k8s.py): Kubernetes' schemas, KEDA's CRD fields and
scaler parameters, and agreement between what KEDA, the pods and their URLs say."""

from __future__ import annotations

import base64
import re
import shutil
import textwrap
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import jsonschema
import pytest

from orchestrator.settings import Settings
from tests.deploy.manifests import K8S, REPO, orchestrator_keda, shared_option
from tests.deploy.test_k8s import (
    KEDA_API,
    REDIS_STREAMS_AUTH_PARAMETERS,
    REDIS_STREAMS_METADATA,
    SCALED_OBJECT_SPEC,
    TRIGGER_AUTHENTICATION_SPEC,
    kustomize,
    layout,
    scaled_spec,
    validate_for_kubernetes,
)

COMPONENTS = K8S / "components"
SECURITY_DOC = REPO / "docs" / "security.md"
TLS_MOUNT = "/etc/orchestrator/redis-tls"
Docs = dict[tuple[str, str], dict[str, Any]]


def render(tmp_path: Path, kustomization: str, files: dict[str, str] | None = None) -> Docs:
    """``kubectl kustomize`` of an overlay next to a copy of deploy/k8s, as a user's would be."""
    shutil.copytree(K8S, tmp_path / "deploy" / "k8s")
    overlay = tmp_path / "my-deploy"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(kustomization)
    for name, text in (files or {}).items():
        (overlay / name).write_text(text)
    return {(d["kind"], d["metadata"]["name"]): d for d in kustomize(overlay)}


def overlay_with(*components: str) -> str:
    listed = "".join(f"  - ../deploy/k8s/components/{name}\n" for name in components)
    return f"resources: [../deploy/k8s]\ncomponents:\n{listed}"


def container(docs: Docs, name: str) -> dict[str, Any]:
    found: dict[str, Any] = docs["Deployment", name]["spec"]["template"]["spec"]["containers"][0]
    return found


def url_key(docs: Docs, name: str) -> str:
    (ref,) = [e["valueFrom"]["secretKeyRef"] for e in container(docs, name)["env"] if e["name"] == "REDIS_URL"]
    assert ref["name"] == "orchestrator-redis"
    key: str = ref["key"]
    return key


def auth_refs(docs: Docs) -> dict[str, tuple[str, str]]:
    """The TriggerAuthentication's parameters: parameter -> (Secret, key)."""
    refs = docs["TriggerAuthentication", "orchestrator-redis"]["spec"]["secretTargetRef"]
    assert len({r["parameter"] for r in refs}) == len(refs), "a parameter given twice"
    return {r["parameter"]: (r["name"], r["key"]) for r in refs}


def secret_value(docs: Docs, name: str, key: str) -> str:
    secret = docs["Secret", name]
    if key in secret.get("stringData", {}):
        return str(secret["stringData"][key])
    return base64.b64decode(secret["data"][key]).decode()


def keda_tls(docs: Docs, meta: dict[str, str]) -> bool:
    """Whether KEDA's trigger with metadata ``meta`` talks TLS: its own enableTLS, or the
    TriggerAuthentication's `tls` parameter (read from a Secret) set to `enable`."""
    params = auth_refs(docs)
    return meta.get("enableTLS") == "true" or ("tls" in params and secret_value(docs, *params["tls"]) == "enable")


def check_keda(docs: Docs) -> None:
    """What tests/deploy/test_k8s.py checks of the base's KEDA resources, and KEDA's TLS rules."""
    scaled, auth = docs["ScaledObject", "orchestrator-worker"], docs["TriggerAuthentication", "orchestrator-redis"]
    assert scaled["apiVersion"] == auth["apiVersion"] == KEDA_API
    jsonschema.validate(scaled["spec"], SCALED_OBJECT_SPEC)
    jsonschema.validate(auth["spec"], TRIGGER_AUTHENTICATION_SPEC)
    params = auth_refs(docs)
    assert set(params) <= REDIS_STREAMS_AUTH_PARAMETERS, set(params) - REDIS_STREAMS_AUTH_PARAMETERS
    assert ("cert" in params) == ("key" in params), "KEDA wants a client certificate and its key together"
    for ref in auth["spec"]["secretTargetRef"]:  # a Secret it reads is in its namespace (some are the user's)
        if ("Secret", ref["name"]) in docs:
            assert docs["Secret", ref["name"]]["metadata"]["namespace"] == auth["metadata"]["namespace"]
    if "tls" in params:
        assert secret_value(docs, *params["tls"]) in ("enable", "disable")
    for trigger in scaled["spec"]["triggers"]:
        meta = trigger["metadata"]
        assert set(meta) <= REDIS_STREAMS_METADATA, set(meta) - REDIS_STREAMS_METADATA
        # KEDA refuses `tls` in both the trigger and its TriggerAuthentication
        assert not ("enableTLS" in meta and "tls" in params)
        assert ("ca" in params) <= keda_tls(docs, meta), "a CA without TLS is ignored"


@pytest.mark.parametrize("components", [("redis-acl",), ("redis-tls",), ("redis-acl", "redis-tls")])
def test_the_components_render_on_the_base_as_valid_kubernetes_and_keda(
    tmp_path: Path, components: tuple[str, ...]
) -> None:
    docs = render(tmp_path, overlay_with(*components))
    validate_for_kubernetes(docs.values())
    check_keda(docs)
    params = auth_refs(docs)
    assert params["password"] == ("orchestrator-redis", "REDIS_PASSWORD")
    acl, tls = "redis-acl" in components, "redis-tls" in components
    assert url_key(docs, "orchestrator-worker") == "REDIS_URL"
    assert url_key(docs, "orchestrator-supervisor") == ("REDIS_SUPERVISOR_URL" if acl else "REDIS_URL")
    assert ("username" in params) == acl and params.get("username", ("", "REDIS_USERNAME"))[1] == "REDIS_USERNAME"
    triggers = docs["ScaledObject", "orchestrator-worker"]["spec"]["triggers"]
    assert len(triggers) == len(scaled_spec()["triggers"]) == 2 * layout()[1]
    for trigger in triggers:  # TLS once, in the TriggerAuthentication, for every trigger
        assert "enableTLS" not in trigger["metadata"]
        assert keda_tls(docs, trigger["metadata"]) == tls
    if tls:
        assert {p: params[p] for p in ("tls", "ca", "cert", "key")} == {
            "tls": ("orchestrator-keda-tls", "tls"),
            "ca": ("orchestrator-redis-tls", "ca.crt"),
            "cert": ("orchestrator-redis-tls", "tls.crt"),
            "key": ("orchestrator-redis-tls", "tls.key"),
        }
        assert secret_value(docs, "orchestrator-keda-tls", "tls") == "enable"
    for name in ("orchestrator-worker", "orchestrator-supervisor"):
        pod = docs["Deployment", name]["spec"]["template"]["spec"]
        mounts = [m for m in container(docs, name).get("volumeMounts", []) if m["mountPath"] == TLS_MOUNT]
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        assert bool(mounts) == tls, name
        if tls:
            (mount,) = mounts
            assert mount["readOnly"] is True
            assert volumes[mount["name"]]["secret"]["secretName"] == "orchestrator-redis-tls"
            # the key is readable by the pod's group, which the process runs in
            assert volumes[mount["name"]]["secret"]["defaultMode"] == 0o440
            assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsGroup"]


def doc_block(first_line: str) -> str:
    """The fenced code block of docs/security.md that starts with ``first_line``."""
    for block in re.findall(r"^[ \t]*```[a-z]*\n(.*?)^[ \t]*```", SECURITY_DOC.read_text(), re.M | re.S):
        text = textwrap.dedent(block)
        if text.startswith(first_line):
            return text
    raise AssertionError(f"no code block starting with {first_line!r} in docs/security.md")


def acl_users() -> set[str]:
    return set(re.findall(r"^\s*ACL SETUSER (\S+) ", SECURITY_DOC.read_text(), re.M))


def test_the_documented_overlay_renders_and_its_urls_keda_and_mounts_agree(tmp_path: Path) -> None:
    """docs/security.md's overlay with both components: each pod's URL is a valid setting with
    its role's user, TLS options that name the files of the mounted Secret; KEDA reaches the same
    server, with TLS, as orch-keda."""
    kustomization = doc_block("# my-deploy/kustomization.yaml")
    env_lines = re.findall(r"^\s*#\s+(REDIS_[A-Z_]+=\S+)$", kustomization, re.M)
    files = {"redis.env": "\n".join(env_lines) + "\n", "ca.crt": "CA\n", "tls.crt": "CERT\n", "tls.key": "KEY\n"}
    (line,) = re.findall(r"^\s*#\s+(orchestrator keda .*)$", kustomization, re.M)
    assert (shared_option(line, "--namespace"), int(shared_option(line, "--partitions"))) == layout()
    patch, path = orchestrator_keda(line)
    assert path.startswith("my-deploy/") and f"path: {path.removeprefix('my-deploy/')}" in kustomization
    files[path.removeprefix("my-deploy/")] = patch
    docs = render(tmp_path, kustomization, files)
    check_keda(docs)
    for (kind, name), doc in docs.items():
        if kind != "Namespace":  # the generated Secrets too, not in kubectl's current namespace
            assert doc["metadata"].get("namespace") == "orchestrator", (kind, name)
    secret = {k: base64.b64decode(v).decode() for k, v in docs["Secret", "orchestrator-redis"]["data"].items()}
    assert set(secret) == {"REDIS_URL", "REDIS_SUPERVISOR_URL", "REDIS_USERNAME", "REDIS_PASSWORD"}
    tls_keys = set(docs["Secret", "orchestrator-redis-tls"]["data"])
    assert tls_keys == {"ca.crt", "tls.crt", "tls.key"}
    for name, role in (("orchestrator-worker", "worker"), ("orchestrator-supervisor", "supervisor")):
        url = secret[url_key(docs, name)]
        assert Settings(redis_url=url).redis_url  # a valid setting (the files exist only in the pod)
        parts = urlsplit(url)
        assert parts.scheme == "rediss" and parts.username == f"orch-{role}" and f"orch-{role}" in acl_users()
        for option, path in ((k, v[0]) for k, v in parse_qs(parts.query).items()):
            assert option in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile"), option
            assert path.startswith(f"{TLS_MOUNT}/") and path.rpartition("/")[2] in tls_keys, path
        triggers = docs["ScaledObject", "orchestrator-worker"]["spec"]["triggers"]
        assert len(triggers) == len(scaled_spec()["triggers"])
        for trigger in triggers:
            assert trigger["metadata"]["address"] == f"{parts.hostname}:{parts.port}"
            assert keda_tls(docs, trigger["metadata"])
    assert secret["REDIS_USERNAME"] == "orch-keda" and "orch-keda" in acl_users()
