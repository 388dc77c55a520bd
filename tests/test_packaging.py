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
import shutil
import subprocess
import sys
import textwrap
import venv
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from redis_batcher.scripts import (
    INCLUDES,
    JOB_SCRIPT_NAMES,
    SCRIPT_NAMES,
    IncludeError,
    Includes,
    ScriptTable,
    parse_includes,
    scripts,
)
from redis_batcher.testing import RedisServer

ROOT = Path(__file__).resolve().parent.parent
LUA_DIR = ROOT / "lua"
INCLUDE_DIR = LUA_DIR / INCLUDES

pytestmark = pytest.mark.timeout(600)


def _lua_files() -> list[Path]:
    """The scripts (``lua/*.lua``)."""
    return sorted(LUA_DIR.glob("*.lua"))


def _include_files() -> list[Path]:
    """The include files (``lua/includes/*.lua``)."""
    return sorted(INCLUDE_DIR.glob("*.lua"))


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
    assert names == {*SCRIPT_NAMES, *JOB_SCRIPT_NAMES}, names ^ {*SCRIPT_NAMES, *JOB_SCRIPT_NAMES}
    assert _include_files()
    assert {p.parent for p in LUA_DIR.rglob("*.lua")} == {LUA_DIR, INCLUDE_DIR}


SCRIPT_FILES = _lua_files()


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
        "pause",
        "job_extend",
        "job_release",
        "job_fail",
    }, f"{path.name} may grow memory without bound: it must not run while Redis is full"


# -- the include files (cheap, no build) ---------------------------------------------------------


@pytest.mark.parametrize("path", _include_files(), ids=lambda p: p.name)
def test_include_file_has_header(path: Path) -> None:
    """Each include file starts with a comment saying what it provides (its name first), then
    its own include lines; it has no shebang (only a script's first line can carry one)."""
    first = path.read_text().splitlines()[0]
    assert first.startswith(f"-- {path.name}: ") and len(first) > len(f"-- {path.name}: ") + 10, first
    header = _header(path)
    includes = [n for n, line in enumerate(header) if line.startswith("--- @include")]
    # the include lines end the header, with nothing between them
    assert includes == list(range(len(header) - len(includes), len(header))), path.name


@pytest.mark.parametrize("path", SCRIPT_FILES, ids=lambda p: p.name)
def test_script_includes_follow_its_header(path: Path) -> None:
    """A script's include lines come right after its header comment (and its shebang lines),
    then a blank line and the code."""
    lines = _unflagged(path).splitlines()
    at = [n for n, line in enumerate(lines) if line.startswith("--- @include")]
    if not at:
        return
    assert at == list(range(at[0], at[-1] + 1)), f"{path.name}: the include lines are not together"
    assert all(line.startswith("-- ") or line == "--" for line in lines[: at[0]]), path.name
    assert lines[at[-1] + 1] == "", f"{path.name}: a blank line should follow the include lines"


def _code(text: str) -> str:
    """Lua text without its comments and the contents of its string literals."""
    text = re.sub(r"--[^\n]*", "", text)
    text = re.sub(r"'(?:[^'\\\n]|\\.)*'", "''", text)
    return re.sub(r'"(?:[^"\\\n]|\\.)*"', '""', text)


def _defined(text: str) -> list[str]:
    """The names a Lua file defines at its top level: its local functions and its local values."""
    names = re.findall(r"^local function (\w+)\(", text, re.MULTILINE)
    for found in re.findall(r"^local (\w+(?:, \w+)*) =", text, re.MULTILINE):
        names.extend(found.split(", "))
    return names


def _providers() -> dict[str, str]:
    """Each name an include file defines -> that include file's name."""
    out: dict[str, str] = {}
    for path in _include_files():
        for name in _defined(path.read_text()):
            assert name not in out, f"{name} is defined in both {out[name]}.lua and {path.name}"
            out[name] = path.stem
    return out


def _all_lua_files() -> list[Path]:
    return [*_lua_files(), *_include_files()]


@pytest.mark.parametrize("path", _all_lua_files(), ids=lambda p: str(p.relative_to(LUA_DIR)))
def test_include_lines_name_existing_files(path: Path) -> None:
    names, _ = parse_includes(path.read_text(), path.name)
    for name in names:
        assert (INCLUDE_DIR / f"{name}.lua").is_file(), f'{path.name} includes "{name}": no such file'


def test_every_include_file_is_used_by_a_script() -> None:
    includes = Includes(INCLUDE_DIR)
    used: set[str] = set()
    for path in _lua_files():
        names, _ = parse_includes(path.read_text(), path.name)
        used.update(includes.resolve(names, path.name))
    assert {p.stem for p in _include_files()} - used == set()


@pytest.mark.parametrize("path", _all_lua_files(), ids=lambda p: str(p.relative_to(LUA_DIR)))
def test_file_includes_exactly_what_it_calls(path: Path) -> None:
    """A script or include file includes each file that defines a helper (or constant) it uses,
    and no other: nothing is linked in that is never called, nothing is called that it does not
    include (a plain text check: comments and string literals left out)."""
    providers = _providers()
    names, text = parse_includes(path.read_text(), path.name)
    own = set(_defined(text))
    words = set(re.findall(r"\b\w+\b", _code(text)))
    needed = {providers[w] for w in words if w in providers and w not in own}
    assert not needed - set(names), f"{path.name} uses helpers it does not include: {needed - set(names)}"
    assert not set(names) - needed, f"{path.name} includes what it never uses: {set(names) - needed}"


@pytest.mark.parametrize("name", [*SCRIPT_NAMES, *JOB_SCRIPT_NAMES])
def test_assembled_script_links_each_helper_once_before_its_use(name: str) -> None:
    """In the source sent to Redis each helper (or constant) is defined once and before its
    first use, each helper linked in is called, and each one used is linked in."""
    providers = _providers()
    lines = _code(scripts().scripts[name].plain.source).splitlines()
    defined: dict[str, int] = {}  # name -> the line that defines it
    used: dict[str, int] = {}  # name -> the first line that uses it (its definition left out)
    for n, line in enumerate(lines):
        own = _defined(line)
        for word in own:
            assert word not in defined, f"{name}.lua: {word} is defined twice"
            defined[word] = n
        for word in set(re.findall(r"\b\w+\b", line)) - set(own):
            used.setdefault(word, n)
    for helper in re.findall(r"^local function (\w+)\(", "\n".join(lines), re.MULTILINE):
        assert helper in used, f"{name}.lua: {helper} is linked in but never called"
    for word, n in used.items():
        if word in providers:
            assert word in defined, f"{name}.lua uses {word} ({providers[word]}.lua) but does not link it"
            assert defined[word] < n, f"{name}.lua: {word} is used before it is defined"


def _write(directory: Path, files: dict[str, str]) -> Includes:
    directory.mkdir(exist_ok=True)
    for name, text in files.items():
        (directory / f"{name}.lua").write_text(text)
    return Includes(directory)


def test_includes_resolve_dependencies_first_each_once(tmp_path: Path) -> None:
    includes = _write(
        tmp_path / "includes",
        {
            "a": "-- a.lua: a\nlocal function a() return 1 end\n",
            "b": '-- b.lua: b\n--- @include "a"\n\nlocal function b() return a() end\n',
            "c": '-- c.lua: c\n--- @include "a"\n\nlocal function c() return a() end\n',
            "d": '-- d.lua: d\n--- @include "c"\n--- @include "b"\n\nlocal function d() return b(), c() end',
        },
    )
    assert includes.resolve(["d"], "s.lua") == ["a", "c", "b", "d"]
    assert includes.resolve(["b", "d"], "s.lua") == ["a", "b", "c", "d"]
    source = includes.assemble('-- s.lua: s\n--- @include "d"\n\nreturn d()', "s.lua")
    assert source.count("local function a()") == 1
    assert [source.index(f"local function {n}()") for n in "acbd"] == sorted(
        source.index(f"local function {n}()") for n in "acbd"
    )
    assert source.startswith("-- s.lua: s\n\n-- a.lua: a") and source.endswith("\n\nreturn d()")
    assert "@include" not in source


def test_unknown_cyclic_or_malformed_includes_are_refused(tmp_path: Path) -> None:
    includes = _write(
        tmp_path / "includes",
        {
            "a": '-- a.lua: a\n--- @include "b"\n',
            "b": '-- b.lua: b\n--- @include "c"\n',
            "c": '-- c.lua: c\n--- @include "a"\n',
            "d": '-- d.lua: d\n--- @include "nope"\n',
        },
    )
    with pytest.raises(IncludeError, match=r"s\.lua: the includes form a cycle: a -> b -> c -> a"):
        includes.assemble('--- @include "a"\nreturn 1', "s.lua")
    with pytest.raises(IncludeError, match=r'includes/d\.lua includes "nope", but there is no .*nope\.lua'):
        includes.assemble('--- @include "d"\nreturn 1', "s.lua")
    with pytest.raises(IncludeError, match=r's\.lua includes "nope"'):
        includes.assemble('--- @include "nope"\nreturn 1', "s.lua")
    for line in ("--- @include nope", '--- @include "no-pe"', '--- @include "a.lua"', '--- @include  "a"'):
        with pytest.raises(IncludeError, match="expected --- @include"):
            includes.assemble(f"{line}\nreturn 1", "s.lua")
    with pytest.raises(IncludeError, match="included twice"):
        includes.assemble('--- @include "a"\n--- @include "a"\nreturn 1', "s.lua")


def test_a_bad_include_stops_the_script_table_from_loading(tmp_path: Path) -> None:
    """An include that cannot be resolved is found when the scripts are loaded, not when one
    of them first runs."""
    lua = tmp_path / "lua"
    shutil.copytree(LUA_DIR, lua)
    purge = lua / "purge.lua"
    purge.write_text(purge.read_text().replace('--- @include "wrong_type"', '--- @include "wrong_typo"'))
    with pytest.raises(IncludeError, match=r'purge\.lua includes "wrong_typo"'):
        ScriptTable(lua)
    assert ScriptTable(LUA_DIR).scripts["purge"].source == scripts().scripts["purge"].source


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
        assert "redis_batcher/lua/includes/now_ms.lua" in names
        assert "redis_batcher/py.typed" in names
        expected = {f"redis_batcher/lua/{p.relative_to(LUA_DIR).as_posix()}": p for p in _all_lua_files()}
        for member, path in expected.items():
            assert member in names, f"{path.relative_to(ROOT)} is missing from the wheel"
            assert zf.read(member) == path.read_bytes(), f"{member} differs from {path.relative_to(ROOT)}"
        shipped = {n for n in names if n.endswith(".lua")}
        assert shipped == set(expected)
        # the console script is declared
        entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        assert "redis-batcher = redis_batcher.cli:main" in zf.read(entry_points).decode()
        # the web dashboard's templates and static files (redis_batcher/dashboard_assets)
        assets = ROOT / "redis_batcher" / "dashboard_assets"
        wanted = {f"redis_batcher/{p.relative_to(assets.parent).as_posix()}" for p in assets.rglob("*.*")}
        assert {"redis_batcher/dashboard_assets/templates/base.html"} < wanted
        assert {"redis_batcher/dashboard_assets/static/dashboard.js"} < wanted
        assert wanted <= names, sorted(wanted - names)
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
