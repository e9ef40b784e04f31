"""The sdist and the wheel, built as a user builds them (`python -m build`, offline with
the setuptools installed here).

The wheel ships the whole package, typed (`py.typed`, PEP 561) and licensed (LICENSE
and an SPDX expression, PEP 639), and runs; the sdist is the source tree, so the tests
run from it; and the build warns of nothing.
"""

from __future__ import annotations

import contextlib
import email.message
import email.parser
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from echoplex import __version__

from .procs import ROOT

BUILD_TIMEOUT_S = 45.0
RUN_TIMEOUT_S = 30.0
DIST_INFO = f"echoplex-{__version__}.dist-info"
# What the sdist build writes beside the tree's own files.
SDIST_GENERATED = {"PKG-INFO", "setup.cfg"}
# A test that reads deploy/ and docs/: run from the unpacked sdist, it shows they are there.
READS_THE_TREE = "tests/test_deploy.py::test_every_flag_and_variable_exists"


@dataclass(frozen=True)
class Built:
    sdist: Path
    wheel: Path
    output: str
    tree: frozenset[str]
    """The source files the build was given: a copy of the tree, taken as the build
    began (the tree is being worked in, and the build writes beside its sources)."""


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    """An sdist of a copy of the tree, and a wheel built from that sdist (as `python -m
    build` does): the build's own files (`*.egg-info`, the sdist's release tree) are
    written in the copy, never in the working tree."""
    source = copy_of_the_tree(tmp_path_factory.mktemp("source"))
    out = tmp_path_factory.mktemp("dist")
    # PYTHONDONTWRITEBYTECODE (set where these tests run) only adds a warning per build step.
    environment = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    tree = frozenset(files_under(source))
    result = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(source)],
        capture_output=True,
        text=True,
        env=environment,
        timeout=BUILD_TIMEOUT_S,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    (sdist,) = out.glob("echoplex-*.tar.gz")
    (wheel,) = out.glob("echoplex-*.whl")
    return Built(sdist, wheel, output, tree)


def copy_of_the_tree(target: Path) -> Path:
    """The tree's source files (`files_under`) copied under `target`; a file removed
    while it is copied is left out."""
    for name in files_under(ROOT):
        destination = target / name
        destination.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            shutil.copy2(ROOT / name, destination)
    return target


def files_under(top: Path) -> Iterator[str]:
    """Every source file under `top`, as a relative POSIX path: not repository machinery
    (.git, .gitignore, .ci), caches, virtualenvs or build output."""
    for folder, subfolders, files in os.walk(top):
        here = Path(folder).relative_to(top)
        subfolders[:] = [
            name
            for name in subfolders
            if not (name.startswith(".") or name == "__pycache__" or name.endswith(".egg-info"))
            and (here / name).as_posix() not in ("build", "dist", "bench/out")
        ]
        for name in files:
            if not (name.startswith(".") or name.endswith(".pyc")):
                yield (here / name).as_posix()


def package_files(tree: frozenset[str]) -> set[str]:
    return {name for name in tree if name.startswith("echoplex/")}


def wheel_metadata(wheel: Path) -> email.message.Message:
    with zipfile.ZipFile(wheel) as archive:
        return email.parser.BytesParser().parsebytes(archive.read(f"{DIST_INFO}/METADATA"))


def test_the_build_warns_of_nothing(built: Built) -> None:
    warned = [line for line in built.output.splitlines() if re.search("warn|deprecat", line, re.I)]
    assert not warned, "\n".join(warned)


def test_the_wheel_is_licensed_by_an_spdx_expression(built: Built) -> None:
    metadata = wheel_metadata(built.wheel)
    assert metadata["Version"] == __version__
    major, minor = map(int, metadata["Metadata-Version"].split("."))
    assert (major, minor) >= (2, 4)  # the first with License-Expression
    assert metadata["License-Expression"] == "MIT"
    assert metadata.get_all("License-File") == ["LICENSE"]
    assert metadata["License"] is None  # the free-text field PEP 639 deprecates
    classifiers = metadata.get_all("Classifier") or []
    assert not [c for c in classifiers if c.startswith("License ::")]
    assert "Typing :: Typed" in classifiers
    with zipfile.ZipFile(built.wheel) as archive:
        shipped = archive.read(f"{DIST_INFO}/licenses/LICENSE")
    assert shipped == (ROOT / "LICENSE").read_bytes()
    assert shipped.startswith(b"MIT License\n")


def test_the_project_urls_name_the_repository_the_deploy_files_name(built: Built) -> None:
    urls = dict(
        entry.split(", ", 1) for entry in wheel_metadata(built.wheel).get_all("Project-URL") or []
    )
    assert set(urls) == {"Homepage", "Documentation", "Source", "Issues"}
    service = (ROOT / "deploy" / "echoplex.service").read_text()
    documentation = re.search(r"^Documentation=(\S+)", service, re.M)
    assert documentation, "deploy/echoplex.service names no Documentation="
    assert documentation.group(1).startswith(urls["Source"] + "/")


def test_the_wheel_ships_every_file_of_the_package(built: Built) -> None:
    """Modules, py.typed, and the benchmark's reference servers (with any C source) are
    package files: whatever is under echoplex/ ships, so `bench --baselines` works from
    a wheel."""
    with zipfile.ZipFile(built.wheel) as archive:
        names = set(archive.namelist())
        entry_points = archive.read(f"{DIST_INFO}/entry_points.txt").decode()
    shipped = {name for name in names if name.startswith("echoplex/")}
    package = package_files(built.tree)
    assert "echoplex/py.typed" in shipped
    assert [name for name in package if name.startswith("echoplex/bench/baselines/")]
    assert sorted(package - shipped) == [], "package files the wheel lacks"
    assert sorted(shipped - package) == [], "wheel files that are not in echoplex/"
    assert "echoplex = echoplex.cli:main" in entry_points


def test_the_wheel_runs_and_reports_its_version(built: Built, tmp_path: Path) -> None:
    with zipfile.ZipFile(built.wheel) as archive:
        archive.extractall(tmp_path)
    code = "import sys, echoplex, echoplex.cli; print(echoplex.__file__); echoplex.cli.main()"
    result = subprocess.run(
        [sys.executable, "-c", code, "--version"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{tmp_path / 'echoplex' / '__init__.py'}\nechoplex {__version__}\n"


def test_the_sdist_is_the_source_tree(built: Built) -> None:
    with tarfile.open(built.sdist) as archive:
        names = {member.name for member in archive.getmembers() if member.isfile()}
    top = f"echoplex-{__version__}/"
    assert all(name.startswith(top) for name in names)
    shipped = {
        name.removeprefix(top)
        for name in names
        if name.removeprefix(top) not in SDIST_GENERATED
        and not name.startswith(f"{top}echoplex.egg-info/")
    }
    # Run from an unpacked sdist, the tree holds the sdist's generated files too.
    tree = built.tree - SDIST_GENERATED
    assert {"LICENSE", "ServerPython.py", "tests/conftest.py", "echoplex/py.typed"} <= shipped
    missing = sorted(tree - shipped)
    assert missing == [], "not in the sdist: add them to MANIFEST.in (or here, if not source)"
    assert sorted(shipped - tree) == [], "in the sdist but not in the tree"


def test_the_tests_run_from_the_sdist(built: Built, tmp_path: Path) -> None:
    with tarfile.open(built.sdist) as archive:
        archive.extractall(tmp_path, filter="data")
    unpacked = tmp_path / f"echoplex-{__version__}"
    # `python -m` puts the working directory first: the unpacked package is the one tested.
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", READS_THE_TREE],
        cwd=unpacked,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert re.search(r"\d+ passed", result.stdout), result.stdout[-2000:]
    assert "skipped" not in result.stdout, result.stdout[-2000:]
