"""Fixtures for the Helm chart tests; the helpers behind them are in helm_testlib.py."""

from __future__ import annotations

import pytest

from helm_testlib import (MATRIX, _chart, _find, _merged_values, _render_files, _render_objects,
                          _validate_object)


@pytest.fixture(params=sorted(MATRIX), ids=sorted(MATRIX))
def case(request) -> tuple[str, dict]:
    """One entry of the values matrix: (name, overrides)."""
    return request.param, MATRIX[request.param]


@pytest.fixture(scope="session")
def helm_chart():
    """The chart, loaded by Helm's loader."""
    return _chart()


@pytest.fixture(scope="session")
def render():
    """render(overrides) → every rendered object (NOTES.txt excluded), as dicts."""
    return _render_objects


@pytest.fixture(scope="session")
def render_files():
    """render_files(overrides) → {template path: rendered text}, NOTES.txt included."""
    return _render_files


@pytest.fixture(scope="session")
def merged_values():
    """merged_values(overrides) → the values Helm would use (defaults coalesced)."""
    return _merged_values


@pytest.fixture(scope="session")
def validate_object():
    """validate_object(obj): raises unless obj is valid for its kind (strict)."""
    return _validate_object


@pytest.fixture(scope="session")
def find():
    """find(objects, kind, name_suffix="") → the matching objects."""
    return _find
