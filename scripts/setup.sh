#!/usr/bin/env bash
# Idempotent setup: Debian packages (when missing), then a virtualenv with the
# package and its test extras.  Safe to run again; does nothing when done.
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(qemu-system-x86 qemu-utils qemu-system-common mmdebstrap busybox-static cpio
          e2fsprogs kmod lz4 fio iperf3 passt iproute2 librsvg2-bin python3-venv ca-certificates genisoimage util-linux
          gdisk fdisk dosfstools mtools grub-common grub-pc-bin grub-efi-amd64-bin ovmf)
missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    cmd="apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ${missing[*]}"
    if [ "$(id -u)" = 0 ]; then
        echo "setup: installing ${missing[*]}"
        sh -c "$cmd"
    elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
        echo "setup: installing ${missing[*]} (sudo)"
        sudo sh -c "$cmd"
    else
        echo "setup: missing Debian packages: ${missing[*]}" >&2
        echo "setup: run as root:  $cmd" >&2
        exit 1
    fi
fi

PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
stamp="$VENV/.installed-$(sha256sum pyproject.toml | cut -c1-12)"
if [ ! -f "$stamp" ]; then
    [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
    "$VENV/bin/pip" install -q --upgrade pip >/dev/null 2>&1 || true
    "$VENV/bin/pip" install -q -e ".[test]"
    touch "$stamp"
fi
echo "setup: ok ($("$VENV/bin/python" --version), $(qemu-system-x86_64 --version | head -1))"
