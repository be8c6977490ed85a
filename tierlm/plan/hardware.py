"""What the machine has: GPUs, RAM, disk and their bandwidths — detected, declared, or both.

Detected: GPUs from ``nvidia-smi`` (no torch import, no CUDA context), RAM from ``/proc/meminfo``, and the disk's
read speed measured once on the model's disk (a short O_DIRECT read, or a buffered read after dropping the file's
cached pages) and cached in ``$TIERLM_CACHE/disk.json`` (default ``~/.cache/tierlm``).

Declared: strings a user types — ``--gpus 4x22GiB`` / ``22GiB,22GiB,11GiB`` / ``0``, ``--ram 128GiB``,
``--disk-gbps 3.5`` (GB/s, 10⁹ bytes per second) and ``--gpu-gbps`` / ``--pcie-gbps`` / ``--ram-gbps``. A declared
value replaces the detected one; what is neither declared nor detected comes from a default, and every default
used is written into ``Hardware.assumptions`` so the plan says which numbers are guesses.

Bandwidths here are *measured-copy* figures (what a bandwidth benchmark reaches); the cost model applies kernel
efficiencies on top of them.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import re
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from tierlm.paths import cache_dir
from tierlm.errors import TierlmError

GB = 10**9
GiB = 2**30


class PlanError(TierlmError, ValueError):
    """A hardware description, routing profile or plan file is malformed."""


# ---- GPU classes ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GPUClass:
    """Published figures of a GPU model: memory bandwidth (GB/s), dense fp16 tensor TFLOP/s with fp32
    accumulation (what cuBLAS uses for torch fp16 matmuls), and the PCIe generation of its slot."""

    match: str
    mem_gbps: float
    fp16_tflops: float
    pcie_gen: int


# First match wins, so the more specific names come first. Spec sheets, not measurements.
GPU_CLASSES = (
    GPUClass("H200", 4800, 989, 5), GPUClass("H100 PCIe", 2000, 756, 5), GPUClass("H100 NVL", 3900, 835, 5),
    GPUClass("H100", 3350, 989, 5), GPUClass("H800", 3350, 989, 5), GPUClass("GH200", 4000, 989, 5),
    GPUClass("B200", 8000, 2250, 6), GPUClass("A100-SXM4-80GB", 2039, 312, 4), GPUClass("A100 80GB", 1935, 312, 4),
    GPUClass("A100", 1555, 312, 4), GPUClass("A800", 2039, 312, 4), GPUClass("L40S", 864, 362, 4),
    GPUClass("L40", 864, 181, 4), GPUClass("L4", 300, 121, 4), GPUClass("A10", 600, 125, 4),
    GPUClass("RTX 6000 Ada", 960, 364, 4), GPUClass("RTX A6000", 768, 155, 4), GPUClass("RTX 5090", 1792, 210, 5),
    GPUClass("RTX 4090", 1008, 165, 4), GPUClass("RTX 3090", 936, 71, 4), GPUClass("RTX 3080", 760, 60, 4),
    GPUClass("RTX 2080 Ti", 616, 54, 3), GPUClass("TITAN RTX", 672, 130, 3), GPUClass("Quadro RTX 8000", 672, 130, 3),
    GPUClass("V100", 900, 125, 3), GPUClass("T4", 320, 65, 3),
)
# By compute capability when the name is unknown (one typical card of each generation).
_BY_ARCH = {"7.0": "V100", "7.5": "RTX 2080 Ti", "8.0": "A100", "8.6": "RTX 3090", "8.9": "RTX 4090",
            "9.0": "H100", "10.0": "B200"}
# A GPU declared only by its memory is assumed to be the project's reference card (DESIGN.md): RTX 2080 Ti class.
DEFAULT_GPU_CLASS = "RTX 2080 Ti"

COPY_FRACTION = 0.88          # a copy benchmark reaches ~88% of the spec bandwidth (H200: 4.24 of 4.8 TB/s, PEERS.md)
PCIE_LANE_GBPS = {1: 0.25, 2: 0.5, 3: 0.985, 4: 1.969, 5: 3.938, 6: 7.563}
PCIE_EFFICIENCY = 0.8         # pinned host→device copies reach ~80% of the link rate (PCIe 3.0 x16: ~12.6 GB/s)
DEFAULT_RAM_GBPS = 40.0       # multi-threaded read of dual/quad-channel DDR4; measure and pass --ram-gbps
DEFAULT_DISK_GBPS = 3.0       # a PCIe 3.0 NVMe SSD's sequential read
CPU_GFLOPS_PER_CORE = 30.0    # fp32 FMA with AVX2 at ~60% of peak, per physical core


def gpu_class(name: str | None, compute_cap: str | None = None) -> tuple[GPUClass, bool]:
    """The class of a GPU by name (then compute capability); the bool is False when it is a default guess."""
    if name:
        for c in GPU_CLASSES:
            if c.match.lower() in name.lower():
                return c, True
    default = _BY_ARCH.get(compute_cap or "", DEFAULT_GPU_CLASS)
    return next(c for c in GPU_CLASSES if c.match == default), False


@dataclass(frozen=True)
class GPU:
    name: str
    memory_bytes: int           # what tierlm may use: the card's free memory, or the declared size
    total_bytes: int
    mem_gbps: float             # measured-copy memory bandwidth
    pcie_gbps: float            # host→device copy bandwidth
    fp16_tflops: float
    compute_cap: str | None = None


@dataclass(frozen=True)
class Hardware:
    gpus: tuple[GPU, ...]
    ram_bytes: int              # RAM tierlm may use (declared, or MemAvailable)
    ram_total_bytes: int
    ram_gbps: float
    disk_gbps: float
    cpu_cores: int
    cpu_gflops: float
    source: str = "declared"    # "detected", "declared" or "detected+declared"
    assumptions: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict:
        d = asdict(self)
        d["gpus"] = [asdict(g) for g in self.gpus]
        d["assumptions"] = list(self.assumptions)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Hardware:
        try:
            return cls(**{**d, "gpus": tuple(GPU(**g) for g in d["gpus"]),
                          "assumptions": tuple(d.get("assumptions", ()))})
        except (TypeError, KeyError) as e:
            raise PlanError(f"plan file: 'hardware' is malformed ({e})") from None


# ---- parsing declared values -------------------------------------------------------------------------------------
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str, what: str = "size") -> int:
    """``"22GiB"`` → bytes. GiB/MiB/TiB are binary, GB/MB/TB decimal; a bare ``G`` means GiB (as ``free -g``)."""
    m = _SIZE.match(str(text))
    if not m:
        raise PlanError(f"{what} {text!r} is not a size; write e.g. 22GiB, 128GiB or 1.5TB")
    number, unit = float(m[1]), m[2].lower()
    if not unit:
        raise PlanError(f"{what} {text!r} has no unit; write e.g. {m[1]}GiB")
    if unit not in _UNITS:
        raise PlanError(f"{what} {text!r} has an unknown unit {m[2]!r}; use GiB, MiB, TiB, GB, MB or TB")
    size = int(number * _UNITS[unit])
    if size <= 0:
        raise PlanError(f"{what} {text!r} must be more than zero")
    return size


def parse_gpus(text: str) -> list[int]:
    """``"4x22GiB"``, ``"22GiB,22GiB,11GiB"``, ``"2x24GiB,11GiB"`` → per-GPU bytes; ``"0"`` / ``"none"`` → []."""
    s = str(text).strip()
    if s.lower() in ("0", "none", "cpu"):
        return []
    if not s:
        raise PlanError("--gpus is empty; write e.g. 4x22GiB, 22GiB,22GiB,11GiB, or 0 for none")
    out: list[int] = []
    for part in s.split(","):
        part = part.strip()
        m = re.match(r"^(\d+)\s*[xX×*]\s*(\d.*)$", part)
        count, size = (int(m[1]), m[2]) if m else (1, part)
        if m and count == 0:
            raise PlanError(f"--gpus {text!r}: {part!r} declares zero GPUs; drop it, or write 0 for no GPUs")
        if re.match(r"^\s*[xX×*]", part) or part.endswith(("x", "X")):
            raise PlanError(f"--gpus {text!r}: {part!r} is not COUNTxSIZE; write e.g. 4x22GiB")
        out += [parse_size(size, f"--gpus {text!r}: GPU memory")] * count
    if len(out) > 64:
        raise PlanError(f"--gpus {text!r} declares {len(out)} GPUs; at most 64 are supported")
    return out


def parse_gbps(text: str | float, what: str = "bandwidth") -> float:
    """``"3.5"`` or ``"3.5GB/s"`` → 3.5 (GB/s)."""
    s = str(text).strip()
    s = re.sub(r"\s*(?:GB/s|GBps|gbps)$", "", s, flags=re.IGNORECASE)
    try:
        v = float(s)
    except ValueError:
        raise PlanError(f"{what} {text!r} is not a number of GB/s; write e.g. 3.5") from None
    if not math.isfinite(v) or v <= 0:
        raise PlanError(f"{what} {text!r} must be a positive number of GB/s")
    return v


# ---- detection ------------------------------------------------------------------------------------------------
_SMI_FIELDS = "name,memory.total,memory.free,compute_cap,pcie.link.gen.current,pcie.link.width.current"


def _smi(fields: str) -> list[list[str]] | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        r = subprocess.run([exe, f"--query-gpu={fields}", "--format=csv,noheader,nounits"],
                           capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if r.returncode != 0:
        return None
    return [[c.strip() for c in line.split(",")] for line in r.stdout.splitlines() if line.strip()]


def _int(s: str) -> int | None:
    try:
        return int(float(s))
    except ValueError:
        return None  # "[N/A]"


def detect_gpus(notes: list[str]) -> list[GPU]:
    """GPUs as ``nvidia-smi`` reports them; [] when there is no NVIDIA driver."""
    # An idle GPU drops its link to gen 1 to save power, so the link's maximum is asked for as well.
    rows = _smi(_SMI_FIELDS + ",pcie.link.gen.max,pcie.link.width.max") or _smi(_SMI_FIELDS)
    if not rows:
        return []
    gpus = []
    for i, row in enumerate(rows):
        name, total, free, cap = row[0], _int(row[1]), _int(row[2]), row[3]
        if total is None:
            notes.append(f"nvidia-smi gave no memory size for GPU {i} ({name}); it is left out")
            continue
        cls, known = gpu_class(name, cap)
        if not known:
            notes.append(f"GPU {i} ({name}) is not in the table of GPU classes; assumed {cls.match}-class "
                         f"bandwidth {cls.mem_gbps:g} GB/s (pass --gpu-gbps)")
        gen = max(_int(row[4]) or 0, _int(row[6]) or 0 if len(row) > 6 else 0) or cls.pcie_gen
        width = max(_int(row[5]) or 0, _int(row[7]) or 0 if len(row) > 7 else 0) or 16
        pcie = PCIE_LANE_GBPS.get(gen, PCIE_LANE_GBPS[3]) * width * PCIE_EFFICIENCY
        free_b = (free if free is not None else total) * 2**20
        gpus.append(GPU(name, free_b, total * 2**20, cls.mem_gbps * COPY_FRACTION, pcie, cls.fp16_tflops,
                        cap or None))
    return gpus


def detect_ram() -> tuple[int, int]:
    """(MemTotal, MemAvailable) in bytes."""
    try:
        info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        total = int(info["MemTotal"].split()[0]) * 1024
        return total, int(info.get("MemAvailable", info["MemTotal"]).split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return total, total


def _largest_file(path: Path) -> Path | None:
    if path.is_file():
        return path
    files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else []
    return max(files, key=lambda p: p.stat().st_size, default=None)


def measure_disk_gbps(path: str | Path, max_bytes: int = 256 << 20, max_seconds: float = 2.0,
                      use_cache: bool = True) -> tuple[float, str] | None:
    """Read speed (GB/s) of the disk holding ``path`` and how it was measured; None if nothing can be read.

    Reads chunks of 4 MiB spread over the largest file under ``path`` with O_DIRECT, so the page cache cannot
    inflate the figure; where O_DIRECT is refused (tmpfs, some filesystems) the file's cached pages are dropped
    first with ``posix_fadvise(DONTNEED)`` and a buffered read is timed. Results are cached per device.
    """
    target = _largest_file(Path(path))
    if target is None:
        return None
    dev = f"{os.stat(target).st_dev}"
    cache = cache_dir() / "disk.json"
    if use_cache:
        try:
            hit = json.loads(cache.read_text()).get(dev)
            if hit:
                return float(hit["gbps"]), f"{hit['method']} read of {hit['file']} (cached)"
        except (OSError, ValueError, KeyError, TypeError):
            pass
    size = target.stat().st_size
    chunk = 4 << 20
    n = max(1, min(max_bytes, size) // chunk)
    offsets = [((size - chunk) * k // max(n - 1, 1)) // 4096 * 4096 for k in range(n)] if size > chunk else [0]
    buf = mmap.mmap(-1, chunk)  # page-aligned, as O_DIRECT needs
    method, done, t0 = "O_DIRECT", 0, time.perf_counter()
    try:
        fd = os.open(target, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
    except OSError:
        fd, method = os.open(target, os.O_RDONLY), "buffered"
    try:
        if method == "buffered" and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        t0 = time.perf_counter()
        for off in offsets:
            try:
                got = os.preadv(fd, [buf], off)
            except OSError:  # O_DIRECT opened but refused the read (alignment, filesystem): retry buffered
                os.close(fd)
                fd, method = os.open(target, os.O_RDONLY), "buffered"
                if hasattr(os, "posix_fadvise"):
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                t0, done = time.perf_counter(), 0
                got = os.preadv(fd, [buf], off)
            done += got
            if time.perf_counter() - t0 > max_seconds:
                break
        elapsed = time.perf_counter() - t0
    finally:
        os.close(fd)
        buf.close()
    if done == 0 or elapsed <= 0:
        return None
    gbps = done / elapsed / GB
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        entries = json.loads(cache.read_text()) if cache.exists() else {}
        entries[dev] = {"gbps": gbps, "method": method, "file": str(target), "bytes": done, "time": time.time()}
        cache.write_text(json.dumps(entries, indent=1))
    except (OSError, ValueError):
        pass  # an unwritable cache costs only a re-measurement next time
    return gbps, f"{method} read of {done >> 20} MiB of {target.name}"


# ---- putting it together ------------------------------------------------------------------------------------------
def make_hardware(gpus: str | list[int] | None = None, ram: str | int | None = None,
                  disk_gbps: str | float | None = None, gpu_gbps: str | float | None = None,
                  pcie_gbps: str | float | None = None, ram_gbps: str | float | None = None,
                  detect: bool = True, model_path: str | Path | None = None,
                  cpu_cores: int | None = None) -> Hardware:
    """Hardware from declared values, with the rest detected (``detect=True``) or defaulted.

    ``gpus``/``ram`` take the strings of ``parse_gpus``/``parse_size`` (or bytes). With ``detect``, a declared GPU
    list caps the detected cards (the i-th declared size on the i-th card: how the project emulates a 22 GiB card on
    a bigger one) and borrows their bandwidths; extra declared GPUs borrow the last card's class.
    """
    notes: list[str] = []
    declared = any(v is not None for v in (gpus, ram, disk_gbps, gpu_gbps, pcie_gbps, ram_gbps))
    found = detect_gpus(notes) if detect else []
    if gpus is None:
        gpu_list = found
        if not detect:
            raise PlanError("no GPUs declared and detection is off; pass --gpus (e.g. 4x22GiB, or 0 for none)")
    else:
        sizes = parse_gpus(gpus) if isinstance(gpus, str) else [int(s) for s in gpus]
        if found and len(sizes) > len(found):
            notes.append(f"{len(sizes)} GPUs declared but {len(found)} detected: GPUs {len(found)}.."
                         f"{len(sizes) - 1} are assumed to be like GPU {len(found) - 1} ({found[-1].name})")
        gpu_list = []
        for i, size in enumerate(sizes):
            base = found[min(i, len(found) - 1)] if found else None
            if base is None:
                cls, _ = gpu_class(None)
                if i == 0:
                    notes.append(f"declared GPUs are assumed to be {cls.match}-class: {cls.mem_gbps:g} GB/s memory, "
                                 f"PCIe {cls.pcie_gen}.0 x16, {cls.fp16_tflops:g} fp16 TFLOP/s (pass --gpu-gbps and "
                                 "--pcie-gbps for other cards)")
                base = GPU(f"declared {cls.match}-class", size, size, cls.mem_gbps * COPY_FRACTION,
                           PCIE_LANE_GBPS[cls.pcie_gen] * 16 * PCIE_EFFICIENCY, cls.fp16_tflops, None)
            gpu_list.append(replace(base, memory_bytes=min(size, base.memory_bytes) if found else size,
                                    total_bytes=size))
    if gpu_gbps is not None:
        gpu_list = [replace(g, mem_gbps=parse_gbps(gpu_gbps, "--gpu-gbps")) for g in gpu_list]
    if pcie_gbps is not None:
        gpu_list = [replace(g, pcie_gbps=parse_gbps(pcie_gbps, "--pcie-gbps")) for g in gpu_list]

    if ram is not None:
        ram_total = parse_size(ram, "--ram") if isinstance(ram, str) else int(ram)
        ram_avail = ram_total
    elif detect:
        ram_total, ram_avail = detect_ram()
    else:
        raise PlanError("no RAM size declared and detection is off; pass --ram (e.g. 128GiB)")

    if ram_gbps is not None:
        ram_bw = parse_gbps(ram_gbps, "--ram-gbps")
    else:
        ram_bw = DEFAULT_RAM_GBPS
        notes.append(f"RAM read bandwidth assumed {ram_bw:g} GB/s (pass --ram-gbps with a measured figure)")

    if disk_gbps is not None:
        disk_bw = parse_gbps(disk_gbps, "--disk-gbps")
    else:
        measured = measure_disk_gbps(model_path) if (detect and model_path is not None) else None
        if measured:
            disk_bw = measured[0]
            notes.append(f"disk read {disk_bw:.2f} GB/s measured ({measured[1]})")
        else:
            disk_bw = DEFAULT_DISK_GBPS
            notes.append(f"disk read bandwidth assumed {disk_bw:g} GB/s, a PCIe 3.0 NVMe (pass --disk-gbps, or plan "
                         "a downloaded checkpoint to measure its disk)")
    cores = cpu_cores or os.cpu_count() or 1
    notes.append(f"CPU compute assumed {CPU_GFLOPS_PER_CORE:g} GFLOP/s per core × {cores} cores"
                 + ("" if cpu_cores else " (this machine's count)"))
    source = ("detected+declared" if declared else "detected") if detect else "declared"
    return Hardware(tuple(gpu_list), ram_avail, ram_total, ram_bw, disk_bw, cores, CPU_GFLOPS_PER_CORE * cores,
                    source, tuple(notes))


def declared_hardware(gpus: str | list[int], ram: str | int, disk_gbps: str | float | None = None, **kw) -> Hardware:
    """Hardware from declared values only (nothing detected): for planning another machine, and in tests."""
    return make_hardware(gpus=gpus, ram=ram, disk_gbps=disk_gbps, detect=False, **kw)
