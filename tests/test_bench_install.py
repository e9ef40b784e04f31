"""`echoplex bench` as an installed package: it names the extra it lacks before starting
anything, and its reference servers and the cross-check's C source come with the wheel.

Each test runs the real command under an interpreter of its own: a virtual environment
without pip whose site-packages hold only what the test puts there (echoplex from this
checkout or from a wheel built from it, and some of the bench's dependencies, linked
from the environment running the tests).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from .procs import ROOT, echoplex, require_tool


def _origin(module: str) -> Path:
    """Where an installed module lives: its package directory, or its file."""
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin is not None, f"{module} is not installed here"
    origin = Path(spec.origin)
    return origin.parent if origin.name == "__init__.py" else origin


def _output(python: Path, code: str, cwd: Path | None = None) -> str:
    """What `python -c code` prints (stripped); it must succeed."""
    return subprocess.run(
        [python, "-c", code], cwd=cwd, capture_output=True, text=True, check=True, timeout=30
    ).stdout.strip()


def _purelib(python: Path) -> Path:
    return Path(_output(python, "import sysconfig; print(sysconfig.get_paths()['purelib'])"))


def _modules_of(distribution: str) -> tuple[str, ...]:
    """The top-level modules of an installed distribution and of everything it requires
    (extras aside), for `_environment` to link: matplotlib needs numpy, PIL and more."""
    owners: dict[str, list[str]] = {}
    for module, names in importlib.metadata.packages_distributions().items():
        for name in names:
            owners.setdefault(_canonical(name), []).append(module)
    seen: set[str] = set()
    wanted = [_canonical(distribution)]
    while wanted:
        name = wanted.pop()
        if name in seen:
            continue
        seen.add(name)
        for requirement in importlib.metadata.distribution(name).requires or []:
            if "extra ==" not in requirement:
                wanted.append(_canonical(re.split(r"[^\w.-]", requirement, maxsplit=1)[0]))
    return tuple(
        module
        for name in sorted(seen)
        for module in owners.get(name, [])
        # A namespace package (mpl_toolkits) has no one place to link; none is needed.
        if (spec := importlib.util.find_spec(module)) is not None and spec.origin is not None
    )


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _environment(path: Path, *, modules: tuple[str, ...], checkout: bool) -> Path:
    """A venv at `path` whose site-packages holds links to `modules` and, with
    `checkout`, this checkout's echoplex; its python."""
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(path)], check=True, timeout=30
    )
    python = path / "bin" / "python"
    site = _purelib(python)
    for module in modules:
        (site / _origin(module).name).symlink_to(_origin(module))
    if checkout:
        (site / "echoplex-checkout.pth").write_text(f"{ROOT}\n")
    return python


def _run(
    python: Path, *args: str, cwd: Path, timeout_s: float = 30, **env_extra: str
) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTHON")}
    return echoplex(*args, python=python, cwd=cwd, env={**env, **env_extra}, timeout_s=timeout_s)


def _importable(python: Path, module: str) -> bool:
    code = f"import importlib.util, sys; sys.exit(importlib.util.find_spec({module!r}) is None)"
    return subprocess.run([python, "-c", code], timeout=30, check=False).returncode == 0


def test_bench_names_the_extra_it_lacks_before_starting_anything(tmp_path: Path) -> None:
    python = _environment(tmp_path / "venv", modules=(), checkout=True)
    assert not _importable(python, "hdrh") and not _importable(python, "matplotlib")
    # Every run draws charts, into bench/out by default: both are needed either way.
    out = tmp_path / "out"
    for where in ((), ("--out", str(out))):
        result = _run(python, "bench", "--scenario", "smoke", *where, cwd=tmp_path)
        assert (result.returncode, result.stdout) == (2, "")
        assert result.stderr == (
            "echoplex bench: error: hdrhistogram and matplotlib are not installed: "
            "pip install 'echoplex[bench]'\n"
        )
    # Nothing was started, nor written.
    assert sorted(path.name for path in tmp_path.iterdir()) == ["venv"]


def test_a_reference_server_asked_for_by_name_needs_its_module(tmp_path: Path) -> None:
    modules = ("hdrh", "pyhdrh", *_modules_of("matplotlib"))
    python = _environment(tmp_path / "venv", modules=modules, checkout=True)
    assert not _importable(python, "uvloop")
    for args in (
        ("--models", "ref-asyncio,ref-uvloop"),
        ("--reference", "ref-uvloop", "--baselines"),
    ):
        result = _run(python, "bench", "--scenario", "smoke", *args, cwd=tmp_path)
        assert (result.returncode, result.stdout) == (2, ""), result.stderr
        assert result.stderr == (
            "echoplex bench: error: ref-uvloop needs uvloop: pip install 'echoplex[uvloop]'\n"
        )


def _wheel(tmp_path: Path) -> Path:
    """A wheel of this checkout, built from a copy of it (the build writes beside its
    sources, and others share this working tree)."""
    source = tmp_path / "source"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    shutil.copytree(ROOT / "echoplex", source / "echoplex", ignore=ignore)
    for name in ("pyproject.toml", "README.md", "LICENSE", "MANIFEST.in"):
        if (ROOT / name).exists():
            shutil.copy(ROOT / name, source / name)
    dist = tmp_path / "dist"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(dist),
            str(source),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    (wheel,) = dist.glob("echoplex-*.whl")
    return wheel


@pytest.mark.timeout(120)
def test_the_reference_servers_and_the_cross_check_run_from_a_wheel(tmp_path: Path) -> None:
    require_tool("cc")
    wheel = _wheel(tmp_path)
    names = zipfile.ZipFile(wheel).namelist()
    for script in ("socketserver_echo.py", "protocol_echo.py"):
        assert f"echoplex/bench/baselines/{script}" in names
    assert "echoplex/bench/crosscheck.c" in names  # built on first use, not shipped built
    # Every run draws its charts: matplotlib too, as `echoplex[bench]` installs it.
    modules = ("hdrh", "pyhdrh", "uvloop", *_modules_of("matplotlib"))
    python = _environment(tmp_path / "venv", modules=modules, checkout=False)
    # Installing a pure wheel is unpacking it into site-packages.
    purelib = _purelib(python)
    zipfile.ZipFile(wheel).extractall(purelib)
    # From elsewhere than the checkout, so only the wheel's echoplex can be imported.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = _run(
        python,
        *("bench", "--scenario", "smoke", "--models", "ref-socketserver", "--baselines"),
        *("--cross-check", "--duration", "0.2", "--warmup", "0.1", "--quiet"),
        cwd=elsewhere,
        timeout_s=80,
        XDG_CACHE_HOME=str(tmp_path / "cache"),
    )
    assert result.returncode == 0, result.stderr
    assert "| pingpong c=1 s=64B | ref-uvloop |" in result.stdout
    assert "| pingpong c=1 s=64B | ref-uvloop |" in result.stdout.split("### Cross-check")[1]
    assert len(list((tmp_path / "cache" / "echoplex").glob("echoplex-crosscheck-*"))) == 1
    # Its files and charts where it ran, in the default directory.
    assert {path.name for path in (elsewhere / "bench" / "out").iterdir()} >= {
        "results.json",
        "results.md",
        "smoke-latency.png",
    }
    code = "from echoplex.bench.servers import SERVERS; print(SERVERS['ref-asyncio'].argv[1])"
    where = _output(python, code, cwd=elsewhere)
    assert Path(where).is_relative_to(purelib) and Path(where).is_file()
