"""Shared fixtures: real peers started once per session, fresh databases per test."""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.data import ct_dir as _ct_dir
from tests.support.peers import OrthancServer, PostgresServer

# Real scanners write single-component person names; highdicom warns about each of them.
warnings.filterwarnings("ignore", message=".*unlikely to represent the intended person name.*")

_db_numbers = itertools.count(1)


@pytest.fixture(scope="session")
def ct_dir() -> Path:
    return _ct_dir()


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    server = PostgresServer().start()
    yield server
    server.cleanup()


@pytest.fixture
def postgres_url(postgres: PostgresServer) -> str:
    """A fresh, empty PostgreSQL database for one test."""
    return postgres.create_database(f"t{next(_db_numbers)}")


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    server = OrthancServer(tmp_path_factory.mktemp("orthanc")).start()
    yield server
    server.stop()


@pytest.fixture
def orthanc_factory(tmp_path: Path) -> Iterator:
    """Start extra Orthanc servers owned by one test (e.g. to stop and restart one)."""
    started: list[OrthancServer] = []

    def make() -> OrthancServer:
        server = OrthancServer(tmp_path / f"orthanc{len(started)}").start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()
