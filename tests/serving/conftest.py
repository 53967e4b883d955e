"""Fixtures of the tests that talk to the session's real server."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def client(server):
    return server.client()


@pytest.fixture(scope="module")
def base_model(client) -> str:
    return client.models.list().data[0].id
