"""The planner: tensor inventory, hardware strings, memory, placement, cost model, JSON, and the plan command."""

import argparse
import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tierlm.plan import (PlanError, declared_hardware, format_plan, inventory_from_records, kv_bytes_per_token,
                         load_profile, make_plan, parse_gpus, parse_size, plan_from_json, plan_to_json,
                         recipe_inventory)
from tierlm.plan import hardware as hwmod
from tierlm.plan.command import add_plan_arguments, plan_command, safetensors_records
from tierlm.plan.ggml_sizes import GGML_TYPES, tensor_nbytes
from tierlm.plan.hardware import GiB, make_hardware, parse_gbps
from tierlm.plan.inventory import classify, use_more_bits
from tierlm.plan.planner import profile_from_dict
from tierlm.presets import known_config

V3 = known_config("deepseek-ai/DeepSeek-V3")
BOX = declared_hardware("4x22GiB", "128GiB", 3.5)  # DESIGN.md's machine


@pytest.fixture(scope="module")
def box_plan():
    return make_plan(V3, "Q4_K_M", BOX, name="deepseek-ai/DeepSeek-V3")


# ---- inventory -------------------------------------------------------------------------------------------------
def test_q4_k_m_matches_llama_cpp_mix_and_size():
    inv = recipe_inventory(V3, "Q4_K_M")
    assert inv.total_bytes() == pytest.approx(404.5e9, rel=0.005)  # reference §3.7
    assert inv.numel() == 671_026_419_200  # reference §1.12
    t = {x.name: x for x in inv.tensors}
    assert t["output.weight"].dtype == "Q6_K" and t["token_embd.weight"].dtype == "Q4_K"
    assert t["blk.3.attn_k_b.weight"].dtype == "Q5_0"  # rows of 128 cannot be Q4_K
    assert t["blk.3.attn_v_b.weight"].dtype == "Q4_K"
    assert t["blk.3.attn_norm.weight"].dtype == "F32" and t["blk.3.ffn_gate_inp.weight"].dtype == "F32"
    assert t["blk.3.exp_probs_b.bias"].dtype == "F32"
    more = [i for i in range(61) if use_more_bits(i, 61)]
    assert len(more) == 30 and more[:9] == [0, 1, 2, 3, 4, 5, 6, 9, 12] and more[-8:] == list(range(53, 61))
    for i in (3, 9, 60):
        assert t[f"blk.{i}.ffn_down_exps.weight"].dtype == "Q6_K"
        assert t[f"blk.{i}.ffn_down_shexp.weight"].dtype == "Q6_K"
    assert t["blk.7.ffn_down_exps.weight"].dtype == "Q4_K" and t["blk.7.ffn_gate_exps.weight"].dtype == "Q4_K"
    assert t["blk.0.ffn_down.weight"].dtype == "Q6_K"
    # one routed expert: 3 × 7168 × 2048 at 4.5 bpw = 24.8 MB (DESIGN.md), 28.6 MB with a Q6_K down projection
    eb = inv.expert_bytes()
    assert eb[7][0] == pytest.approx(24.77e6, rel=1e-3) and eb[3][0] == pytest.approx(28.56e6, rel=1e-3)
    assert len(eb) == 58 and all(len(v) == 256 for v in eb.values())


def test_other_recipes_and_type_table():
    sizes = {r: recipe_inventory(V3, r).total_bytes() for r in ("F16", "BF16", "Q8_0", "Q3_K_M", "Q2_K", "FP8")}
    assert sizes["F16"] == sizes["BF16"] == pytest.approx(2 * 671e9, rel=0.01)
    assert sizes["Q8_0"] == pytest.approx(671e9 * 34 / 32, rel=0.01)
    assert sizes["Q2_K"] < sizes["Q3_K_M"] < 404.5e9 < sizes["FP8"] < sizes["Q8_0"]
    fp8 = {t.name: t for t in recipe_inventory(V3, "FP8").tensors}
    # 1 byte per value + an fp32 scale per 128×128 tile (q_a: [1536, 7168] → 12 × 56 tiles)
    assert fp8["blk.0.attn_q_a.weight"].nbytes == 1536 * 7168 + 4 * 12 * 56
    assert fp8["blk.0.attn_kv_a_mqa.weight"].nbytes == 576 * 7168 + 4 * 5 * 56  # a partial edge tile counts
    assert fp8["output.weight"].dtype == "BF16"
    assert {k: v[1:] for k, v in GGML_TYPES.items() if k in ("Q4_K", "Q6_K", "Q8_0", "Q5_0", "Q2_K", "Q3_K")} == {
        "Q4_K": (256, 144), "Q6_K": (256, 210), "Q8_0": (32, 34), "Q5_0": (32, 22), "Q2_K": (256, 84),
        "Q3_K": (256, 110)}
    with pytest.raises(Exception, match="not a whole number of Q4_K blocks"):
        tensor_nbytes("Q4_K", (4, 128))
    with pytest.raises(Exception, match="unknown quantization recipe"):
        recipe_inventory(V3, "Q5_K_Z")


def test_gguf_table_matches_gguf_package():
    gguf = pytest.importorskip("gguf")
    for name, (tid, elems, nbytes) in GGML_TYPES.items():
        t = gguf.GGMLQuantizationType(tid)
        assert t.name == name and gguf.GGML_QUANT_SIZES[t] == (elems, nbytes)


def test_inventory_from_records_matches_recipe_and_reads_hf_names():
    inv = recipe_inventory(V3, "Q4_K_M")
    again = inventory_from_records([(t.name, t.shape, t.dtype) for t in inv.tensors], V3)
    assert again.total_bytes() == inv.total_bytes() and again.expert_bytes() == inv.expert_bytes()
    assert classify("model.layers.5.mlp.experts.17.down_proj.weight_scale_inv", 61) == ("routed_expert", 5, 17)
    assert classify("model.layers.5.mlp.shared_experts.up_proj.weight", 61) == ("shared_expert", 5, None)
    assert classify("model.layers.5.mlp.gate.e_score_correction_bias", 61) == ("router", 5, None)
    assert classify("model.layers.1.mlp.down_proj.weight", 61) == ("dense_ffn", 1, None)
    assert classify("model.layers.61.eh_proj.weight", 61) == ("mtp", 61, None)
    assert classify("lm_head.weight", 61) == ("head", None, None)
    with pytest.raises(Exception, match="not part of a DeepSeek"):
        classify("blk.3.ssm_conv1d.weight", 61)
    recs = [{"name": "model.layers.0.self_attn.o_proj.weight", "shape": [8, 8], "dtype": "BF16"}]
    with pytest.raises(Exception, match="no routed experts"):
        inventory_from_records(recs, V3)


def test_plan_of_a_hf_checkpoint_counts_its_files(tiny_ckpt):
    from tests.conftest import tiny_config

    recs = safetensors_records(tiny_ckpt)
    files = sum(os.path.getsize(p) for p in tiny_ckpt.glob("*.safetensors"))
    assert 0 < files - sum(r[3] for r in recs) < 100_000  # the rest is the headers
    plan = make_plan(tiny_config(), hardware=declared_hardware("1x1GiB", "8GiB", 2), tensors=recs)
    assert plan.fits and plan.quant["source"] == "checkpoint"
    assert plan.quant["total_bytes"] == sum(r[3] for r in recs)
    assert plan.expert_counts() == {"gpu": 2 * 16, "ram": 0, "disk": 0}


def test_plan_of_a_gguf_file(tmp_path):
    gguf = pytest.importorskip("gguf")
    pytest.importorskip("tierlm.weights.gguf_io")
    from tierlm.plan.command import resolve_model

    cfg = known_config("demo")
    inv = recipe_inventory(cfg, "Q4_K_M")
    w = gguf.GGUFWriter(tmp_path / "demo.gguf", "deepseek2")
    a = "deepseek2."
    for key, v in {"block_count": 4, "context_length": 4096, "embedding_length": 256, "feed_forward_length": 512,
                   "attention.head_count": 4, "attention.head_count_kv": 1, "attention.q_lora_rank": 128,
                   "attention.kv_lora_rank": 64, "attention.key_length": 80, "attention.value_length": 64,
                   "attention.key_length_mla": 48, "attention.value_length_mla": 32, "rope.dimension_count": 16,
                   "leading_dense_block_count": 1, "expert_count": 32, "expert_used_count": 4,
                   "expert_shared_count": 1, "expert_feed_forward_length": 128, "expert_group_count": 4,
                   "expert_group_used_count": 2, "expert_gating_func": 2, "vocab_size": 129280}.items():
        w.add_uint32(a + key, v)
    w.add_float32(a + "attention.layer_norm_rms_epsilon", 1e-6)
    w.add_float32(a + "expert_weights_scale", 2.5)
    w.add_bool(a + "expert_weights_norm", True)
    for t in inv.tensors:
        qt = gguf.GGMLQuantizationType[t.dtype]
        w.add_tensor(t.name, np.zeros((*t.shape[:-1], t.nbytes // max(1, np.prod(t.shape[:-1], dtype=int))),
                                      np.uint8), raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    config, records, _, _ = resolve_model(str(tmp_path / "demo.gguf"), None)
    got = inventory_from_records(records, config)
    assert config.n_routed_experts == 32 and got.total_bytes() == inv.total_bytes()
    assert got.expert_bytes() == inv.expert_bytes()


# ---- hardware ------------------------------------------------------------------------------------------------
def test_declared_hardware_strings():
    assert parse_gpus("4x22GiB") == [22 * GiB] * 4
    assert parse_gpus("22GiB,22GiB,11GiB") == [22 * GiB, 22 * GiB, 11 * GiB]
    assert parse_gpus("2x24GiB, 11GiB") == [24 * GiB, 24 * GiB, 11 * GiB]
    assert parse_gpus("0") == [] and parse_gpus("none") == []
    assert parse_size("128GiB") == 128 * GiB and parse_size("1.5TB") == 1.5e12 and parse_size("64G") == 64 * GiB
    assert parse_size("512 MiB") == 512 * 2**20
    assert parse_gbps("3.5") == 3.5 and parse_gbps("3.5GB/s") == 3.5
    for bad, msg in [("", "empty"), ("4x", "COUNTxSIZE"), ("x22GiB", "COUNTxSIZE"), ("0x22GiB", "zero GPUs"),
                     ("4x22", "no unit"), ("22XB", "unknown unit"), ("-1GiB", "not a size"),
                     ("lots", "not a size"), ("4x0GiB", "more than zero")]:
        with pytest.raises(PlanError, match=msg):
            parse_gpus(bad)
    for bad, msg in [("fast", "not a number"), ("0", "positive"), ("-2", "positive"), ("nan", "positive"),
                     ("inf", "positive")]:
        with pytest.raises(PlanError, match=msg):
            parse_gbps(bad, "--disk-gbps")
    with pytest.raises(PlanError, match="--ram '128' has no unit; write e.g. 128GiB"):
        parse_size("128", "--ram")


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 16), st.integers(1, 4096), st.sampled_from([("GiB", 2**30), ("MiB", 2**20), ("GB", 10**9)]))
def test_parse_gpus_property(count, n, unit):
    assert parse_gpus(f"{count}x{n}{unit[0]}") == [n * unit[1]] * count
    assert parse_gpus(",".join([f"{n}{unit[0]}"] * count)) == [n * unit[1]] * count


def test_detected_gpus_from_nvidia_smi(monkeypatch):
    rows = [["NVIDIA GeForce RTX 2080 Ti", "22528", "22000", "7.5", "1", "16", "3", "16"],
            ["Mystery Card", "11264", "[N/A]", "8.6", "4", "8", "4", "8"]]
    monkeypatch.setattr(hwmod, "_smi", lambda fields: rows)
    notes = []
    gpus = hwmod.detect_gpus(notes)
    assert [g.total_bytes for g in gpus] == [22528 * 2**20, 11264 * 2**20]
    assert gpus[0].memory_bytes == 22000 * 2**20 and gpus[0].mem_gbps == pytest.approx(616 * 0.88)
    assert gpus[0].pcie_gbps == pytest.approx(0.985 * 16 * 0.8)  # the link's max gen, not the idle gen 1
    assert gpus[1].mem_gbps == pytest.approx(936 * 0.88) and "Mystery Card" in notes[0]
    hw = make_hardware(gpus="2x20GiB", ram="64GiB", disk_gbps=2)  # declared sizes cap the detected cards
    assert [g.memory_bytes for g in hw.gpus] == [20 * GiB, 11264 * 2**20] and hw.gpus[0].name.endswith("2080 Ti")
    monkeypatch.undo()  # no driver: no GPUs, RAM still detected
    monkeypatch.setattr(hwmod.shutil, "which", lambda exe: None)
    assert hwmod.detect_gpus([]) == []
    hw = make_hardware(disk_gbps=3)
    assert hw.gpus == () and hw.ram_bytes > 0 and hw.source == "detected+declared"


def test_disk_speed_is_measured_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("TIERLM_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "model" / "w.bin"
    f.parent.mkdir()
    f.write_bytes(os.urandom(12 << 20))
    gbps, how = hwmod.measure_disk_gbps(f.parent, max_bytes=8 << 20)
    assert gbps > 0 and "read of" in how
    cached = json.loads((tmp_path / "cache" / "disk.json").read_text())
    assert len(cached) == 1 and next(iter(cached.values()))["gbps"] == gbps
    assert hwmod.measure_disk_gbps(f.parent)[1].endswith("(cached)")
    hw = make_hardware(gpus="0", ram="8GiB", model_path=f.parent)
    assert hw.disk_gbps == gbps and any("measured" in a for a in hw.assumptions)


# ---- memory and placement -----------------------------------------------------------------------------------------
def test_kv_bytes_per_token():
    assert kv_bytes_per_token(V3) == 61 * 576 * 2 == 70_272


def test_design_box_puts_about_half_the_experts_on_disk(box_plan):
    p = box_plan
    n = p.expert_counts()
    assert p.fits and sum(n.values()) == 58 * 256
    assert 0.35 < n["disk"] / 14848 < 0.65 and n["gpu"] > 0 and n["ram"] > 0
    assert p.predicted["decode_tok_s"] > 0 and p.predicted["bottleneck"] == "disk"
    assert p.predicted["prefill_tok_s"] > 0
    for d in p.devices[:-1]:
        assert d.used_bytes <= d.capacity_bytes
    stages = [d.layers for d in p.devices if d.kind == "gpu"]
    assert stages[0][0] == 0 and stages[-1][1] == 61 and all(a[1] == b[0] for a, b in itertools.pairwise(stages))
    assert "embed" in p.devices[0].holds and "head" in p.devices[3].holds
    assert p.kv["bytes_per_token"] == 70_272 and p.kv["context"] >= 4096
    assert p.device_for("blk.20.attn_output.weight") == p.layer_device(20)
    assert p.device_for("output.weight") == "cuda:3" and p.device_for("token_embd.weight") == "cuda:0"
    assert p.device_for("model.layers.61.eh_proj.weight") == "skip"
    le = p.experts[10]
    assert p.expert_device(le.layer, le.gpu[0]) == le.device and p.expert_device(le.layer, le.disk[0]) == "disk"
    assert any("--ram" in s for s in p.suggestions)


def test_single_sequence_speed_is_predicted_beside_the_batch_throughput():
    """A batch of B decodes B tokens per step but each sequence only one: one sequence alone is slower than the
    batch's total and faster than the total / B (the always-active weights are read once per step either way)."""
    hw = declared_hardware("4x22GiB", "128GiB", 3.5)
    p = make_plan(V3, "Q4_K_M", hw, ctx=4096)
    pr = p.predicted
    assert pr["decode_batch"] > 1
    assert pr["decode_tok_s"] / pr["decode_batch"] < pr["decode_tok_s_single"] < pr["decode_tok_s"]
    one = make_plan(V3, "Q4_K_M", hw, ctx=4096, batch=1).predicted
    assert one["decode_batch"] == 1 and one["decode_tok_s_single"] == pytest.approx(one["decode_tok_s"])
    assert "for one sequence decoding alone" in format_plan(p)


def test_big_ram_box_needs_no_disk():
    p = make_plan(V3, "Q4_K_M", declared_hardware("1x24GiB", "384GiB", 3.5))
    assert p.fits and p.expert_counts()["disk"] == 0 and p.expert_counts()["gpu"] > 0
    assert p.predicted["bottleneck"] == "cpu"


def test_cpu_only_plan():
    p = make_plan(V3, "Q4_K_M", declared_hardware("0", "512GiB", 3.5))
    assert p.fits and [d.kind for d in p.devices] == ["cpu", "disk"]
    assert p.expert_counts() == {"gpu": 0, "ram": 14848, "disk": 0}
    assert p.devices[0].layers == [0, 61] and p.device_for("blk.4.attn_q_b.weight") == "cpu"
    assert p.predicted["decode_tok_s"] > 0 and p.predicted["bottleneck"] == "cpu"
    small = make_plan(V3, "Q4_K_M", declared_hardware("0", "128GiB", 3.5))
    assert small.fits and small.expert_counts()["disk"] > 0 and small.predicted["bottleneck"] == "disk"


def test_uneven_gpus_get_layers_in_proportion():
    p = make_plan(V3, "Q4_K_M", declared_hardware("22GiB,22GiB,11GiB", "128GiB", 3.5))
    spans = [d.layers[1] - d.layers[0] for d in p.devices if d.kind == "gpu"]
    assert p.fits and sum(spans) == 61 and spans[2] < spans[0]


def test_context_and_batch_from_what_is_left():
    auto = make_plan(V3, "Q4_K_M", BOX, suggest=False)
    assert auto.kv["context"] == 32768 and auto.kv["batch"] == 1
    fixed = make_plan(V3, "Q4_K_M", BOX, ctx=8192, suggest=False)
    assert fixed.kv["context"] == 8192 and fixed.kv["batch"] > 1
    both = make_plan(V3, "Q4_K_M", BOX, ctx=4096, batch=3, suggest=False)
    assert both.kv["bytes"] == 4096 * 3 * 70_272
    # every byte of KV cache on a GPU is a byte of expert cache lost
    assert both.expert_counts()["gpu"] > make_plan(V3, "Q4_K_M", BOX, ctx=163840, suggest=False).expert_counts()["gpu"]


def test_routing_profile_puts_hot_experts_on_gpu(tmp_path):
    hw = declared_hardware("1x24GiB", "128GiB", 3.5)
    hot = {layer: [5, 200] for layer in V3.moe_layers}
    counts = {str(layer): [1000 if e in hot[layer] else 1 for e in range(256)] for layer in V3.moe_layers}
    path = tmp_path / "profile.json"
    path.write_text(json.dumps({"layers": counts}))
    p = make_plan(V3, "Q4_K_M", hw, profile=load_profile(path), suggest=False)
    for le in p.experts:
        assert set(hot[le.layer]) <= set(le.gpu)
    uniform = make_plan(V3, "Q4_K_M", hw, suggest=False)
    assert not all(200 in le.gpu for le in uniform.experts)
    assert p.predicted["decode_tok_s"] > uniform.predicted["decode_tok_s"]
    assert p.profile == str(path)
    # the sparse and the record layouts say the same thing
    assert profile_from_dict([[3, 5, 10.0], {"layer": 3, "expert": 7, "count": 2}]).counts[3][7] == 2.0
    with pytest.raises(PlanError, match="layer 0 is not a MoE layer"):
        make_plan(V3, "Q4_K_M", hw, profile=profile_from_dict({"0": [1, 2]}))
    with pytest.raises(PlanError, match="names expert 299"):
        make_plan(V3, "Q4_K_M", hw, profile=profile_from_dict({"3": {"299": 1}}))
    with pytest.raises(PlanError, match="negative"):
        profile_from_dict({"3": [-1, 2]})
    with pytest.raises(PlanError, match="not found"):
        load_profile(tmp_path / "missing.json")


def test_plans_that_do_not_fit_say_what_would():
    p = make_plan(V3, "F16", declared_hardware("1x24GiB", "64GiB", 3.5))
    assert not p.fits and p.problems and any("--quant Q8_0" in s for s in p.suggestions)
    long = make_plan(V3, "Q4_K_M", declared_hardware("1x24GiB", "384GiB", 3.5), ctx=163840, batch=4)
    assert not long.fits and any("--ctx" in s for s in long.suggestions)
    tiny_ram = make_plan(V3, "Q4_K_M", declared_hardware("0", "8GiB", 3.5))
    assert not tiny_ram.fits and any("--ram" in s for s in tiny_ram.suggestions)
    too_long = make_plan(V3, "Q4_K_M", BOX, ctx=200_000, suggest=False)
    assert not too_long.fits and "exceeds the model's maximum" in too_long.problems[0]


# ---- report and JSON ---------------------------------------------------------------------------------------------
def test_json_round_trip(box_plan):
    d = plan_to_json(box_plan)
    text = json.dumps(d)
    back = plan_from_json(json.loads(text))
    assert plan_to_json(back) == d
    assert back.config == V3 and back.expert_counts() == box_plan.expert_counts()
    for key in ("fits", "devices", "experts", "kv", "predicted", "model", "quant", "suggestions"):
        assert key in d
    assert {"name", "kind", "capacity_bytes", "used_bytes"} <= set(d["devices"][0])
    assert d["experts"]["gpu"] + d["experts"]["ram"] + d["experts"]["disk"] == 14848
    assert {"bytes_per_token", "context"} <= set(d["kv"])
    assert {"prefill_tok_s", "decode_tok_s", "bottleneck", "tiers"} <= set(d["predicted"])
    with pytest.raises(PlanError, match="not a tierlm plan"):
        plan_from_json({"fits": True})
    with pytest.raises(PlanError, match="malformed"):
        plan_from_json({**d, "devices": [{"name": "cuda:0"}]})
    with pytest.raises(PlanError, match="newer"):
        plan_from_json({**d, "version": 99})


def test_text_report(box_plan):
    text = format_plan(box_plan)
    for part in ("fits", "cuda:3", "disk", "bottleneck: disk", "suggestions", "assumptions", "tok/s"):
        assert part in text


# ---- the command -------------------------------------------------------------------------------------------------
def _run(argv, capsys):
    parser = argparse.ArgumentParser()
    add_plan_arguments(parser)
    rc = plan_command(parser.parse_args(argv))
    return rc, capsys.readouterr()


def test_plan_command(capsys, tmp_path, monkeypatch):
    rc, out = _run(["deepseek-ai/DeepSeek-V3", "--gpus", "4x22GiB", "--ram", "128GiB", "--disk-gbps", "3.5",
                    "--no-detect", "--json"], capsys)
    d = json.loads(out.out)
    assert rc == 0 and d["fits"] and d["model"]["name"] == "deepseek-ai/DeepSeek-V3" and d["quant"]["recipe"] == "Q4_K_M"
    rc, out = _run(["deepseek-ai/DeepSeek-V3", "--quant", "f16", "--gpus", "1x24GiB", "--ram", "64GiB",
                    "--no-detect"], capsys)
    assert rc == 1 and "DOES NOT FIT" in out.out
    rc, out = _run(["demo", "--gpus", "4x", "--ram", "8GiB", "--no-detect"], capsys)
    assert rc == 2 and "COUNTxSIZE" in out.err
    rc, out = _run(["no/such-model", "--no-detect", "--gpus", "0", "--ram", "8GiB"], capsys)
    assert rc == 2 and "known names" in out.err
    gguf_file = tmp_path / "x.gguf"
    gguf_file.write_bytes(b"GGUF")
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n.endswith("gguf_io") else real(n, *a))
    rc, out = _run([str(gguf_file), "--no-detect", "--gpus", "0", "--ram", "8GiB"], capsys)
    assert rc == 2 and "GGUF planning needs tierlm.weights.gguf_io" in out.err


def test_plan_command_on_a_checkpoint_folder(tiny_ckpt, capsys):
    rc, out = _run([str(tiny_ckpt), "--gpus", "0", "--ram", "8GiB", "--disk-gbps", "2", "--no-detect", "--json"],
                   capsys)
    d = json.loads(out.out)
    assert rc == 0 and d["quant"]["source"] == "checkpoint" and d["devices"][0]["kind"] == "cpu"


def test_importing_the_planner_does_not_import_torch():
    code = ("import sys, tierlm.plan, tierlm.plan.command; "
            "bad = [m for m in ('torch', 'numpy') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
