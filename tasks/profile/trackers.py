"""Trackers: context managers that fill a measurement dataclass while a block runs.

``Timer`` gives wall seconds, synchronising CUDA before each clock read. ``MemoryTracker``
gives the peak of every kind of memory the device has, each kept apart (never summed):

- ``rss_bytes``: peak resident set size of this process (CPU memory). Free heap memory is
  returned to the OS first (glibc ``malloc_trim``), then on Linux the kernel's high-water mark
  (``VmHWM``) is reset when the block starts and read when it ends, so the peak is exact;
  elsewhere RSS is sampled every ``interval`` seconds. Process-wide: nested trackers reset
  each other's mark (the outer one then falls back to its samples).
- ``cuda_allocated_bytes`` / ``cuda_reserved_bytes``: torch's caching allocator, peak bytes in
  live tensors / held from the driver (``max_memory_allocated`` / ``max_memory_reserved``,
  reset when the block starts, after emptying the cache so that an earlier block's pool does
  not count). None on CPU.
- ``nvml_process_bytes``: this process's GPU memory as the driver reports it (NVML,
  ``nvmlDeviceGetComputeRunningProcesses``; CUDA context and allocator pool included), sampled
  every ``interval`` seconds. None on CPU, or when NVML does not list this process (e.g. a
  container's PID namespace), with the reason in ``nvml_note``.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

import psutil

log = logging.getLogger(__name__)


@dataclass
class Elapsed:
    seconds: float = 0.0


class Timer:
    """Wall time of a block (``time.perf_counter``); synchronizes CUDA when it is in use."""

    def __init__(self, device: str = "cpu"):
        self.device = device
        self.result = Elapsed()

    def _sync(self) -> None:
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()

    def __enter__(self) -> Elapsed:
        self._sync()
        self._start = time.perf_counter()
        return self.result

    def __exit__(self, *exc: object) -> None:
        self._sync()
        self.result.seconds = time.perf_counter() - self._start


@dataclass
class PeakMemory:
    """Peak memory of each kind during a block; None = not measurable on this device."""

    rss_bytes: int = 0
    rss_method: str = "sampled"  # "VmHWM" (exact kernel high-water mark) | "sampled"
    cuda_allocated_bytes: int | None = None
    cuda_reserved_bytes: int | None = None
    nvml_process_bytes: int | None = None
    nvml_note: str | None = None  # why nvml_process_bytes is None on a GPU


_HWM_RESET = "/proc/self/clear_refs"


def _reset_rss_high_water_mark() -> bool:
    try:
        with open(_HWM_RESET, "w") as f:
            f.write("5")  # "5": reset the peak RSS (Linux >= 4.0, own process)
        return True
    except OSError:
        return False


def _release_free_heap() -> None:
    """Return free malloc memory to the OS (glibc ``malloc_trim``), the CPU analogue of
    ``torch.cuda.empty_cache``; a no-op elsewhere."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _rss_high_water_mark() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class MemoryTracker:
    """Peak memory of every kind measurable on ``device`` while the block runs (see module doc)."""

    def __init__(self, device: str = "cpu", interval: float = 0.02):
        self.device = device
        self.interval = interval
        self.result = PeakMemory()
        self._stop = threading.Event()
        self._process = psutil.Process()
        self._nvml: Any = None

    def _sample(self) -> None:
        rss = self._process.memory_info().rss
        self.result.rss_bytes = max(self.result.rss_bytes, rss)
        if self._nvml is not None:
            used = _nvml_process_bytes(self._nvml, os.getpid())
            if used is not None:
                self.result.nvml_process_bytes = max(self.result.nvml_process_bytes or 0, used)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> PeakMemory:
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self._nvml, self.result.nvml_note = _nvml_handle(torch.cuda.current_device())
        gc.collect()
        _release_free_heap()  # RSS then starts from live memory, not an earlier block's free chunks
        self._hwm = _reset_rss_high_water_mark()
        self._sample()
        self._thread = None
        if not self._hwm or self._nvml is not None:  # the kernel's mark needs no sampling
            try:
                self._thread = threading.Thread(target=self._run, daemon=True)
                self._thread.start()
            except RuntimeError as exc:  # e.g. no memory for a thread stack: start and end samples
                log.warning("memory sampler not started (%s); peaks from start and end only", exc)
                self._thread = None
        return self.result

    def __exit__(self, *exc: object) -> None:
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()
            self.result.cuda_allocated_bytes = torch.cuda.max_memory_allocated()
            self.result.cuda_reserved_bytes = torch.cuda.max_memory_reserved()
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()
        high_water = _rss_high_water_mark() if self._hwm else None
        if high_water is not None:
            self.result.rss_bytes = max(self.result.rss_bytes, high_water)
            self.result.rss_method = "VmHWM"
        if self._nvml is not None and self.result.nvml_process_bytes is None:
            self.result.nvml_note = f"NVML lists no process with pid {os.getpid()} (PID namespace?)"


def _nvml_handle(cuda_index: int) -> tuple[Any, str | None]:
    """The NVML handle of torch's CUDA device, matched by UUID (then PCI bus id), so that the
    two agree whatever CUDA_VISIBLE_DEVICES and CUDA_DEVICE_ORDER say."""
    try:
        import pynvml
    except ImportError:
        return None, "nvidia-ml-py is not installed"
    import torch

    try:
        pynvml.nvmlInit()
        props = torch.cuda.get_device_properties(cuda_index)
        uuid = str(getattr(props, "uuid", "") or "")
        if uuid:
            for candidate in (uuid, f"GPU-{uuid}"):
                try:
                    return pynvml.nvmlDeviceGetHandleByUUID(candidate), None
                except pynvml.NVMLError:
                    continue
        bus_id = f"{props.pci_domain_id:08x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0"
        return pynvml.nvmlDeviceGetHandleByPciBusId(bus_id), None
    except Exception as exc:  # noqa: BLE001 - NVML is optional: the figure is null, with the reason
        log.info("NVML unavailable: %s", exc)
        return None, f"NVML unavailable: {type(exc).__name__}: {exc}"


def _nvml_process_bytes(handle: Any, pid: int) -> int | None:
    import pynvml

    try:
        for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
            if proc.pid == pid and proc.usedGpuMemory is not None:
                return int(proc.usedGpuMemory)
    except pynvml.NVMLError:
        return None
    return None
