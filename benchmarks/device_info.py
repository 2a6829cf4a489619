"""What a benchmark ran on: device, versions, date, and the device's peak memory bandwidth."""

from __future__ import annotations

import datetime
import importlib.metadata
import platform

import torch

# Datasheet HBM bandwidth in bytes/s, by a substring of torch.cuda.get_device_name().
PEAK_BANDWIDTH = {
    "H200": 4.8e12,
    "H100 SXM": 3.35e12,
    "H100 80GB HBM3": 3.35e12,
    "H100 PCIe": 2.0e12,
    "H100 NVL": 3.9e12,
    "A100-SXM4-80GB": 2.039e12,
    "A100 80GB PCIe": 1.935e12,
    "A100-SXM4-40GB": 1.555e12,
    "L40S": 0.864e12,
}


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu-{platform.machine()}"


def peak_bandwidth() -> float | None:
    """Peak memory bandwidth of the current CUDA device in bytes/s, or None if unknown / CPU."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((value for key, value in PEAK_BANDWIDTH.items() if key in name), None)


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment() -> dict:
    """Device, versions and date, for every results file."""
    return {
        "device": device_name(),
        "peak_bandwidth_bytes_per_s": peak_bandwidth(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "effdecode": _version("effdecode"),
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu_threads": torch.get_num_threads(),
    }


def bandwidth_report(bytes_moved: int, seconds: float) -> dict:
    """Achieved GB/s and, on a known GPU, its share of peak."""
    achieved = bytes_moved / seconds
    peak = peak_bandwidth()
    return {
        "bytes_moved": bytes_moved,
        "achieved_GBps": achieved / 1e9,
        "share_of_peak": achieved / peak if peak else None,
    }
