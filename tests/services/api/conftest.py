"""Fixtures for the API's unit tests: an app over the fakes in ``api_fakes``, closed after each test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from api_fakes import Api, make_api


@pytest.fixture()
def api(tmp_path: Path) -> Iterator[Api]:
    a = make_api(tmp_path)
    yield a
    a.state.close()
