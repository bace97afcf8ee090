"""Shared pytest fixtures."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest


def shared_data_root() -> Path:
    """Where the real data lives: ``$CXRSERVE_SHARED_DATA`` or ``<repo>/../shared/data``."""
    env = os.environ.get("CXRSERVE_SHARED_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real data folder; skips the test when it is absent (a user's fresh machine)."""
    root = shared_data_root()
    if not root.is_dir():
        pytest.skip(f"shared data not found at {root}")
    return root


REPO = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def module_tmp(request, tmp_path_factory):
    """``module_tmp("name")`` -> a fresh folder for one module's fixtures, removed when the
    module ends with no failed test (store copies and archives run to GBs per module; a
    failure keeps them for a look)."""
    made: list[Path] = []
    failed_before = request.session.testsfailed

    def make(name: str) -> Path:
        made.append(tmp_path_factory.mktemp(name))
        return made[-1]

    yield make
    if request.session.testsfailed == failed_before:
        for path in made:
            shutil.rmtree(path, ignore_errors=True)


def store_dir() -> Path:
    """The model store under test: ``$CXRSERVE_STORE`` or the repository's ``model_store``."""
    return Path(os.environ.get("CXRSERVE_STORE", REPO / "model_store"))


@pytest.fixture(scope="session")
def model_store() -> Path:
    """The default model store, built (incrementally, as ``make store`` does) if needed."""
    from cxrserve.packaging.store import StoreBuilder

    store = store_dir()
    if "CXRSERVE_STORE" not in os.environ:
        StoreBuilder(store, REPO / "build", progress=False).build()
    return store


@pytest.fixture(scope="session")
def unpacked(model_store, tmp_path_factory):
    """``unpacked("cxr-triage")`` -> folder of that archive, extracted once per session."""
    from cxrserve.core.files import unpack_archive

    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            mar = model_store / f"{name}.mar"
            if not mar.exists():
                pytest.fail(f"{mar} missing from the model store")
            cache[name] = unpack_archive(mar, tmp_path_factory.mktemp(name))
        return cache[name]

    return get


@pytest.fixture(scope="session")
def pipeline(unpacked):
    """``pipeline("cxr-triage")`` -> the served pipeline loaded in process (CPU), cached."""
    from cxrserve.core.loading import load_pipeline

    cache = {}

    def get(name: str, **config):
        key = (name, tuple(sorted(config.items())))
        if key not in cache:
            cache[key] = load_pipeline(unpacked(name), device="cpu", config=config or None)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def served(model_store, tmp_path_factory):
    """One TorchServe over the default store, on free loopback ports, for the whole session."""
    from cxrserve.tools import server
    from tsutil import start_torchserve

    from site_fixture import write_sites

    workdir = tmp_path_factory.mktemp("torchserve")
    # Its workers serve two test site profiles (tests/test_site_serving.py); without a default
    # site every other request is answered as without sites.
    sites = write_sites(tmp_path_factory.mktemp("sites"), model_store)
    try:
        info = start_torchserve(model_store, workdir, extra_env={"CXRSERVE_SITES": str(sites)})
    except Exception:
        server.stop(workdir)
        raise
    yield info
    server.stop(workdir)
