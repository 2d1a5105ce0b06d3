"""Snapshots of the real multi-GPU captures in tests/fixtures/gpu (provenance: tests/fixtures/gpu/SOURCES.md),
parsed by the real parser, for the placement and dispatch tests. The free memory of each GPU, as the capture
prints it (read off the files, see capture_expectations.py):

- 8xA800 (nvidia, no UUIDs): MiB free 8404, 12549, 12459, 12549, 67547, 81148, 81032, 65326 (total 81920);
- 2xRTX4070Laptop-RTX5070Ti (nvidia, no UUIDs): GPU 0 "RTX 4070 Laptop GPU" 7948 MiB, GPU 1 "RTX 5070 Ti" 15799;
- 4xMI100 rocm6.0.2 (rocm, UUIDs): 34342961152 - 6750208 bytes free each;
- 6xMI100 rocm5.7.1 (rocm, no UUIDs): 34342961152 - 6782976 bytes free each.
"""

from __future__ import annotations

from tests.unit.plugins.plugin_utils.capture_expectations import EXPECTATIONS
from tests.unit.plugins.plugin_utils.test_telemetry_captures import run

MIB = 1 << 20
GIB = 1 << 30

A800 = "nvidia/csv-header-index-name-memtotal-memfree-driver-computecap-8xA800-SXM4-80GB.txt"
LAPTOP = "nvidia/csv-header-index-name-memtotal-memfree-2xRTX4070Laptop-RTX5070Ti-windows.txt"
MI100_4 = "rocm/json-pretty-telegraf-allinfo-4xMI100-rocm6.0.2.json"
MI100_6 = "rocm/json-pretty-telegraf-allinfo-6xMI100-rocm5.7.1.json"

A800_FREE_MIB = (8404, 12549, 12459, 12549, 67547, 81148, 81032, 65326)
MI100_4_FREE = 34342961152 - 6750208
MI100_6_FREE = 34342961152 - 6782976
MI100_4_UUIDS = ("0x79ccd55167a2124a", "0x4edfb117a17a07d", "0xd4a9ec48d03d261d", "0x1b9dd972253c3736")


def snapshot(capture: str) -> dict:
    """The GPU part of a snapshot as the heartbeat stores it: backend and gpus, from the real parser."""
    expect = EXPECTATIONS[capture]
    _cmd, _stdout, gpus = run(capture, expect)
    return {"backend": expect.backend, "gpus": gpus}
