import json
import platform

import torch

import tierlm
from tierlm import doctor
from tierlm.doctor import GiB, arch_name, format_report, gpu_warnings, host_warnings, run_doctor


def test_report_on_this_machine_is_sane(monkeypatch, tmp_path):
    monkeypatch.setenv("TIERLM_CACHE", str(tmp_path / "not" / "created" / "yet"))
    d = run_doctor()
    assert set(d) >= {"python", "tierlm", "torch", "triton", "gpus", "ram", "cpu", "disk", "warnings"}
    assert d["python"] == platform.python_version()
    assert d["tierlm"] == tierlm.__version__
    assert d["torch"]["version"] == torch.__version__
    assert d["torch"]["build"] == "CPU" or d["torch"]["build"].startswith(("CUDA", "ROCm"))
    assert len(d["gpus"]) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    for g in d["gpus"]:
        assert 0 <= g["free_bytes"] <= g["total_bytes"]
        assert g["bf16"] == (tuple(g["capability"]) >= (8, 0))
    ram = d["ram"]
    assert ram["total_bytes"] is None or 0 < ram["available_bytes"] <= ram["total_bytes"]
    assert d["cpu"]["cores"] >= 1 and 1 <= d["cpu"]["usable_cores"] <= d["cpu"]["cores"]
    assert d["disk"]["path"] == str(tmp_path / "not" / "created" / "yet")
    assert d["disk"]["free_bytes"] > 0  # measured on the disk of the nearest existing parent
    assert all(isinstance(w, str) for w in d["warnings"])
    json.dumps(d)  # the CLI can print it as JSON

    text = format_report(d)
    assert torch.__version__ in text and "RAM" in text and str(tmp_path) in text
    for w in d["warnings"]:
        assert w in text


def test_cache_dir_defaults_to_home(monkeypatch, tmp_path):
    monkeypatch.delenv("TIERLM_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert doctor.cache_dir() == tmp_path / ".cache" / "tierlm"


def fake_gpu(index, cap, name="fake"):
    return {
        "index": index, "name": name, "capability": cap, "arch": arch_name(*cap),
        "total_bytes": 16 * GiB, "free_bytes": 15 * GiB, "bf16": cap >= (8, 0),
    }


def test_no_gpu_warns_cpu_only():
    assert gpu_warnings([]) == ["no CUDA GPU found: tierlm will run on the CPU"]


def test_bf16_warning_only_for_pre_ampere_gpus():
    gpus = [fake_gpu(0, (7, 5)), fake_gpu(1, (8, 0)), fake_gpu(2, (9, 0)), fake_gpu(3, (7, 0)), fake_gpu(4, (8, 9))]
    assert gpu_warnings(gpus) == [
        "GPU 0 (Turing sm_75) has no bf16: use --dtype float16",
        "GPU 3 (Volta sm_70) has no bf16: use --dtype float16",
    ]
    assert gpu_warnings([fake_gpu(0, (12, 0))]) == []


def test_arch_names():
    assert [arch_name(*c) for c in [(6, 1), (7, 0), (7, 5), (8, 0), (8, 6), (8, 9), (9, 0), (10, 0)]] == [
        "Pascal", "Volta", "Turing", "Ampere", "Ampere", "Ada", "Hopper", "Blackwell",
    ]


HEALTHY = dict(
    ram={"total_bytes": 512 * GiB, "available_bytes": 400 * GiB},
    cpu={"cores": 64, "usable_cores": 64, "avx2": True, "avx512f": True, "amx": False, "model": "x"},
    disk={"path": "/cache", "free_bytes": 2000 * GiB},
    torch_info={"version": "2.6.0+cu124", "cuda": "12.4", "hip": None, "build": "CUDA 12.4"},
)


def test_healthy_host_has_no_warnings():
    assert host_warnings(**HEALTHY, nvidia_devices=8) == []


def test_host_warnings():
    low = dict(HEALTHY, ram={"total_bytes": 8 * GiB, "available_bytes": 3 * GiB})
    assert any("3.0 GiB RAM available" in w for w in host_warnings(**low))
    no_avx2 = dict(HEALTHY, cpu=dict(HEALTHY["cpu"], avx2=False))
    assert any("AVX2" in w for w in host_warnings(**no_avx2))
    small_disk = dict(HEALTHY, disk={"path": "/cache", "free_bytes": 5 * GiB})
    assert any("/cache" in w and "TIERLM_CACHE" in w for w in host_warnings(**small_disk))
    cpu_torch = dict(HEALTHY, torch_info={"version": "2.6.0+cpu", "cuda": None, "hip": None, "build": "CPU"})
    assert any("CPU-only build" in w for w in host_warnings(**cpu_torch, nvidia_devices=2))
    assert host_warnings(**cpu_torch, nvidia_devices=0) == []


def test_unknown_values_raise_no_warning():
    unknown = dict(
        HEALTHY,
        ram={"total_bytes": None, "available_bytes": None},
        cpu=dict(HEALTHY["cpu"], avx2=None),
        disk={"path": "/cache", "free_bytes": None},
    )
    assert host_warnings(**unknown) == []


def test_format_report_with_fake_gpus():
    d = run_doctor()
    d["gpus"] = [fake_gpu(0, (7, 5), "Tesla T4"), fake_gpu(1, (9, 0), "H100")]
    d["warnings"] = gpu_warnings(d["gpus"])
    text = format_report(d)
    assert "Tesla T4" in text and "Turing sm_75" in text and "Hopper sm_90" in text
    assert "GPU 0 (Turing sm_75) has no bf16" in text


def test_ram_falls_back_to_sysconf(monkeypatch):
    real_read = doctor.Path.read_text

    def no_proc(self, *a, **k):
        if str(self).startswith("/proc/"):
            raise OSError("no /proc here")
        return real_read(self, *a, **k)

    monkeypatch.setattr(doctor.Path, "read_text", no_proc)
    ram = doctor._ram()
    assert ram["total_bytes"] is None or ram["total_bytes"] > 0
    cpu = doctor._cpu()
    assert cpu["avx2"] is None and cpu["cores"] >= 1
