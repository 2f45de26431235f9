"""Your packages: a user recipe extending the shipped one with nvme-cli builds, boots and runs it.

The one image build this suite pays for (~1 min, cached per machine like the
default image): the inner run gets only --virtio-image=<recipe>.
"""

from __future__ import annotations

import pytest

from pytest_virtio.guests.session import VirtioSession
from pytest_virtio.images.builder import image_dir
from pytest_virtio.images.recipe import load_recipe

RECIPE = '''# a user recipe: the shipped bookworm image plus one package
extends = "bookworm"
name = "bookworm-nvmecli"
packages = ["nvme-cli"]
'''

INNER = '''
import pytest


@pytest.mark.vm(disks=[dict(name="nv", bus="nvme", size="16M", serial="pvnvme1")])
def test_nvme_cli_runs(guest):
    assert "nvme version" in guest.check("nvme version").stdout
    listing = guest.check("nvme list -o json").stdout
    assert "pvnvme1" in listing, listing
'''


def test_user_recipe_adds_a_package(
    pytester: pytest.Pytester, virtio_session: VirtioSession, monkeypatch: pytest.MonkeyPatch,
) -> None:
    cache = virtio_session.settings.cache_dir
    monkeypatch.setenv("PYTEST_VIRTIO_CACHE", str(cache))
    recipe = pytester.path / "nvmecli.toml"
    recipe.write_text(RECIPE)
    pytester.makepyfile(test_recipe=INNER)
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", f"--virtio-accel={virtio_session.accel().accel}",
        f"--virtio-image={recipe}", "-q", timeout=1200,
    )
    result.assert_outcomes(passed=1)
    built = image_dir(load_recipe(str(recipe)), cache)
    assert built.name.startswith("bookworm-nvmecli-") and (built / "manifest.json").is_file()
