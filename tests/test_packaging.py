"""Packaging: the wheel ships the Lua scripts, and ``pip install`` into a fresh venv outside the
repository gives a working library and console script.

The dev venv has the project installed in editable mode, so a bug in the wheel (Lua files left
out, the lookup in ``scripts.lua_dir()`` only working from a checkout) would never show up in
the other tests. Here the package is imported from a venv that cannot see the repository.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import venv
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from redis_batcher.embedded import RedisServer
from redis_batcher.scripts import SCRIPT_NAMES

ROOT = Path(__file__).resolve().parent.parent
LUA_DIR = ROOT / "lua"

pytestmark = pytest.mark.timeout(600)


def _lua_files() -> list[Path]:
    return sorted(LUA_DIR.glob("*.lua"))


def _clean_env(bin_dir: Path | None = None) -> dict[str, str]:
    """The environment without anything that would make the repository importable."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in {"PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV", "PYTHONSAFEPATH"}
        and not k.startswith("PYTEST_")
    }
    path = [
        p for p in env.get("PATH", "").split(os.pathsep) if p and not Path(p).resolve().is_relative_to(ROOT)
    ]
    if bin_dir is not None:
        path.insert(0, str(bin_dir))
    env["PATH"] = os.pathsep.join(path)
    env["PYTHONNOUSERSITE"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (
        f"{' '.join(cmd)} exited with {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}"
        f"\n--- stderr\n{proc.stderr[-4000:]}"
    )
    return proc


# -- the package's own code (cheap, no build) ------------------------------------------------------

# private attributes of redis-py and asyncio objects that the package once read: the library
# uses both through their public API only (they change between releases without notice)
FORBIDDEN = ("._sock", "._parser", "._reader", "._writer", "loop._ready", "._ready")


def test_the_package_uses_no_private_attribute_of_redis_py_or_asyncio() -> None:
    found = [
        f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
        for path in sorted((ROOT / "redis_batcher").rglob("*.py"))
        for n, line in enumerate(path.read_text().splitlines(), start=1)
        if any(name in line for name in FORBIDDEN)
    ]
    assert not found, "\n".join(found)


# -- the script headers (cheap, no build) --------------------------------------------------------


def _header(path: Path) -> list[str]:
    """The leading comment block of a Lua file (after its script-flags lines, if any)."""
    lines: list[str] = []
    for line in _unflagged(path).splitlines():
        if not line.startswith("--"):
            break
        lines.append(line)
    return lines


def _unflagged(path: Path) -> str:
    """A Lua file without its shebang and the comment line that gives the reason for its flags."""
    text = path.read_text()
    if text.startswith("#!"):
        text = text.split("\n", 2)[2]
    return text


def test_lua_dir_holds_every_script() -> None:
    names = {p.stem for p in _lua_files()}
    assert "_common" in names
    assert set(SCRIPT_NAMES) <= names, f"missing: {set(SCRIPT_NAMES) - names}"


SCRIPT_FILES = [p for p in _lua_files() if not p.name.startswith("_")]


@pytest.mark.parametrize("path", SCRIPT_FILES, ids=lambda p: p.name)
def test_lua_script_has_header(path: Path) -> None:
    """Each script starts with a header naming itself and listing its KEYS, ARGV and reply."""
    header = _header(path)
    text = "\n".join(header)
    assert header, f"{path.name} has no header comment"
    assert header[0].startswith(f"-- {path.name}:"), f"{path.name}: the header should start '-- {path.name}:'"
    for word in ("KEYS[", "ARGV[", "Reply"):
        assert word in text, f"{path.name}: header does not mention {word!r}"

    # every KEYS[n] / ARGV[n] the code reads is documented (ARGV[6..] documents 6 and later)
    body = _unflagged(path)[len("\n".join(header)) :]
    documented_keys = {int(n) for n in re.findall(r"^-- KEYS\[(\d+)\]", text, re.MULTILINE)}
    documented_args = {int(n) for n in re.findall(r"^-- ARGV\[(\d+)\]", text, re.MULTILINE)}
    open_ended = [int(n) for n in re.findall(r"^-- ARGV\[(\d+)\.\.\]", text, re.MULTILINE)]
    for n in sorted({int(n) for n in re.findall(r"\bKEYS\[(\d+)\]", body)}):
        assert n in documented_keys, f"{path.name} reads KEYS[{n}] but its header does not list it"
    for n in sorted({int(n) for n in re.findall(r"\bARGV\[(\d+)\]", body)}):
        assert n in documented_args or any(n >= m for m in open_ended), (
            f"{path.name} reads ARGV[{n}] but its header does not list it"
        )
    # KEYS are numbered 1..n without gaps
    assert sorted(documented_keys) == list(range(1, len(documented_keys) + 1)), path.name


@pytest.mark.parametrize("path", SCRIPT_FILES, ids=lambda p: p.name)
def test_lua_script_flags_say_why(path: Path) -> None:
    """A script with Redis 7 flags starts with the shebang, and the next line says why each flag
    is safe; allow-oom only where a call cannot grow memory by more than a bounded amount (an
    add must be refused while Redis is full)."""
    first, second = path.read_text().splitlines()[:2]
    if not first.startswith("#!"):
        assert "allow-oom" not in path.read_text()
        return
    assert first == "#!lua flags=allow-oom", first
    assert second.startswith("-- allow-oom: ") and len(second) > len("-- allow-oom: ") + 20, second
    assert path.stem in {
        "claim",
        "ack",
        "nack",
        "extend",
        "release",
        "purge",
        "delete",
        "job_extend",
        "job_release",
        "job_fail",
    }, f"{path.name} may grow memory without bound: it must not run while Redis is full"


def test_common_lua_has_header() -> None:
    header = _header(LUA_DIR / "_common.lua")
    assert header and header[0].startswith("-- _common.lua:")


# -- the wheel -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A wheel built from the working tree, the way ``pip install .`` builds it."""
    out = tmp_path_factory.mktemp("wheel")
    _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", str(ROOT), "-w", str(out)],
        cwd=out,
        env=_clean_env(),
        timeout=300,
    )
    wheels = sorted(out.glob("redis_batcher-*.whl"))
    assert len(wheels) == 1, f"expected one wheel, found {[w.name for w in out.iterdir()]}"
    yield wheels[0]


def _version(text: str) -> tuple[int, ...]:
    parts = tuple(int(p) for p in text.split("."))
    return parts + (0,) * (3 - len(parts))


def test_declared_versions_are_the_ones_ci_tests() -> None:
    """pyproject.toml declares what .ci/run tests, no more: its Python classifiers and
    requires-python are the matrix's Pythons, its ``redis>=`` bound the lowest redis-py there."""
    ci = (ROOT / ".ci" / "run").read_text()
    pyproject = (ROOT / "pyproject.toml").read_text()

    def ci_array(name: str) -> list[str]:
        found = re.search(rf"^{name}=\(([^)]*)\)", ci, re.MULTILINE)
        assert found, f".ci/run has no {name}=(...)"
        return found.group(1).split()

    pythons = ci_array("PYTHONS")
    classified = re.findall(r'"Programming Language :: Python :: (3\.\d+)"', pyproject)
    assert classified == pythons
    assert re.search(rf'^requires-python = ">={re.escape(pythons[0])}"$', pyproject, re.MULTILINE)
    (bound,) = re.findall(r'^\s*"redis>=([\d.]+)",?$', pyproject, re.MULTILINE)
    redis_py = ci_array("REDIS_PY")
    assert _version(bound) == _version(redis_py[0]) == min(map(_version, redis_py))


@pytest.mark.slow
def test_wheel_contains_lua_scripts_and_py_typed(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        assert "redis_batcher/lua/add.lua" in names
        assert "redis_batcher/lua/_common.lua" in names
        assert "redis_batcher/py.typed" in names
        for path in _lua_files():
            member = f"redis_batcher/lua/{path.name}"
            assert member in names, f"{path.name} is missing from the wheel"
            assert zf.read(member) == path.read_bytes(), f"{member} differs from lua/{path.name}"
        shipped = {n for n in names if n.endswith(".lua")}
        assert shipped == {f"redis_batcher/lua/{p.name}" for p in _lua_files()}
        # the console script is declared
        entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        assert "redis-batcher = redis_batcher.cli:main" in zf.read(entry_points).decode()
        # nothing from the test suite or the top-level lua/ path leaks into the wheel
        assert not any(n.startswith(("tests/", "lua/")) for n in names)


INSTALLED_CHECK = textwrap.dedent(
    """
    import json
    import sys
    from pathlib import Path

    url, repo = sys.argv[1], Path(sys.argv[2]).resolve()
    prefix = Path(sys.prefix).resolve()
    assert sys.prefix != sys.base_prefix, "not running inside a venv"
    assert not any(
        p and Path(p).resolve().is_relative_to(repo) for p in sys.path
    ), f"the repository is on sys.path: {sys.path}"

    import redis_batcher
    from redis_batcher import Batcher, Flush, Worker
    from redis_batcher.scripts import lua_dir

    pkg = Path(redis_batcher.__file__).resolve()
    assert pkg.is_relative_to(prefix), f"redis_batcher imported from {pkg}, not from {prefix}"
    assert not pkg.is_relative_to(repo), pkg
    lua = lua_dir().resolve()
    assert lua == pkg.parent / "lua", lua
    assert lua.is_relative_to(prefix) and not lua.is_relative_to(repo), lua

    batcher = Batcher(url, prefix="pkgcheck")
    got: list[tuple[str, int, list[object]]] = []

    @batcher.processor(name="installed", max_batch_size=3, flush_interval=None)
    def handle(flush: Flush) -> None:
        got.append((flush.batch_id, flush.sequence, list(flush.items)))

    for i in range(5):
        handle.add("order:1", {"n": i})
    handle.add("other", "x")
    assert handle.flush("order:1").flushed
    assert handle.flush("other").flushed
    stats = Worker(batcher, concurrency=2).run(burst=True)
    assert handle.status("order:1") is None and handle.status("other") is None
    batcher.close()
    print(json.dumps({
        "file": str(pkg),
        "lua_dir": str(lua),
        "version": redis_batcher.__version__,
        "delivered": stats.delivered,
        "got": sorted(got, key=lambda g: (g[0], g[1])),
    }))
    """
)


@pytest.mark.slow
def test_wheel_installs_and_works_outside_the_repo(
    wheel: Path, tmp_path: Path, redis_server: RedisServer
) -> None:
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True, clear=True).create(env_dir)
    bin_dir = env_dir / "bin"
    python = bin_dir / "python"
    env = _clean_env(bin_dir)
    env["VIRTUAL_ENV"] = str(env_dir)

    # dependencies come from the package index (pip's cache makes this fast after the first run)
    _run([str(python), "-m", "pip", "install", str(wheel)], cwd=tmp_path, env=env, timeout=300)

    script = tmp_path / "check_installed.py"
    script.write_text(INSTALLED_CHECK)
    proc = _run([str(python), str(script), redis_server.url, str(ROOT)], cwd=tmp_path, env=env, timeout=120)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(result["file"]).is_relative_to(env_dir.resolve())
    assert Path(result["lua_dir"]).is_relative_to(env_dir.resolve())
    assert result["delivered"] == 3
    assert result["got"] == [
        ["order:1", 0, [{"n": 0}, {"n": 1}, {"n": 2}]],
        ["order:1", 1, [{"n": 3}, {"n": 4}]],
        ["other", 0, ["x"]],
    ]

    # the console script
    cli = bin_dir / "redis-batcher"
    assert cli.is_file()
    help_out = _run([str(cli), "--help"], cwd=tmp_path, env=env, timeout=60)
    assert "Usage" in help_out.stdout and "worker" in help_out.stdout
    version_out = _run([str(cli), "--version"], cwd=tmp_path, env=env, timeout=60)
    assert result["version"] in version_out.stdout
    # and `python -m redis_batcher` is the same command
    module_out = _run([str(python), "-m", "redis_batcher", "--help"], cwd=tmp_path, env=env, timeout=60)
    assert "Usage" in module_out.stdout
