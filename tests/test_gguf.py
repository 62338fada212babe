"""GGUF import (moetier/weights/gguf.py): blocks carried over exactly, bf16 parity, re-quantized types, errors.

The GGUF files are written here with the gguf package's own writer and quantizers, the way llama.cpp's
converter lays out a Mixtral (llama architecture, fused ffn_*_exps [E, ...], q/k rows permuted by
``LlamaModel.permute``), so these tests need no llama.cpp; tests/test_gguf_llama_cpp.py checks the
same against llama.cpp's real converter and its own outputs where llama-cpp-python is installed.
"""

import json
import logging

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from moetier.errors import CheckpointError, ConfigError, MoetierError
from moetier.kernels.quant import unpack_int4
from moetier.weights.loader import load_model
from tiny import assert_logits_close, make_checkpoint, moetier_logits, reference_logits

gguf = pytest.importorskip("gguf", reason="the GGUF importer reads files with the gguf package")
from moetier.weights.gguf import import_gguf  # noqa: E402

CONFIG = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, vocab_size=300,
              max_position_embeddings=256, rope_theta=1e6)
IDS = [5, 17, 99, 3, 42, 42, 7, 120, 64, 1, 88, 23]
T = gguf.GGMLQuantizationType


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py LlamaModel.permute (q/k rows for its rotary layout)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse, as transformers' GGUF loader writes it (reshape the other way round)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_to_gguf(hf: dict, cfg: dict) -> dict:
    """HF Mixtral tensors (float32 numpy) under llama.cpp's GGUF names, q/k permuted, experts stacked."""
    H, E = cfg["num_attention_heads"], cfg["num_local_experts"]
    out = {"token_embd.weight": hf["model.embed_tokens.weight"], "output_norm.weight": hf["model.norm.weight"],
           "output.weight": hf["lm_head.weight"]}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out[f"blk.{i}.attn_norm.weight"] = hf[p + "input_layernorm.weight"]
        out[f"blk.{i}.ffn_norm.weight"] = hf[p + "post_attention_layernorm.weight"]
        out[f"blk.{i}.attn_q.weight"] = permute(hf[p + "self_attn.q_proj.weight"], H)
        out[f"blk.{i}.attn_k.weight"] = permute(hf[p + "self_attn.k_proj.weight"], cfg["num_key_value_heads"])
        out[f"blk.{i}.attn_v.weight"] = hf[p + "self_attn.v_proj.weight"]
        out[f"blk.{i}.attn_output.weight"] = hf[p + "self_attn.o_proj.weight"]
        out[f"blk.{i}.ffn_gate_inp.weight"] = hf[p + "block_sparse_moe.gate.weight"]
        for ours, theirs in (("gate", "w1"), ("up", "w3"), ("down", "w2")):
            out[f"blk.{i}.ffn_{ours}_exps.weight"] = np.stack(
                [hf[f"{p}block_sparse_moe.experts.{e}.{theirs}.weight"] for e in range(E)])
    return out


def write_gguf(path, tensors: dict, cfg: dict, qtype, arch: str = "llama", experts: bool = True,
               vocab: bool = True) -> None:
    """A GGUF as llama.cpp's converter + quantizer write it: 1D tensors and the router in F32, the rest
    in ``qtype`` (gguf.quants.quantize, llama.cpp's reference quantizers)."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_layer_norm_rms_eps(1e-5)
    if experts:
        w.add_expert_count(cfg["num_local_experts"])
        w.add_expert_used_count(cfg["num_experts_per_tok"])
    w.add_vocab_size(cfg["vocab_size"])
    if vocab:  # a byte-fallback SentencePiece-style vocabulary, as bench/gguf_peer.py's stand-in
        toks = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
        toks += [f"t{i}" for i in range(len(toks), cfg["vocab_size"])]
        w.add_tokenizer_model("llama")
        w.add_token_list(toks)
        w.add_token_scores([0.0] * len(toks))
        w.add_token_types([2, 3, 3] + [6] * 256 + [1] * (len(toks) - 259))
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
    for name, t in tensors.items():
        t = np.ascontiguousarray(t, dtype=np.float32)
        if t.ndim == 1 or name.endswith("ffn_gate_inp.weight"):
            w.add_tensor(name, t)
        else:
            w.add_tensor(name, gguf.quants.quantize(t, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """A bf16 tiny Mixtral (so a BF16 GGUF holds it exactly) and its tensors as float32 numpy."""
    folder = make_checkpoint(tmp_path_factory.mktemp("mixtral"), "mixtral", CONFIG)
    sd = load_file(str(folder / "model.safetensors"))
    from safetensors.torch import save_file

    save_file({k: v.to(torch.bfloat16) for k, v in sd.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    cfg = json.loads((folder / "config.json").read_text())
    cfg["dtype"] = "bfloat16"
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder, {k: v.to(torch.bfloat16).float().numpy() for k, v in sd.items()}


@pytest.fixture(scope="module")
def ggufs(hf, tmp_path_factory):
    folder, tensors = hf
    base = tmp_path_factory.mktemp("gguf")
    files = {}
    for q in ("BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "MXFP4"):
        files[q] = base / f"mixtral-{q}.gguf"
        write_gguf(files[q], hf_to_gguf(tensors, CONFIG), CONFIG, getattr(T, q))
    return files


def file_blocks(path, name: str):
    """One tensor's blocks read with gguf's reader and a numpy record dtype: ``(d, m, qs)`` per block,
    ``qs`` as the file orders it (Q4: byte j holds weight j low, weight j + 16 high)."""
    t = next(t for t in gguf.GGUFReader(str(path)).tensors if t.name == name)
    rec = {"Q8_0": [("d", "<f2"), ("qs", "i1", 32)], "Q4_0": [("d", "<f2"), ("qs", "u1", 16)],
           "Q4_1": [("d", "<f2"), ("m", "<f2"), ("qs", "u1", 16)]}[t.tensor_type.name]
    shape = [int(n) for n in reversed(t.shape.tolist())]
    b = np.asarray(t.data).view(np.dtype(rec)).reshape(*shape[:-1], shape[-1] // 32)
    qs = b["qs"] if t.tensor_type.name == "Q8_0" else np.concatenate([b["qs"] & 15, b["qs"] >> 4], axis=-1)
    return b["d"], (b["m"] if "m" in b.dtype.names else None), qs.reshape(shape)


def packed_quant(folder):
    """The imported experts and dense QuantWeights as the loader installs them."""
    from moetier.weights.packed import PackedCheckpoint

    ckpt = PackedCheckpoint(folder)
    _, args, _ = load_model(folder, experts=False)
    return ckpt, args


@pytest.mark.parametrize("q,exact", [("Q8_0", False), ("Q4_0", True), ("Q4_1", True), ("Q4_0", False), ("Q4_1", False)])
def test_blocks_are_carried_over_exactly(ggufs, tmp_path, q, exact):
    """Codes as in the file; scales as the file's fp16 (int4 by default: rounded to bf16 once)."""
    out = import_gguf(ggufs[q], tmp_path / "out", progress=False, exact_scales=exact)
    sd = torch.float16 if exact or q == "Q8_0" else torch.bfloat16
    index = json.loads((out / "moetier-index.json").read_text())
    kind = "int8" if q == "Q8_0" else "int4"
    assert index["quant"]["experts"] == {"kind": kind, "group_size": 32}
    assert index["source"]["requantized"] == []
    model, _, _ = load_model(out, dtype="bfloat16")
    for layer in range(CONFIG["num_hidden_layers"]):
        experts = model.model.layers[layer].mlp.experts
        d_g, m_g, q_g = file_blocks(ggufs[q], f"blk.{layer}.ffn_gate_exps.weight")
        d_u, m_u, q_u = file_blocks(ggufs[q], f"blk.{layer}.ffn_up_exps.weight")
        d_d, m_d, q_d = file_blocks(ggufs[q], f"blk.{layer}.ffn_down_exps.weight")
        for e in range(CONFIG["num_local_experts"]):
            gu, dn = experts.weights(e)
            for w, d, m, codes in ((gu, np.concatenate([d_g[e], d_u[e]]),
                                    None if m_g is None else np.concatenate([m_g[e], m_u[e]]),
                                    np.concatenate([q_g[e], q_u[e]])), (dn, d_d[e], None if m_d is None else m_d[e], q_d[e])):
                assert w.kind == kind and w.group_size == 32 and w.scales.dtype == sd
                if kind == "int8":
                    assert torch.equal(w.codes, torch.from_numpy(codes))
                    assert torch.equal(w.scales, torch.from_numpy(d.copy()))
                else:
                    assert torch.equal(unpack_int4(w.codes, w.layout), torch.from_numpy(codes.astype(np.uint8)))
                    sz = w.scales if w.layout == "rows" else w.scales.permute(1, 0, 2)  # [N, K/G, (scale, zero)]
                    assert torch.equal(sz[..., 0], torch.from_numpy(d.copy()).to(sd))
                    zero = np.zeros(d.shape, np.float32) if m is None else m.astype(np.float32) + 8 * d.astype(np.float32)
                    assert torch.equal(sz[..., 1], torch.from_numpy(zero).to(sd))
        # and the dequantized weight is gguf's own dequantization of the file's blocks
        t = next(t for t in gguf.GGUFReader(str(ggufs[q])).tensors if t.name == f"blk.{layer}.ffn_down_exps.weight")
        ref = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
        if exact or q == "Q8_0":
            assert torch.equal(experts.weights(1)[1].dequantize(), torch.from_numpy(ref[1]))


def test_bf16_import_is_the_hf_checkpoint(hf, ggufs, tmp_path):
    folder, _ = hf
    out = import_gguf(ggufs["BF16"], tmp_path / "out", progress=False)
    ours, _, _ = load_model(out, dtype="float32")
    theirs, _, _ = load_model(folder, dtype="float32")
    a, b = ours.state_dict(), theirs.state_dict()
    assert a.keys() == b.keys()
    for k in b:  # q/k rows un-permuted, experts un-fused, norms and router back from F32: all exact
        assert torch.equal(a[k], b[k]), k
    logits = moetier_logits(ours, IDS)
    assert torch.equal(logits, moetier_logits(theirs, IDS))
    assert_logits_close(logits, reference_logits(folder, IDS))


@pytest.mark.parametrize("q", ["Q8_0", "Q4_0"])
def test_quantized_import_computes_the_dequantized_model(hf, ggufs, tmp_path, q, monkeypatch):
    """Logits of the imported model = transformers' on the file's weights dequantized by gguf."""
    from transformers import AutoModelForCausalLM

    folder, _ = hf
    out = import_gguf(ggufs[q], tmp_path / "out", dtype="float32", progress=False, exact_scales=True)
    model, _, _ = load_model(out)
    reader = gguf.GGUFReader(str(ggufs[q]))
    deq = {t.name: gguf.quants.dequantize(np.asarray(t.data), t.tensor_type) for t in reader.tensors}
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    sd = ref.state_dict()
    names = {"token_embd.weight": "model.embed_tokens.weight", "output.weight": "lm_head.weight"}
    for i in range(CONFIG["num_hidden_layers"]):
        p = f"model.layers.{i}."
        names.update({f"blk.{i}.attn_v.weight": p + "self_attn.v_proj.weight",
                      f"blk.{i}.attn_output.weight": p + "self_attn.o_proj.weight"})
        sd[p + "self_attn.q_proj.weight"] = torch.from_numpy(unpermute(deq[f"blk.{i}.attn_q.weight"], 4))
        sd[p + "self_attn.k_proj.weight"] = torch.from_numpy(unpermute(deq[f"blk.{i}.attn_k.weight"], 2))
        g, u = deq[f"blk.{i}.ffn_gate_exps.weight"], deq[f"blk.{i}.ffn_up_exps.weight"]
        if p + "mlp.experts.gate_up_proj" in sd:  # transformers 5: fused experts
            sd[p + "mlp.experts.gate_up_proj"] = torch.from_numpy(np.concatenate([g, u], axis=1))
            sd[p + "mlp.experts.down_proj"] = torch.from_numpy(deq[f"blk.{i}.ffn_down_exps.weight"])
        else:
            for e in range(CONFIG["num_local_experts"]):
                for w, a in (("w1", g), ("w3", u), ("w2", deq[f"blk.{i}.ffn_down_exps.weight"])):
                    sd[f"{p}block_sparse_moe.experts.{e}.{w}.weight"] = torch.from_numpy(np.ascontiguousarray(a[e]))
    for g_name, hf_name in names.items():
        sd[hf_name] = torch.from_numpy(deq[g_name])
    ref.load_state_dict(sd)
    with torch.no_grad():
        want = ref(torch.tensor([IDS])).logits[0].float()
    # float32 scales -> exact dequantized values; the int4 kernel computes in fp16 (the scales' dtype). torch's
    # kernels, on float activations: moetier's own quantize the rows to int8 (tests/test_native.py bounds that)
    import moetier.kernels.linear as kl
    import moetier.models.moe as moe

    monkeypatch.setattr(kl, "has_native", lambda w: False)
    monkeypatch.setattr(moe, "fused_ok", lambda *a: False)
    assert_logits_close(moetier_logits(model, IDS), want, rel=1e-4 if q == "Q8_0" else 1e-2)


@pytest.mark.parametrize("q,kind", [("Q5_0", "int4"), ("MXFP4", "int4")])
def test_other_types_are_requantized_and_said(ggufs, tmp_path, q, kind, caplog):
    with caplog.at_level(logging.WARNING, logger="moetier.weights.gguf"):
        out = import_gguf(ggufs[q], tmp_path / "out", progress=False)
    assert "re-quantized" in caplog.text and q in caplog.text
    index = json.loads((out / "moetier-index.json").read_text())
    assert index["quant"]["experts"]["kind"] == kind and any(q in s for s in index["source"]["requantized"])
    model, _, _ = load_model(out)
    t = next(t for t in gguf.GGUFReader(str(ggufs[q])).tensors if t.name == "blk.0.ffn_down_exps.weight")
    ref = torch.from_numpy(gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)[2])
    got = model.model.layers[0].mlp.experts.weights(2)[1].dequantize()
    step = (ref.unflatten(1, (-1, 32)).amax(-1) - ref.unflatten(1, (-1, 32)).amin(-1)) / 15  # int4 step per group
    assert ((got - ref).abs().unflatten(1, (-1, 32)) <= step[..., None] * 0.51 + 1e-2 * step.max()).all()


def test_cli_imports_a_gguf_and_generates(ggufs, tmp_path):
    from moetier import LLM, SamplingParams
    from moetier.cli import main

    out = tmp_path / "out"
    assert main(["convert", str(ggufs["Q4_0"]), str(out), "--quiet"]) == 0
    llm = LLM(out)
    assert llm.quantization is not None and llm.tokenizer is not None  # the tokenizer from the GGUF vocab
    ids = llm.tokenizer.encode("ab", add_special_tokens=False)
    assert ids[-2:] == [3 + ord("a"), 3 + ord("b")]  # the vocabulary's byte tokens <0x61>, <0x62>
    res = llm.generate([{"prompt_token_ids": IDS}], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    assert len(res[0].outputs[0].token_ids) == 4


def test_bad_files_are_clear_errors(hf, ggufs, tmp_path):
    _, tensors = hf
    g = hf_to_gguf(tensors, CONFIG)
    write_gguf(tmp_path / "gpt2.gguf", g, CONFIG, T.Q8_0, arch="gpt2")
    with pytest.raises(ConfigError, match="architecture 'gpt2' is not supported"):
        import_gguf(tmp_path / "gpt2.gguf", tmp_path / "o1", progress=False)
    write_gguf(tmp_path / "dense.gguf", g, CONFIG, T.Q8_0, experts=False)
    with pytest.raises(ConfigError, match="without experts"):
        import_gguf(tmp_path / "dense.gguf", tmp_path / "o2", progress=False)
    g2 = {k: v for k, v in g.items() if k != "blk.1.ffn_down_exps.weight"}
    write_gguf(tmp_path / "lacking.gguf", g2, CONFIG, T.Q8_0)
    with pytest.raises(CheckpointError, match="lacks the down weight of expert 0 in layer 1"):
        import_gguf(tmp_path / "lacking.gguf", tmp_path / "o3", progress=False)
    data = ggufs["Q8_0"].read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.gguf"):
        import_gguf(tmp_path / "cut.gguf", tmp_path / "o4", progress=False)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    with pytest.raises(MoetierError, match="not empty"):
        import_gguf(ggufs["Q8_0"], tmp_path / "full", progress=False)
    assert (tmp_path / "full" / "keep.txt").read_text() == "x"
    for name in ("o1", "o2", "o3", "o4"):
        assert not (tmp_path / name).exists()


def test_tokenizer_choices(hf, ggufs, tmp_path):
    _, tensors = hf
    write_gguf(tmp_path / "novocab.gguf", hf_to_gguf(tensors, CONFIG), CONFIG, T.Q8_0, vocab=False)
    with pytest.raises(MoetierError, match="--tokenizer HF_DIR"):
        import_gguf(tmp_path / "novocab.gguf", tmp_path / "o1", progress=False)
    out = import_gguf(tmp_path / "novocab.gguf", tmp_path / "o2", tokenizer="none", progress=False)
    assert not (out / "tokenizer.json").exists() and (out / "config.json").exists()
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text("{}")
    out = import_gguf(tmp_path / "novocab.gguf", tmp_path / "o3", tokenizer=tok, progress=False)
    assert (out / "tokenizer.json").read_text() == "{}"


ARCH = {"mixtral": "llama", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe", "olmoe": "olmoe"}


def family_gguf(folder, family: str, path) -> None:
    """The checkpoint's weights (as moetier loads them, float32) written as an F32 GGUF under the names
    gguf's own TensorNameMap gives (the converter's), experts split into gate / up / down stacks."""
    from tiny import FAMILY_CONFIGS  # noqa: F401  (the family's tiny config is the checkpoint's)

    model, args, raw = load_model(folder, dtype="float32")
    arch = ARCH[family]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], raw["num_hidden_layers"])
    out = {}
    for k, v in model.state_dict().items():
        v = v.float().numpy()
        if k.endswith("experts.gate_up_proj"):
            half = v.shape[1] // 2
            for part, x in (("gate_proj", v[:, :half]), ("up_proj", v[:, half:])):
                out[names.get_name(k.replace("gate_up_proj", part)) + ".weight"] = x
            continue
        if k.endswith("experts.down_proj"):
            out[names.get_name(k) + ".weight"] = v
            continue
        g = names.get_name(k, try_suffixes=(".weight", ".bias"))
        assert g is not None, k
        if family == "mixtral" and ("q_proj" in k or "k_proj" in k):
            v = permute(v, raw["num_attention_heads"] if "q_proj" in k else raw["num_key_value_heads"])
        out[g] = v.reshape(-1) if k.endswith("shared_expert_gate.weight") else v  # llama.cpp stores [H]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(raw["num_hidden_layers"])
    w.add_context_length(raw["max_position_embeddings"])
    w.add_embedding_length(raw["hidden_size"])
    w.add_feed_forward_length(raw["intermediate_size"])
    w.add_head_count(raw["num_attention_heads"])
    w.add_head_count_kv(raw["num_key_value_heads"])
    w.add_rope_freq_base(args.rope.theta)
    w.add_layer_norm_rms_eps(args.rms_norm_eps)
    w.add_expert_count(raw.get("num_local_experts") or raw["num_experts"])
    w.add_expert_used_count(raw["num_experts_per_tok"])
    w.add_vocab_size(raw["vocab_size"])
    if "moe_intermediate_size" in raw:
        w.add_expert_feed_forward_length(raw["moe_intermediate_size"])
    if "shared_expert_intermediate_size" in raw:
        w.add_expert_shared_feed_forward_length(raw["shared_expert_intermediate_size"])
    if raw.get("head_dim"):
        w.add_key_length(raw["head_dim"])
        w.add_value_length(raw["head_dim"])
    for name, t in out.items():
        w.add_tensor(name, np.ascontiguousarray(t, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"])
def test_each_family_imports_as_its_checkpoint(tmp_path, family):
    from tiny import FAMILY_CONFIGS

    cfg = dict(FAMILY_CONFIGS[family])
    if family == "qwen2_moe":
        cfg["mlp_only_layers"] = []  # llama.cpp's qwen2moe has a sparse MLP in every layer
    folder = make_checkpoint(tmp_path / "hf", family, cfg)
    family_gguf(folder, family, tmp_path / "m.gguf")
    out = import_gguf(tmp_path / "m.gguf", tmp_path / "out", tokenizer="none", progress=False)
    assert json.loads((out / "config.json").read_text())["model_type"] == family
    ours, _, _ = load_model(out, dtype="float32")
    theirs, _, _ = load_model(folder, dtype="float32")
    a, b = ours.state_dict(), theirs.state_dict()
    assert a.keys() == b.keys()
    for k in b:
        assert torch.equal(a[k], b[k]), k
    assert_logits_close(moetier_logits(ours, IDS), reference_logits(folder, IDS))


def test_quant_options_requantize_what_differs(ggufs, tmp_path, caplog):
    """--quant int8 turns Q8_0's groups of 32 into per-channel int8 (the int kernel's), --quant-dense none
    dequantizes attention and the LM head; --quant int4 --group-size 32 on a Q4_0 file re-quantizes nothing."""
    with caplog.at_level(logging.WARNING, logger="moetier.weights.gguf"):
        out = import_gguf(ggufs["Q8_0"], tmp_path / "a", quant="int8", quant_dense="none", progress=False)
    index = json.loads((out / "moetier-index.json").read_text())
    assert index["quant"] == {"experts": {"kind": "int8", "group_size": None}, "dense": None}
    assert "Q8_0 -> int8" in caplog.text
    model, _, _ = load_model(out)
    gu, _ = model.model.layers[0].mlp.experts.weights(0)
    assert gu.group_size == CONFIG["hidden_size"]
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    out = import_gguf(ggufs["Q4_0"], tmp_path / "b", quant="int4", group_size=32, progress=False)
    assert json.loads((out / "moetier-index.json").read_text())["source"]["requantized"] == []
