"""Quantized models end to end: the demo's accuracy at int8 and int4, quantized resident = quantized
packed = quantized offloaded bit for bit for every family, slots sized by the quantized region,
damaged quantized regions caught, bad schemes refused before anything is written."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from moetier import LLM, CheckpointError, SamplingParams
from moetier.cli import main as cli_main
from moetier.demo import demo_path, task_path
from moetier.errors import MoetierError
from moetier.evaluate import evaluate, load_task
from moetier.experts.setup import moe_blocks
from moetier.kernels.quant import QuantError, QuantWeight
from moetier.models.quantize import QuantLinear
from moetier.weights.packed import INDEX_NAME, PackedCheckpoint
from moetier.weights.packed_write import convert
from tiny import FAMILY_CONFIGS, MORE_FAMILY_CONFIGS, make_checkpoint

ALL_CONFIGS = {**FAMILY_CONFIGS, **MORE_FAMILY_CONFIGS}

PROMPTS = [[5, 17, 99, 3, 42, 42, 7, 120], [64, 1, 88], list(range(30, 50))]
PARAMS = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=0)
CACHE_LINE = 64


def _run(llm):
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], PARAMS, use_tqdm=False)
    # tokens and the exact float logprob of each: equal only if every logit is bit-identical
    return [(o.outputs[0].token_ids, [lp["logprob"] for lp in o.outputs[0].logprobs]) for o in outs]


@pytest.mark.parametrize("kind,floor", [("int8", 1.0), ("int4", 0.95)])
def test_demo_accuracy_quantized(kind, floor):
    """The whole held-out addition task (200 items): int8 loses nothing, int4 at most 5%."""
    items = load_task(task_path("addition"))
    llm = LLM("demo", quantization=kind)
    assert llm.quantization["experts"]["kind"] == kind
    result = evaluate(llm, items, use_tqdm=False)
    assert result["items"] == 200 and result["accuracy"] >= floor, result["accuracy"]


def test_demo_int4_with_int8_dense_still_adds():
    items = load_task(task_path("addition"), limit=50)
    llm = LLM("demo", quantization="int4", quant_dense="int8")
    assert isinstance(llm.model.lm_head, QuantLinear) and llm.quantization["name"] == "int4-g32+int8-dense"
    assert type(llm.model.model.layers[0].mlp.gate).__name__.endswith("Router")  # routers stay as they were
    assert evaluate(llm, items, use_tqdm=False)["accuracy"] >= 0.95
    plain = LLM("demo")  # float32: every weight 4 bytes; int4 experts + int8 dense take under a third of that
    assert llm.memory["device_bytes"] < plain.memory["device_bytes"] / 3


def _signature(t: torch.Tensor) -> tuple:
    return (t.dtype, tuple(t.shape), t.stride(), t.data_ptr() % CACHE_LINE)


def _qsig(w) -> tuple:
    assert isinstance(w, QuantWeight)
    return (w.kind, w.shape, w.group_size, w.layout, _signature(w.codes), _signature(w.scales))


@pytest.fixture(scope="module", params=sorted(ALL_CONFIGS))
def family(request, tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp(request.param), request.param, ALL_CONFIGS[request.param])


@pytest.mark.parametrize("kind,group,dense,dtype", [("int4", 32, "int8", "float32"), ("int8", None, None, "float32"),
                                                    ("int4", 32, None, "bfloat16")])
def test_quantized_resident_packed_and_offloaded_are_bit_identical(family, kind, group, dense, dtype, tmp_path):
    if dtype == "bfloat16" and not family.name.startswith("mixtral"):
        pytest.skip("the bf16 kernels once (mixtral) is enough; every family runs in float32")
    resident = LLM(family, dtype=dtype, quantization=kind, quant_group_size=group, quant_dense=dense)
    want = _run(resident)
    packed = convert(family, tmp_path / "packed", dtype=dtype, quant=kind, group_size=group, quant_dense=dense,
                     progress=False)
    assert _run(LLM(packed)) == want
    blocks = moe_blocks(resident.model)
    experts = blocks[0].experts.num_experts
    resident_sigs = {(i, e): tuple(map(_qsig, b.experts.weights(e))) for i, b in enumerate(blocks)
                     for e in range(experts)}
    for source in (packed, family):  # a converted folder, and an HF folder quantized into its first-use copy
        kw = {} if source == packed else dict(dtype=dtype, quantization=kind, quant_group_size=group, quant_dense=dense)
        llm = LLM(source, expert_slots=experts, offload_dir=tmp_path / "off", **kw)
        try:
            assert llm.quantization == resident.quantization
            assert _run(llm) == want
            s = llm.stats()
            assert s["misses"] > 0
            store = llm.engine.offload.store
            # the kernels see the same bytes the same way: slot views vs resident regions
            for (i, e), sig in resident_sigs.items():
                got = store.acquire(i, [e])[e]
                assert tuple(map(_qsig, got)) == sig
                store.release(i)
        finally:
            llm.close()


def test_slots_and_reads_shrink_with_the_quantized_region(tmp_path):
    """Demo (float32, gate_up [512, 128], down [128, 256]): int4 group 32 regions are under a fifth of
    the float32 ones, and every load reads one region."""
    sizes = {}
    for kind in (None, "int8", "int4"):
        llm = LLM("demo", expert_slots=8, offload_dir=tmp_path / str(kind), quantization=kind)
        try:
            llm.generate(["12+34=", "7+8="], SamplingParams(max_tokens=4, temperature=0), use_tqdm=False)
            s, store = llm.stats(), llm.engine.offload.store
            assert s["bytes_disk_to_host"] > 0 and s["bytes_disk_to_host"] % store.layout.nbytes == 0  # whole regions
            assert store.nbytes == 8 * store.slot_bytes
            sizes[kind] = store.slot_bytes
        finally:
            llm.close()
    plain = (512 * 128 + 128 * 256) * 4  # float32 bytes of one expert
    assert sizes[None] >= plain
    assert sizes["int8"] <= plain / 4 + 4 * 4096 + 2 * 512 * 4  # codes, one float32 scale per row, padding
    assert sizes["int4"] <= plain / 5


@pytest.fixture(scope="module")
def quant_packed(tmp_path_factory):
    return convert(demo_path(), tmp_path_factory.mktemp("q") / "packed", quant="int4", progress=False)


def _damage_expert(folder: Path, layer: int = 1) -> dict:
    index = json.loads((folder / INDEX_NAME).read_text())
    e = next(e for e in index["experts"] if e["layer"] == layer and e["expert"] == 0)
    scales_at = e["offset"] + e["parts"][1]["offset"] - 4096  # the gate_up scales, just before down's codes
    with open(folder / e["file"], "r+b") as f:
        f.seek(scales_at)
        good = f.read(16)
        f.seek(scales_at)
        f.write(bytes(b ^ 0xFF for b in good))
    return e


def test_corrupt_quantized_region_is_caught(quant_packed, tmp_path):
    copy = Path(shutil.copytree(quant_packed, tmp_path / "copy"))
    _damage_expert(copy)
    pattern = r"checksum mismatch in tensor 'model\.layers\.1\.mlp\.experts\[0\]' \(expert 0 of layer 1\)"
    with pytest.raises(CheckpointError, match=pattern):
        LLM(copy)  # resident: every region checked on its first read
    with pytest.raises(CheckpointError, match=pattern):
        LLM(copy, expert_slots=8, verify="full")
    with PackedCheckpoint(copy) as ckpt, pytest.raises(CheckpointError, match=r"1 corrupt region"):
        ckpt.verify()


def test_truncated_quantized_file_is_caught(quant_packed, tmp_path):
    copy = Path(shutil.copytree(quant_packed, tmp_path / "copy"))
    index = json.loads((copy / INDEX_NAME).read_text())
    last = max(index["experts"], key=lambda e: (e["file"], e["offset"]))
    os.truncate(copy / last["file"], last["offset"] + 4096)
    with pytest.raises(CheckpointError, match=r"truncated: .* tensor 'model\.layers\.\d\.mlp\.experts\[\d\]'"):
        LLM(copy)


def test_malformed_quant_entry_is_named(quant_packed, tmp_path):
    copy = Path(shutil.copytree(quant_packed, tmp_path / "copy"))
    index = json.loads((copy / INDEX_NAME).read_text())
    index["experts"][3]["parts"][0]["quant"]["group_size"] = 48
    (copy / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"malformed quant: group_size 48 for 128 inputs"):
        LLM(copy)


def test_bad_schemes_fail_before_writing(tmp_path):
    with pytest.raises(QuantError, match=r"group size 96 does not divide the input dimension 128"):
        convert(demo_path(), tmp_path / "out", quant="int8", group_size=96, progress=False)
    assert not (tmp_path / "out").exists()
    with pytest.raises(QuantError, match="int4 group size must be one of 32, 64, 128, 256, got 48"):
        convert(demo_path(), tmp_path / "out", quant="int4", group_size=48, progress=False)
    with pytest.raises(QuantError, match="quantization 'int3' is not supported"):
        LLM("demo", quantization="int3")
    with pytest.raises(QuantError, match="a group size needs a quantization kind"):
        LLM("demo", quant_group_size=32)
    assert not list(tmp_path.iterdir())


def test_a_quantized_folder_keeps_its_scheme(quant_packed):
    assert LLM(quant_packed, quantization="int4").quantization["experts"] == {"kind": "int4", "group_size": 32}
    with pytest.raises(MoetierError, match="converted with quantization"):
        LLM(quant_packed, quantization="int8")


def test_cli_convert_quantized(tmp_path, capsys):
    out = tmp_path / "q8"
    assert cli_main(["convert", str(demo_path()), str(out), "--quant", "int8", "--group-size", "32",
                     "--quant-dense", "int8", "--quiet"]) == 0
    index = json.loads((out / INDEX_NAME).read_text())
    assert index["version"] == 2 and index["quant"] == {"experts": {"kind": "int8", "group_size": 32},
                                                        "dense": {"kind": "int8", "group_size": None}}
    assert index["experts"][0]["parts"][1]["quant"] == {"kind": "int8", "group_size": 32, "scales_dtype": "float32"}
    assert cli_main(["convert", str(demo_path()), str(tmp_path / "bad"), "--quant", "int4", "--group-size", "40",
                     "--quiet"]) == 1
    assert "int4 group size must be one of" in capsys.readouterr().err
    assert cli_main(["generate", "--model", str(out), "--prompt", "12+34=", "--max-tokens", "4"]) == 0
    assert "46" in capsys.readouterr().out


def test_planner_sizes_and_times_quantized_experts(tmp_path, monkeypatch):
    from moetier.kernels import linear as qlinear
    from moetier.runtime.planner import ModelCost
    from tiny import fixed_machine_profile

    monkeypatch.setenv(qlinear.ROWS_ENV, "8")  # int kernel below 8 rows, whatever this machine's probe says
    qlinear.quant_rows.cache_clear()
    try:
        with LLM("demo", quantization="int4", expert_slots=8, offload_dir=tmp_path) as llm:
            layout = llm.engine.offload.store.layout
            cost = ModelCost.of(llm.model, layout)
        assert cost.expert_quant[0] == "int4" and cost.expert_bytes == layout.nbytes
        prof, P = fixed_machine_profile(), cost.expert_params
        plain = cost.matmul_s(1, P, prof)  # float32 weights: 4 bytes a parameter streamed
        assert cost.matmul_s(1, P, prof, quant=cost.expert_quant) < plain / 2
        # the wide path dequantizes: never cheaper than streaming the codes at one row
        assert cost.matmul_s(8, P, prof, quant=cost.expert_quant) > cost.matmul_s(1, P, prof, quant=cost.expert_quant)
    finally:
        qlinear.quant_rows.cache_clear()
