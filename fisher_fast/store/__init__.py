"""The tiered (device, host, disk) store of per-unit contributions."""
