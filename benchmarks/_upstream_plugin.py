"""pytest plugin that runs chromadb's own test suite on one client class (``upstream_api.py``).

Loaded with ``-p _upstream_plugin`` (``benchmarks/`` on ``PYTHONPATH``); configured by the
environment, because it must act when it is imported, before pytest loads chromadb's conftest:

- ``SAFECHROMA_UPSTREAM_CLIENT``: ``persistent`` (``chromadb.PersistentClient``) or ``safe``
  (``safechroma.SafeClient``). Both sides get the same fixture code and a fresh directory per
  test, so the client class is the only difference between the two runs.
- ``SAFECHROMA_UPSTREAM_MAX_EXAMPLES``: if set, hypothesis's ``max_examples`` and
  ``stateful_step_count`` for the tests that do not set their own.
- ``SAFECHROMA_UPSTREAM_OUTCOMES``: a JSON file to write to: ``{"tests": {nodeid: {"outcome",
  "message"}}, "opened": {client class: how many the fixtures opened}}``.

What it changes in ``chromadb/test/conftest.py`` (imported here first, so pytest finds the
patched module in ``sys.modules`` when it loads the conftest):

- ``client``: chromadb's fixture builds a ``Client`` on a ``System`` of each configured kind;
  here it is the chosen class on a fresh persist directory (``allow_reset=True``, as chromadb's
  systems have), with the ``database_name`` chromadb parametrizes.
- ``client_factories``: the same, for the tests that build several clients on one directory:
  ``create_client(...)`` and ``create_client_from_system()`` open the chosen class on the test's
  directory; the admin client is chromadb's ``AdminClient`` on that directory in this process,
  as chromadb's own ``create_database`` function makes it from ``client.get_settings()``
  (safechroma has no admin client).
- ``pytest_itemcollected``: removed. It only appends ``[single-region]`` to node ids, through
  ``item._nodeid``, which pytest 9 no longer has (it raises ``AttributeError`` at collection).

Tests that take ``system``/``api``/``sqlite_persistent`` and build chromadb objects themselves are
left alone; with ``CHROMA_RUST_BINDINGS_TEST_ONLY=1`` (set by the runner) chromadb parametrizes
``system`` with ``rust_sqlite_ephemeral`` and ``rust_sqlite_persistent``, and this plugin
deselects the ephemeral one (a ``PersistentClient`` is a persistent Rust system).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import chromadb
import chromadb.test.conftest as upstream
import hypothesis
import pytest
from chromadb.api.client import AdminClient
from chromadb.config import DEFAULT_DATABASE, DEFAULT_TENANT, Settings

MODE = os.environ.get("SAFECHROMA_UPSTREAM_CLIENT", "persistent")
if MODE not in ("persistent", "safe"):
    raise RuntimeError(f"SAFECHROMA_UPSTREAM_CLIENT must be persistent or safe, not {MODE!r}")
OUTCOMES = os.environ.get("SAFECHROMA_UPSTREAM_OUTCOMES")

# Fewer hypothesis examples than chromadb's smallest preset (50), for its property tests.
if examples := int(os.environ.get("SAFECHROMA_UPSTREAM_MAX_EXAMPLES", "0")):
    hypothesis.settings.register_profile(
        "upstream",
        hypothesis.settings.get_profile(upstream.CURRENT_PRESET),
        max_examples=examples,
        stateful_step_count=examples,
    )
    hypothesis.settings.load_profile("upstream")


def _settings() -> Settings:
    return Settings(allow_reset=True, anonymized_telemetry=False)


# Clients the fixtures opened, by class: the runner checks that each side ran on its own class.
_opened: dict[str, int] = {}


def _open(path: str, tenant: str = DEFAULT_TENANT, database: str = DEFAULT_DATABASE) -> Any:
    if MODE == "safe":
        from safechroma import SafeClient

        c: Any = SafeClient(path, settings=_settings(), tenant=tenant, database=database)
    else:
        c = chromadb.PersistentClient(path, settings=_settings(), tenant=tenant, database=database)
    name = f"{type(c).__module__}.{type(c).__qualname__}"
    _opened[name] = _opened.get(name, 0) + 1
    return c


def _close(client: Any) -> None:
    if MODE == "safe":
        client.close()
    else:
        client.clear_system_cache()


@pytest.fixture
def upstream_dir() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="upstream-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="function")
def client(upstream_dir: str, database_name: str) -> Iterator[Any]:
    c = _open(upstream_dir, database=database_name)
    yield c
    _close(c)


class Factories:
    """chromadb's ``ClientFactories`` (conftest), on one directory and the chosen class."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._created: list[Any] = []

    def _keep(self, c: Any) -> Any:
        self._created.append(c)
        return c

    def create_client(
        self,
        tenant: str = DEFAULT_TENANT,
        database: str = DEFAULT_DATABASE,
        settings: Settings | None = None,
    ) -> Any:
        return self._keep(_open(self._path, tenant=tenant, database=database))

    def create_client_from_system(self) -> Any:
        return self._keep(_open(self._path))

    def _admin_settings(self) -> Settings:
        s = _settings()
        s.persist_directory = self._path
        s.is_persistent = True
        return s

    def create_admin_client(self, *args: Any, **kwargs: Any) -> AdminClient:
        return AdminClient(self._admin_settings())

    def create_admin_client_from_system(self) -> AdminClient:
        return AdminClient(self._admin_settings())

    def close(self) -> None:
        while self._created:
            _close(self._created.pop())
        AdminClient.clear_system_cache()


@pytest.fixture(scope="function")
def client_factories(upstream_dir: str) -> Iterator[Factories]:
    f = Factories(upstream_dir)
    yield f
    f.close()


# Replace chromadb's fixtures by ours under the same names, before pytest parses the conftest.
upstream.client = client
upstream.client_factories = client_factories
upstream.upstream_dir = upstream_dir  # type: ignore[attr-defined]
del upstream.pytest_itemcollected


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    keep: list[pytest.Item] = []
    drop: list[pytest.Item] = []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        (drop if params.get("system") == "rust_sqlite_ephemeral" else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


_results: dict[str, dict[str, str]] = {}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    entry = _results.setdefault(report.nodeid, {"outcome": "passed", "message": ""})
    if report.when == "call":
        if hasattr(report, "wasxfail"):
            outcome = "xfailed" if report.skipped else "xpassed"
        else:
            outcome = report.outcome
    elif report.failed:
        outcome = "error"
    elif report.skipped:
        outcome = "skipped"
    else:
        return
    # The first bad phase names the outcome: a failed call whose teardown also fails is "failed".
    if entry["outcome"] == "passed":
        entry["outcome"] = outcome
        crash = getattr(report.longrepr, "reprcrash", None)
        if crash is not None:
            entry["message"] = str(crash.message).splitlines()[0][:300]
        elif isinstance(report.longrepr, tuple):  # a skip: (path, line, reason)
            entry["message"] = str(report.longrepr[2])[:300]


def pytest_collectreport(report: pytest.CollectReport) -> None:
    # A module that fails to import has no tests to report; record it as one error.
    if report.failed:
        crash = getattr(report.longrepr, "reprcrash", None)
        message = crash.message if crash is not None else str(report.longrepr).splitlines()[-1]
        _results[report.nodeid] = {"outcome": "error", "message": str(message)[:300]}


def pytest_unconfigure(config: pytest.Config) -> None:
    if OUTCOMES:
        with open(OUTCOMES, "w") as f:
            json.dump({"tests": _results, "opened": _opened}, f, indent=1, sort_keys=True)
