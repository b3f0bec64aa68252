"""Shared fixtures: private kernel caches and random problems."""

import pytest

from moegen import reference as R
from moegen.jit import clear_memo


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    """A fresh kernel cache in tmp_path (MOEGEN_CACHE_DIR) and an empty compile memo."""
    monkeypatch.setenv("MOEGEN_CACHE_DIR", str(tmp_path / "cache"))
    clear_memo()
    yield tmp_path / "cache"
    clear_memo()


@pytest.fixture(scope="session")
def session_cache_dir(tmp_path_factory):
    """One cache directory for a whole test session (compile each spec once)."""
    return tmp_path_factory.mktemp("moegen-cache")


@pytest.fixture
def problem():
    """``problem(spec, tokens, seed=0) -> (x, logical weights)``: random, never zeros."""
    def make(spec, tokens, seed=0):
        return R.random_problem(spec, tokens, seed=seed)
    return make
