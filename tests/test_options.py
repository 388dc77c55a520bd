"""The keywords of ``Batcher.processor``, spelled once in :class:`redis_batcher.options.ProcessorOptions`:
every option becomes a config field, its default is the config's, an unknown keyword is refused
at run time as by any function and by a type checker, for the sync and the asyncio batcher."""

from __future__ import annotations

import dataclasses
import textwrap
from pathlib import Path

import pytest

import redis_batcher as rb
import redis_batcher.asyncio as aio
from redis_batcher.models import ProcessorConfig
from redis_batcher.options import PROCESSOR_OPTIONS, ProcessorOptions, processor_options


def test_every_option_is_a_config_field() -> None:
    assert list(PROCESSOR_OPTIONS) == list(ProcessorOptions.__annotations__)
    assert list(PROCESSOR_OPTIONS) == [f.name for f in dataclasses.fields(ProcessorConfig)]


def test_the_config_defaults_are_the_options_defaults() -> None:
    """A registry entry written without a field reads as a processor defined without it."""
    checked = processor_options({})
    for f in dataclasses.fields(ProcessorConfig):
        if f.default is not dataclasses.MISSING:
            assert checked[f.name] == f.default, f.name


def test_a_processor_without_options_gets_the_defaults() -> None:
    batcher = rb.Batcher.definitions_only()
    proc = batcher.processor(name="p")(lambda flush: None)
    checked = processor_options({"name": "p"})
    assert proc.config == ProcessorConfig(**{**checked, "codec": "msgpack"})
    assert proc.config.retention == 7 * 86400.0 and proc.config.dead_letter_ttl == 180 * 86400.0


def test_an_unknown_keyword_is_a_type_error() -> None:
    batcher = rb.Batcher.definitions_only()
    with pytest.raises(TypeError, match="unexpected keyword argument 'max_batch_sise'"):
        batcher.processor(max_batch_sise=3)  # type: ignore[call-overload]
    with pytest.raises(TypeError, match="unexpected keyword argument 'max_batch_sise'"):
        aio.Batcher(definitions=batcher).processor(max_batch_sise=3)  # type: ignore[call-overload]
    assert batcher.processors == {}


@pytest.mark.slow
def test_a_type_checker_knows_the_keywords(tmp_path: Path) -> None:
    api = pytest.importorskip("mypy.api")
    source = tmp_path / "typo.py"
    source.write_text(
        textwrap.dedent(
            """
            import redis_batcher
            import redis_batcher.asyncio as aio

            batcher = redis_batcher.Batcher.definitions_only()
            batcher.processor(max_batch_size=3, ordered=True)
            batcher.processor(max_batch_sise=3)
            aio.Batcher(definitions=batcher).processor(max_batch_sise=3)
            batcher.processor(max_batch_size="3")
            """
        )
    )
    out, _, status = api.run(
        ["--strict", "--no-incremental", "--cache-dir", str(tmp_path / "cache"), str(source)]
    )
    errors = [line for line in out.splitlines() if ": error:" in line]
    assert status == 1 and len(errors) == 3, out
    assert [line.split(":")[1] for line in errors] == ["7", "8", "9"], out
    assert 'Unexpected keyword argument "max_batch_sise"' in errors[0], out
