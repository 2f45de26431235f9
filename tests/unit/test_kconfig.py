"""A kernel's config: the parser, where the host finds it, and the missing-driver verdicts."""

from __future__ import annotations

import gzip
import os
import subprocess
from pathlib import Path

import pytest

from pytest_virtio.channels.runners import Result
from pytest_virtio.errors import GuestError, MissingDriver
from pytest_virtio.guests.boot import check_drivers
from pytest_virtio.guests.kernel_config import image_config, read_in_guest
from pytest_virtio.images.builder import GuestImage
from pytest_virtio.images.kconfig import (
    DRIVER_SYMBOLS,
    KernelConfig,
    Tristate,
    driver_verdict,
    parse_config,
    read_config,
)
from pytest_virtio.images.kernel import KernelChoice, config_file
from pytest_virtio.spec import spec_from_kwargs

DATA = Path(__file__).parent / "data" / "kconfig"
#: Real lines of Debian bookworm's /boot/config-6.1.0-57-amd64 (see data/README.md).
DEBIAN = DATA / "debian-6.1.0-57-amd64.excerpt"
RELEASE = "6.1.0-99-test"


def test_debian_excerpt_golden() -> None:
    config = read_config(DEBIAN)
    assert config.source == str(DEBIAN)
    assert config.state("VIRTIO_BLK") is Tristate.M
    assert config.state("VIRTIO_PCI_LEGACY") is Tristate.Y
    assert config.state("IKCONFIG") is Tristate.N and "IKCONFIG" in config
    assert config["CC_VERSION_TEXT"] == "gcc-12 (Debian 12.2.0-14+deb12u1) 12.2.0"
    assert config["LOCALVERSION"] == "" and config["DEFAULT_HOSTNAME"] == "(none)"
    assert config["HZ"] == 250 and config["PHYSICAL_START"] == 0x1000000
    assert config.matching("virtio_pci") == {
        "VIRTIO_PCI_LIB": Tristate.M, "VIRTIO_PCI_LIB_LEGACY": Tristate.M,
        "VIRTIO_PCI": Tristate.M, "VIRTIO_PCI_LEGACY": Tristate.Y}
    assert len(config) == sum(1 for line in DEBIAN.read_text().splitlines()
                              if line.startswith("CONFIG_") or line.endswith(" is not set"))


def test_every_catalogue_driver_symbol_is_in_debians_config() -> None:
    """The table names real symbols: Debian builds every catalogue driver as a module."""
    config = read_config(DEBIAN)
    assert {m: config.state(s) for m, s in DRIVER_SYMBOLS.items()} == dict.fromkeys(
        DRIVER_SYMBOLS, Tristate.M)


def test_names_in_any_case_with_or_without_the_prefix() -> None:
    config = parse_config("CONFIG_VIRTIO_BLK=y\n", "t")
    for name in ("VIRTIO_BLK", "virtio_blk", "CONFIG_VIRTIO_BLK", "config_virtio_blk"):
        assert config.builtin(name) and config.enabled(name) and name in config
        assert config[name] is Tristate.Y
    assert not config.module("virtio_blk") and not config.missing("virtio_blk")


def test_look_alikes_are_not_the_symbol() -> None:
    config = parse_config(
        "# CONFIG_A is not set because of B\n"   # a comment, not Kconfig's line
        "#CONFIG_B is not set\n"                  # no space: a comment too
        "CONFIG_C_D=y\n"                          # C_D is not C
        "# CONFIG_E is not set\n"
        "  # a comment with CONFIG_F=y in it\n"
        "CONFIG_G\n"                              # no '=': Kconfig skips it
        "\n", "t")
    assert dict(config) == {"C_D": Tristate.Y, "E": Tristate.N}
    for name in ("A", "B", "C", "F", "G"):
        assert name not in config and config.missing(name)
    assert config.describe("E") == "CONFIG_E is not set in this kernel's config"
    assert config.describe("C") == "CONFIG_C is not in this kernel's config"


def test_crlf_escapes_and_the_last_assignment_wins() -> None:
    config = parse_config(
        'CONFIG_X=m\r\nCONFIG_S="a \\"quoted\\" \\\\ path"\r\n# CONFIG_Y is not set\r\n'
        "CONFIG_X=y\r\nCONFIG_N=-3\r\nCONFIG_WORD=abc\r\n", "t")
    assert config["X"] is Tristate.Y
    assert config["S"] == 'a "quoted" \\ path'
    assert config.state("y") is Tristate.N and "Y" in config
    assert config["N"] == -3 and config["WORD"] == "abc"


def test_config_is_immutable_and_compares_by_content() -> None:
    one = parse_config("CONFIG_A=y\n", "one")
    with pytest.raises(TypeError):
        one.symbols["A"] = Tristate.N  # type: ignore[index]
    assert one == parse_config("# comment\nCONFIG_A=y\n", "two") != parse_config("", "one")


def test_a_file_is_parsed_once_per_version(tmp_path: Path) -> None:
    path = tmp_path / ".config"
    path.write_text("CONFIG_A=m\n")
    first = read_config(path)
    assert read_config(path) is first
    path.write_text("CONFIG_A=y\nCONFIG_B=y\n")
    os.utime(path, ns=(1, 2))
    assert read_config(path).builtin("A")


# -- the three verdicts -------------------------------------------------------------------

def _modules(root: Path) -> Path:
    """A modules tree with the virtio-blk chain and an IDE root, and no AHCI."""
    root.mkdir(parents=True)
    (root / "modules.dep").write_text(
        "kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio_pci.ko\n"
        "kernel/drivers/virtio/virtio_pci.ko:\nkernel/drivers/ata/ata_piix.ko:\n"
        "kernel/drivers/scsi/sd_mod.ko:\n")
    (root / "modules.builtin").write_text("")
    return root


def _image(mods: Path, config: Path | None) -> GuestImage:
    """A user kernel's image (its modules on their own disk, as prepare() makes it)."""
    return GuestImage(key=f"k-{config}", kernel=mods / "vmlinux", rootfs=mods / "r",
                      kernel_version=RELEASE, modules_dir=mods, modules_disk=mods / "m.img",
                      config=config)


def _ahci_error(tmp_path: Path, line: str | None) -> MissingDriver:
    mods = _modules(tmp_path / "mods")
    config = None
    if line is not None:
        config = tmp_path / ".config"
        config.write_text(DEBIAN.read_text().replace("CONFIG_SATA_AHCI=m", line))
    with pytest.raises(MissingDriver) as err:
        check_drivers(_image(mods, config), spec_from_kwargs({"root_bus": "ide",
                                                               "disks": ["ahci"]}))
    assert err.value.modules == ("ahci",)
    return err.value


def test_not_set_says_rebuild(tmp_path: Path) -> None:
    err = _ahci_error(tmp_path, "# CONFIG_SATA_AHCI is not set")
    assert err.config_verdict == (
        f"CONFIG_SATA_AHCI is not set in this kernel's config ({tmp_path}/.config): "
        "rebuild the kernel with CONFIG_SATA_AHCI=m or =y")
    assert str(err).endswith(err.config_verdict)


def test_module_missing_from_the_tree_says_install_the_modules(tmp_path: Path) -> None:
    err = _ahci_error(tmp_path, "CONFIG_SATA_AHCI=m")
    assert err.config_verdict.startswith(
        f"CONFIG_SATA_AHCI=m ({tmp_path}/.config) but the ahci module is missing from the "
        f"modules tree {tmp_path}/mods")
    assert err.config_verdict in str(err)


def test_built_in_but_not_in_modules_builtin_says_the_tree_is_not_this_kernels(
        tmp_path: Path) -> None:
    err = _ahci_error(tmp_path, "CONFIG_SATA_AHCI=y")
    assert err.config_verdict.startswith(
        f"CONFIG_SATA_AHCI=y (built in) ({tmp_path}/.config) but {tmp_path}/mods/"
        "modules.builtin does not list it")


def test_a_bare_kernel_file_says_its_config_is_unknown(tmp_path: Path) -> None:
    err = _ahci_error(tmp_path, None)
    assert err.config_verdict.startswith(
        "CONFIG_SATA_AHCI unknown: the host has no config for this kernel")


def test_alternatives_each_get_their_verdict(tmp_path: Path) -> None:
    config = parse_config("CONFIG_8139CP=m\n# CONFIG_8139TOO is not set\n", "cfg")
    verdicts = [driver_verdict(m, config, tmp_path) for m in ("8139cp", "8139too")]
    assert verdicts[0].startswith("CONFIG_8139CP=m (cfg) but the 8139cp module is missing")
    assert verdicts[1].startswith("CONFIG_8139TOO is not set in this kernel's config (cfg)")
    assert driver_verdict("virtio-rng", config, tmp_path).startswith(
        "CONFIG_HW_RANDOM_VIRTIO is not in this kernel's config (cfg)")
    assert driver_verdict("not_a_catalogue_driver", config, tmp_path) == ""


def test_an_unreadable_config_does_not_hide_the_missing_driver(tmp_path: Path) -> None:
    err = _ahci_error(tmp_path, "CONFIG_SATA_AHCI=m")
    (tmp_path / ".config").unlink()
    image_config.cache_clear()
    with pytest.raises(MissingDriver, match=r"its config could not be read: cannot read the "
                                            r"kernel config .*/\.config"):
        check_drivers(_image(tmp_path / "mods", tmp_path / ".config"),
                      spec_from_kwargs({"root_bus": "ide", "disks": ["ahci"]}))
    assert err.modules == ("ahci",)


# -- where the host finds it ------------------------------------------------------------

def test_config_file_of_a_build_tree_a_packaged_kernel_and_a_bare_one(tmp_path: Path) -> None:
    tree = tmp_path / "linux"
    (tree / "arch" / "x86" / "boot").mkdir(parents=True)
    bz = tree / "arch" / "x86" / "boot" / "bzImage"
    bz.write_bytes(b"k")
    (tree / ".config").write_text("CONFIG_A=y\n")
    assert config_file(KernelChoice(tree, None), bz, RELEASE) == tree / ".config"
    # a kernel file with the modules from its build tree
    assert config_file(KernelChoice(bz, tree), bz, RELEASE) == tree / ".config"
    boot = tmp_path / "boot"
    boot.mkdir()
    (boot / f"vmlinuz-{RELEASE}").write_bytes(b"k")
    choice = KernelChoice(boot / f"vmlinuz-{RELEASE}", tmp_path)
    assert config_file(choice, choice.kernel, RELEASE) is None
    (boot / f"config-{RELEASE}").write_text("CONFIG_A=m\n")
    assert config_file(choice, choice.kernel, RELEASE) == boot / f"config-{RELEASE}"


def test_image_config_reads_the_recorded_file_and_knows_when_it_has_none(
        tmp_path: Path) -> None:
    mods = _modules(tmp_path / "mods")
    (tmp_path / ".config").write_text("CONFIG_VIRTIO_BLK=y\n")
    config = image_config(_image(mods, tmp_path / ".config"))
    assert config is not None and config.builtin("virtio_blk")
    assert image_config(_image(mods, None)) is None  # a user kernel file alone
    # the image's own kernel, but its root disk has no /boot/config-<release>
    (tmp_path / "root.img").write_bytes(b"\0" * 4096)
    own = GuestImage(key="own", kernel=mods / "vmlinux", rootfs=tmp_path / "root.img",
                     kernel_version=RELEASE, modules_dir=mods, cache=tmp_path)
    assert image_config(own) is None and not (tmp_path / f"config-{RELEASE}").exists()


class HostShell:
    """Runs the guest-side script with the host's dash: the same sh, gzip and base64;
    ``root`` moves the script's two paths under a directory of the test's."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = root

    def run(self, cmd: str, timeout: float | None = None, via: str = "console") -> Result:
        if self.root is not None:
            cmd = cmd.replace("/proc/config.gz", f"{self.root}/config.gz").replace(
                "/boot/config-", f"{self.root}/config-")
        proc = subprocess.run(["dash", "-c", cmd], capture_output=True, check=False)
        return Result(cmd, proc.returncode, proc.stdout, proc.stderr)

    def check(self, cmd: str, timeout: float | None = None, via: str = "console") -> Result:
        return self.run(cmd).check()

    def console_tail(self, lines: int = 40) -> str:
        return ""


def _host_config() -> tuple[str, str] | None:
    release = os.uname().release
    if os.access("/proc/config.gz", os.R_OK):
        return "/proc/config.gz", gzip.decompress(Path("/proc/config.gz").read_bytes()).decode()
    boot = Path(f"/boot/config-{release}")
    return (str(boot), boot.read_text()) if boot.is_file() else None


def test_the_guest_side_read_through_a_real_shell() -> None:
    """What the script sends (path, gzip, base64) decodes to the file itself; with no
    config the error says what to build or install."""
    expected = _host_config()
    if expected is None:
        with pytest.raises(GuestError, match=r"no kernel config to read: neither "
                                              r"/proc/config.gz .* CONFIG_IKCONFIG_PROC=y"):
            read_in_guest(HostShell())
        return
    config = read_in_guest(HostShell())
    assert config.source == f"{expected[0]} in the guest"
    assert config == parse_config(expected[1], "host") and len(config) > 100
    assert isinstance(config, KernelConfig)


def test_the_guest_side_read_of_boot_config_and_of_none(tmp_path: Path) -> None:
    """/boot/config-$(uname -r) when there is no /proc/config.gz; neither is a GuestError
    that says what to build or install."""
    shell = HostShell(root=tmp_path)
    with pytest.raises(GuestError, match=r"no kernel config to read: neither .*config.gz "
                                         r"\(CONFIG_IKCONFIG_PROC\) nor .*/config-.* exists; "
                                         r"build the kernel with CONFIG_IKCONFIG_PROC=y"):
        read_in_guest(shell)
    (tmp_path / f"config-{os.uname().release}").write_bytes(DEBIAN.read_bytes())
    config = read_in_guest(shell)
    assert config == read_config(DEBIAN)
    assert config.source == f"{tmp_path}/config-{os.uname().release} in the guest"


def test_numbers_read_as_kconfig_reads_them() -> None:
    """Decimal with leading zeros is base 10 (Kconfig's strtoll), hex needs 0x: neither crashes."""
    config = parse_config("CONFIG_A=010\nCONFIG_B=00\nCONFIG_C=0x1F\nCONFIG_D=-07\n", "t")
    assert (config["A"], config["B"], config["C"], config["D"]) == (10, 0, 31, -7)
