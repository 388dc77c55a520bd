"""redis_batcher.testing as a user's test suite sees it: the pytest plugin's fixtures (run in a
pytest of their own through ``pytester``) and ``drain()``."""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]

USER_TESTS = '''
from redis_batcher.testing import drain

def test_fake(rb_fake_batcher):
    got = []
    proc = rb_fake_batcher.processor(name="p", max_batch_size=2, flush_interval=60)(got.append)
    proc.add_many("a", [1, 2, 3])                  # one sealed flush, one item accumulating
    stats = drain(rb_fake_batcher)
    assert [f.items for f in got] == [[1, 2]] and stats.items == 2
    drain(rb_fake_batcher, everything=True)        # seals what accumulates too
    assert [f.items for f in got] == [[1, 2], [3]]

def test_real(rb_batcher, rb_redis_server):
    got = []
    proc = rb_batcher.processor(name="p", max_batch_size=10, flush_interval=None)(got.append)
    proc.add("a", "x")
    drain(rb_batcher, ["p"], everything=True)
    assert [f.items for f in got] == [["x"]]
    assert rb_batcher.prefix.startswith("rbtest-")
'''


def test_the_plugin_fixtures_and_drain_in_a_users_suite(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_user=USER_TESTS)
    result = pytester.runpytest_subprocess("-q")
    result.assert_outcomes(passed=2)


def test_rb_batcher_leaves_no_keys_behind(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_user='''
import redis

def test_writes(rb_batcher):
    proc = rb_batcher.processor(name="p", max_batch_size=10, flush_interval=None)(print)
    proc.add("a", 1)
    assert list(rb_batcher.client.scan_iter(match=rb_batcher.prefix + ":*"))

def test_after(rb_redis_server):
    client = redis.Redis.from_url(rb_redis_server.url)
    assert list(client.scan_iter(match="rbtest-*")) == []
'''
    )
    result = pytester.runpytest_subprocess("-q")
    result.assert_outcomes(passed=2)
