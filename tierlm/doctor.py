"""``tierlm doctor``: what this machine offers tierlm, and what to change before running a model.

``run_doctor()`` gathers plain facts into a dict (JSON-friendly); the warnings are pure functions of those facts
(``gpu_warnings``, ``host_warnings``) so they can be tested with made-up machines.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
from pathlib import Path

from tierlm.paths import cache_dir
import tierlm

GiB = 1024**3
LOW_RAM_BYTES = 16 * GiB  # below this, most expert weights cannot stay in RAM and are re-read from disk
LOW_DISK_BYTES = 20 * GiB
CPU_FLAGS = ("avx2", "avx512f", "amx")  # "amx" = any of amx_tile / amx_bf16 / amx_int8


def arch_name(major: int, minor: int) -> str:
    """NVIDIA architecture name of a compute capability."""
    if major == 7:
        return "Turing" if minor >= 5 else "Volta"
    if major == 8:
        return "Ada" if minor == 9 else "Ampere"
    names = {3: "Kepler", 5: "Maxwell", 6: "Pascal", 9: "Hopper", 10: "Blackwell", 11: "Blackwell", 12: "Blackwell"}
    return names.get(major, f"sm_{major}x")


def supports_bf16(capability: tuple[int, int]) -> bool:
    return tuple(capability) >= (8, 0)


def gpu_warnings(gpus: list[dict]) -> list[str]:
    """Warnings about the GPUs, from dicts with at least ``index`` and ``capability`` (major, minor)."""
    if not gpus:
        return ["no CUDA GPU found: tierlm will run on the CPU"]
    out = []
    for g in gpus:
        major, minor = g["capability"]
        if not supports_bf16((major, minor)):
            name = f"{arch_name(major, minor)} sm_{major}{minor}"
            out.append(f"GPU {g['index']} ({name}) has no bf16: use --dtype float16")
    return out


def host_warnings(ram: dict, cpu: dict, disk: dict, torch_info: dict, nvidia_devices: int = 0) -> list[str]:
    """Warnings about RAM, CPU, cache disk and the torch build. Unknown values (None) raise no warning."""
    out = []
    if torch_info.get("cuda") is None and torch_info.get("hip") is None and nvidia_devices:
        out.append(
            f"torch {torch_info['version']} is a CPU-only build but {nvidia_devices} NVIDIA GPU(s) are present: "
            "install a CUDA build of torch (see pytorch.org/get-started)"
        )
    available = ram.get("available_bytes")
    if available is not None and available < LOW_RAM_BYTES:
        out.append(
            f"only {available / GiB:.1f} GiB RAM available: experts that do not fit are read from disk on every "
            "token; close other programs or use a machine with more RAM"
        )
    if cpu.get("avx2") is False:
        out.append("CPU lacks AVX2: expert matmuls on the CPU will be slow")
    free = disk.get("free_bytes")
    if free is not None and free < LOW_DISK_BYTES:
        out.append(f"only {free / GiB:.1f} GiB free in {disk['path']}: point TIERLM_CACHE at a larger disk")
    return out


def _package_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _torch_info() -> dict:
    import torch

    cuda, hip = torch.version.cuda, getattr(torch.version, "hip", None)
    build = f"CUDA {cuda}" if cuda else f"ROCm {hip}" if hip else "CPU"
    return {"version": torch.__version__, "cuda": cuda, "hip": hip, "build": build}


def _nvml_free_bytes(uuid: str) -> int | None:
    """Free memory from NVML, which (unlike torch.cuda.mem_get_info) does not create a CUDA context on the GPU."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            uuid = uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"
            return int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByUUID(uuid)).free)
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no nvidia-ml-py, no driver, or a UUID NVML does not know (MIG): fall back to torch
        return None


def _gpus() -> list[dict]:
    import torch

    if not torch.cuda.is_available():
        return []
    gpus = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        uuid = str(getattr(props, "uuid", ""))
        free = _nvml_free_bytes(uuid) if uuid else None
        if free is None:
            free = torch.cuda.mem_get_info(i)[0]
        cap = (props.major, props.minor)
        gpus.append({
            "index": i, "name": props.name, "capability": cap, "arch": arch_name(*cap),
            "total_bytes": props.total_memory, "free_bytes": free, "bf16": supports_bf16(cap),
        })
    return gpus


def _nvidia_device_count() -> int:
    """GPUs the NVIDIA driver sees, whatever torch was built for (0 without the driver)."""
    try:
        return len(os.listdir("/proc/driver/nvidia/gpus"))
    except OSError:
        return 0


def _ram() -> dict:
    try:
        fields = {}
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, rest = line.partition(":")
            fields[key] = int(rest.split()[0]) * 1024  # values are in kB
        return {"total_bytes": fields["MemTotal"], "available_bytes": fields.get("MemAvailable", fields["MemFree"])}
    except (OSError, KeyError, ValueError, IndexError):
        pass
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        total, available = page * os.sysconf("SC_PHYS_PAGES"), page * os.sysconf("SC_AVPHYS_PAGES")
        return {"total_bytes": total, "available_bytes": available}
    except (ValueError, OSError, AttributeError):  # a name this OS lacks (macOS has no SC_AVPHYS_PAGES)
        return {"total_bytes": None, "available_bytes": None}


def _cpu() -> dict:
    cores = os.cpu_count()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    info = {"model": platform.processor() or None, "cores": cores, "usable_cores": usable}
    info.update(dict.fromkeys(CPU_FLAGS))  # None = unknown (no /proc/cpuinfo)
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags" and not flags:  # x86 only; other CPUs leave the flags unknown
            flags = set(value.split())
        elif key.strip() == "model name" and value.strip():
            info["model"] = value.strip()
    if flags:
        info.update(avx2="avx2" in flags, avx512f="avx512f" in flags, amx=any(f.startswith("amx") for f in flags))
    return info


def _disk(path: Path) -> dict:
    probe = path
    while not probe.exists() and probe != probe.parent:  # the cache folder may not exist yet: measure its disk
        probe = probe.parent
    try:
        return {"path": str(path), "free_bytes": shutil.disk_usage(probe).free}
    except OSError:
        return {"path": str(path), "free_bytes": None}


def run_doctor() -> dict:
    """Gather facts about this machine and the warnings they raise. Works without a GPU, triton or pynvml."""
    torch_info = _torch_info()
    report = {
        "python": platform.python_version(),
        "tierlm": tierlm.__version__,
        "torch": torch_info,
        "triton": _package_version("triton"),
        "nvidia_ml_py": _package_version("nvidia-ml-py"),
        "gpus": _gpus(),
        "ram": _ram(),
        "cpu": _cpu(),
        "disk": _disk(cache_dir()),
    }
    report["warnings"] = gpu_warnings(report["gpus"]) + host_warnings(
        report["ram"], report["cpu"], report["disk"], torch_info, _nvidia_device_count()
    )
    return report


def _gib(n: int | None) -> str:
    return "unknown" if n is None else f"{n / GiB:.1f} GiB"


def format_report(d: dict) -> str:
    """Plain-text rendering of a ``run_doctor()`` dict."""
    yes = {True: "yes", False: "no", None: "unknown"}
    t, cpu = d["torch"], d["cpu"]
    lines = [
        f"python     {d['python']}",
        f"tierlm     {d['tierlm']}",
        f"torch      {t['version']} ({t['build']} build)",
        f"triton     {d['triton'] or 'not installed'}",
    ]
    for g in d["gpus"]:
        major, minor = g["capability"]
        lines.append(
            f"GPU {g['index']:<6} {g['name']}, {g['arch']} sm_{major}{minor}, {_gib(g['total_bytes'])} total, "
            f"{_gib(g['free_bytes'])} free, bf16 {yes[g['bf16']]}"
        )
    if not d["gpus"]:
        lines.append("GPUs       none")
    lines += [
        f"RAM        {_gib(d['ram']['total_bytes'])} total, {_gib(d['ram']['available_bytes'])} available",
        f"CPU        {cpu['model'] or 'unknown'}, {cpu['usable_cores']} of {cpu['cores']} cores usable; "
        + ", ".join(f"{f} {yes[cpu[f]]}" for f in CPU_FLAGS),
        f"cache      {d['disk']['path']}: {_gib(d['disk']['free_bytes'])} free",
    ]
    lines += ["", "warnings:" if d["warnings"] else "no warnings"] + [f"  - {w}" for w in d["warnings"]]
    return "\n".join(lines)
