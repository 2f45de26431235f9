"""The names a test file writes resolve from the package root, and lazily."""

from __future__ import annotations

import subprocess
import sys

import pytest

import pytest_virtio


@pytest.mark.parametrize("name", pytest_virtio.__all__)
def test_public_name_resolves(name: str) -> None:
    assert getattr(pytest_virtio, name) is not None


def test_unknown_name_is_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        pytest_virtio.Nope  # noqa: B018


def test_library_layers_import_without_pytest() -> None:
    """The spec, the backend and the guest runtime are a library: none loads pytest."""
    code = ("import sys; import pytest_virtio.guests.session, pytest_virtio.vhost_user.server; "
            "import pytest_virtio.spec; print('pytest' in sys.modules, '_pytest' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
