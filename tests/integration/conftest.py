"""Integration tests boot real guests: they need QEMU and the image (built by `make image`)."""
