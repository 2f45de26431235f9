"""User image recipes: extends a shipped one, and every error names the file and the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_virtio.errors import ConfigError
from pytest_virtio.images import recipe as recipe_mod
from pytest_virtio.images.recipe import load_recipe, load_recipe_file


def _recipe(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "mine.toml"
    path.write_text(text)
    return path


def test_extends_adds_packages_and_gets_its_own_key(tmp_path: Path) -> None:
    base = load_recipe("bookworm")
    mine = load_recipe(str(_recipe(tmp_path, 'extends = "bookworm"\nname = "mine"\n'
                                              'packages = ["nvme-cli"]\nsuite = "trixie"\n')))
    assert mine.packages == (*base.packages, "nvme-cli")
    assert mine.suite == "trixie" and mine.path_exclude == base.path_exclude
    assert mine.key().startswith("mine-") and mine.key() != base.key()


@pytest.mark.parametrize("text, field, words", [
    ('extends = "bookworm"\nname = "x"\npakages = ["a"]', "pakages", "unknown field"),
    ('extends = "bookworm"\nname = "x"\npackages = "nvme-cli"', "'packages'", "must be a list"),
    ('extends = "bookworm"\nname = "x"\npackages = ["Bad Name"]', "'packages'",
     "not a Debian package name"),
    ('extends = "bullseye"\nname = "x"', "'extends'", "not a shipped recipe"),
    ('extends = "bookworm"\nname = "x"\nvariant = "tiny"', "'variant'", "minbase"),
    ('extends = "bookworm"\nname = "x"\nrootfs_size = "big"', "'rootfs_size'", "like 1536M"),
    ('extends = "bookworm"\nname = "a b"', "'name'", "cache directory"),
    ('name = "x"\nsuite = "trixie"', "packages", "missing field"),
    ('name = "x"\nsuite = "trixie"\npackages = ["fio"]', "'packages' lacks",
     "busybox-static, kmod, iproute2, dropbear-bin, a linux-image-* kernel"),
    ('name = "x"\nsuite = "a" "b"', "cannot read image recipe", "line 2"),
])
def test_errors_name_the_field(tmp_path: Path, text: str, field: str, words: str) -> None:
    path = _recipe(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_recipe_file(path)
    assert str(path) in str(err.value) and field in str(err.value) and words in str(err.value)


def test_distro_boot_recipe_ships_its_console_service() -> None:
    distro = load_recipe("bookworm-distro")
    assert distro.boot == "distro"
    assert [name for name, _ in distro.files] == ["pvinit", "pv-ssh", "pv-shell", "pv-console",
                                                   "pytest-virtio-console.service"]
    assert load_recipe("bookworm").boot == "ours"


def test_boot_field_is_checked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError,
                       match=r"field 'boot': 'grub' is not one of ours, distro, firmware"):
        load_recipe_file(_recipe(tmp_path, 'extends = "bookworm"\nname = "x"\nboot = "grub"'))


def test_firmware_recipe_ships_nothing_of_ours_but_cloud_inits_datasources(
        monkeypatch: pytest.MonkeyPatch) -> None:
    cloud = load_recipe("bookworm-cloud")
    assert cloud.boot == "firmware"
    assert [name for name, _ in cloud.files] == ["cloud-init.cfg"]
    assert b"datasource_list: [NoCloud, None]" in cloud.files[0][1]
    assert not {"busybox-static", "dropbear-bin"} & set(cloud.packages)
    # the disk's assembly is part of its key (and only of firmware recipes' keys)
    before, distro = cloud.key(), load_recipe("bookworm-distro").key()
    monkeypatch.setattr(recipe_mod, "DISK_BUILDER_VERSION", "changed")
    assert cloud.key() != before and load_recipe("bookworm-distro").key() == distro


def test_firmware_recipe_needs_a_kernel_and_initramfs_tools(tmp_path: Path) -> None:
    text = 'name = "x"\nsuite = "bookworm"\nboot = "firmware"\npackages = ["systemd"]'
    with pytest.raises(ConfigError, match=r"lacks initramfs-tools, a linux-image-\* kernel: "
                                          "the bootloader loads"):
        load_recipe_file(_recipe(tmp_path, text))
