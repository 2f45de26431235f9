"""QEMU-facing code: process lifecycle (machine.py), accelerator probe, capabilities.

Kept as a sub-package so the only modules that spawn ``qemu-system-x86_64`` live in
one place; ``pytest_virtio.spec`` stays pure and never imports from here.
"""
