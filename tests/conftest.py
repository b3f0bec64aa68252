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


@pytest.fixture(scope="module")
def module_cache(session_cache_dir):
    """MOEGEN_CACHE_DIR set to the session cache for a whole test module, memo cleared around
    it (use with ``pytestmark = pytest.mark.usefixtures("module_cache")``)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("MOEGEN_CACHE_DIR", str(session_cache_dir))
    clear_memo()
    yield session_cache_dir
    mp.undo()
    clear_memo()


@pytest.fixture
def problem():
    """``problem(spec, tokens, seed=0) -> (x, logical weights)``: random, never zeros."""
    def make(spec, tokens, seed=0):
        return R.random_problem(spec, tokens, seed=seed)
    return make
