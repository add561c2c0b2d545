"""customllm_mlx.allocator: the CLIs give MLX's CPU allocator a buffer cache as large as its
memory limit (MLX keeps 32 MiB on CPU by default), or $CUSTOMLLM_MLX_CACHE_LIMIT bytes."""

from __future__ import annotations

import mlx.core as mx
import pytest

from customllm_mlx.allocator import ENV, use_full_cpu_cache

pytestmark = pytest.mark.skipif(mx.default_device() != mx.cpu, reason="CPU allocator only")


@pytest.fixture
def restore_cache_limit():
    before = mx.set_cache_limit(32 << 20)
    mx.set_cache_limit(before)
    yield
    mx.set_cache_limit(before)


def current_limit() -> int:
    limit = mx.set_cache_limit(0)
    mx.set_cache_limit(limit)
    return limit


def test_default_is_the_memory_limit(restore_cache_limit, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    mx.set_cache_limit(32 << 20)
    assert use_full_cpu_cache() == mx.get_memory_limit()
    assert current_limit() == mx.get_memory_limit()


def test_environment_picks_the_limit(restore_cache_limit, monkeypatch):
    monkeypatch.setenv(ENV, str(1 << 30))
    assert use_full_cpu_cache() == 1 << 30
    assert current_limit() == 1 << 30
    monkeypatch.setenv(ENV, "0")  # 0: leave MLX's own setting
    mx.set_cache_limit(32 << 20)
    assert use_full_cpu_cache() is None
    assert current_limit() == 32 << 20


def test_bad_environment_value_is_named(monkeypatch):
    monkeypatch.setenv(ENV, "lots")
    with pytest.raises(ValueError, match=f"{ENV} must be a number of bytes"):
        use_full_cpu_cache()


def test_freed_buffers_are_reused(restore_cache_limit, monkeypatch):
    """With the full cache a 64 MiB buffer freed by one call serves the next one."""
    monkeypatch.delenv(ENV, raising=False)
    use_full_cpu_cache()
    x = mx.random.normal((16 << 20,))  # 64 MiB of float32
    mx.eval(x)
    mx.eval(x + 1)  # its 64 MiB result is freed at once: into the cache
    assert mx.get_cache_memory() >= x.nbytes
