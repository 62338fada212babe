"""The packed checkpoint format: round trips for every family, one-read experts, bad input, the CLI."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

from moetier import LLM, CheckpointError, MoetierError, SamplingParams
from moetier.cli import main
from moetier.weights import packed_write
from moetier.weights.loader import load_model
from moetier.weights.packed import ALIGN, INDEX_NAME, PackedCheckpoint, is_packed
from moetier.weights.direct_io import aligned_buffer
from moetier.units import parse_size
from moetier.weights.packed_write import convert
from tiny import FAMILY_CONFIGS, add_char_tokenizer, make_checkpoint, moetier_logits

FAMILIES = {
    **FAMILY_CONFIGS,
    # gate_up rows of 40 x 48 x 4 bytes: padding inside each expert region, unaligned expert slices
    "mixtral-odd": dict(FAMILY_CONFIGS["mixtral"], hidden_size=48, intermediate_size=20, num_hidden_layers=2,
                        num_local_experts=3, num_experts_per_tok=2),
}
IDS = [5, 17, 99, 3, 42, 42, 7, 120, 64, 1, 88, 23]


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and sa[k].shape == sb[k].shape, k
        assert torch.equal(sa[k], sb[k]), k


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """family -> (HF folder, packed folder), made once."""
    out = {}
    for family, config in FAMILIES.items():
        root = tmp_path_factory.mktemp(family)
        src = make_checkpoint(root / "hf", family.split("-")[0], config)
        out[family] = (src, convert(src, root / "packed", progress=False))
    return out


@pytest.fixture(scope="module")
def mixtral(folders):
    return folders["mixtral"]


@pytest.fixture(scope="module", params=["mixtral", "mixtral-odd"])
def both(request, folders):
    """An aligned and a padded expert layout."""
    return folders[request.param]


@pytest.fixture
def copy(mixtral, tmp_path):
    """A packed mixtral in two weight files (dense, experts), free to damage."""
    dst = convert(mixtral[0], tmp_path / "packed", max_file_size="200KiB", progress=False)
    assert len(list(dst.glob("weights-*.bin"))) >= 2
    return dst


def _index(folder: Path) -> dict:
    return json.loads((folder / INDEX_NAME).read_text())


def _write_index(folder: Path, index: dict) -> None:
    (folder / INDEX_NAME).write_text(json.dumps(index))


# -- round trips ------------------------------------------------------------------------------

@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_round_trip_is_bit_identical(folders, family):
    src, packed = folders[family]
    assert is_packed(packed) and not is_packed(src)
    a, _, _ = load_model(src)
    b, _, _ = load_model(packed, verify=True)
    assert_same_state(a, b)
    assert torch.equal(moetier_logits(a, IDS), moetier_logits(b, IDS))


def test_greedy_output_equal_through_llm(mixtral):
    src, packed = mixtral
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    want = LLM(src).generate([{"prompt_token_ids": IDS}], params)[0].outputs[0].token_ids
    assert LLM(packed, verify=True).generate([{"prompt_token_ids": IDS}], params)[0].outputs[0].token_ids == want


def test_fused_and_sharded_sources_convert_alike(mixtral, tmp_path):
    ref, _, _ = load_model(mixtral[1])
    for kind in ("fused", "sharded"):
        src = make_checkpoint(tmp_path / kind, "mixtral", FAMILIES["mixtral"], fused=kind == "fused",
                              shard_size="40KB" if kind == "sharded" else None)
        model, _, _ = load_model(convert(src, tmp_path / f"{kind}-packed", progress=False))
        assert_same_state(model, ref)


def test_tokenizer_and_configs_are_copied(mixtral, tmp_path):
    src = tmp_path / "hf"
    shutil.copytree(mixtral[0], src)
    add_char_tokenizer(src)
    out = convert(src, tmp_path / "out", progress=False)
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (src / name).read_bytes(), name
    assert not list(out.glob("*.safetensors"))


def test_bf16_convert(folders, tmp_path):
    src = folders["deepseek_v3"][0]
    out = convert(src, tmp_path / "bf16", dtype="bf16", progress=False)
    assert _index(out)["dtype"] == "bfloat16"
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    model, _, _ = load_model(out)  # the folder's own dtype by default
    assert_same_state(model, load_model(src, dtype="bfloat16")[0])
    router = PackedCheckpoint(out).tensors["model.layers.1.mlp.gate.weight"]
    assert router.dtype == torch.float32  # the family keeps router weights in float32
    assert PackedCheckpoint(out).experts[(1, 0)].dtype == torch.bfloat16


def test_load_in_another_dtype_casts_like_the_hf_loader(mixtral):
    a, _, _ = load_model(mixtral[0], dtype="bfloat16")
    b, _, _ = load_model(mixtral[1], dtype="bfloat16")
    assert_same_state(a, b)


# -- layout and one-read experts --------------------------------------------------------------

def test_every_region_is_aligned_and_files_bounded(copy):
    ckpt = PackedCheckpoint(copy)
    for r in ckpt.regions():
        assert r.offset % ALIGN == 0, r.name
        for p in r.parts:
            assert (r.offset + p.offset) % ALIGN == 0, (r.name, p.name)
    limit = parse_size("200KiB")
    for f in copy.glob("weights-*.bin"):
        assert f.stat().st_size % ALIGN == 0
        assert f.stat().st_size <= limit
    index = _index(copy)
    first_expert = min((e["file"], e["offset"]) for e in index["experts"])
    assert all((t["file"], t["offset"]) < first_expert for t in index["tensors"])  # dense first


def test_read_expert_returns_the_exact_slices(both):
    model, _, _ = load_model(both[0])
    with PackedCheckpoint(both[1]) as ckpt:
        for (layer, e), r in ckpt.experts.items():
            experts = model.model.layers[layer].mlp.experts
            gu, dn = ckpt.read_expert(layer, e, verify=True)
            assert torch.equal(gu, experts.gate_up_proj[e]) and torch.equal(dn, experts.down_proj[e])
            # a staging slot laid out like the region, aligned or not, gets the same bytes
            for out in (aligned_buffer(r.read_nbytes), torch.zeros(r.nbytes + 3, dtype=torch.uint8)[3:]):
                ckpt.read_into(layer, e, out)
                with open(r.path, "rb") as fh:
                    fh.seek(r.offset)
                    assert out[: r.nbytes].numpy().tobytes() == fh.read(r.nbytes)
        with pytest.raises(CheckpointError, match="no expert 9 in layer 0"):
            ckpt.expert_region(0, 9)


@pytest.mark.parametrize("direct", [True, False])
def test_small_chunks_many_threads_and_cold_cache(both, direct):
    """Regions split over many chunks, read by 3 threads, with the page cache dropped (O_DIRECT path)."""
    ref, _, _ = load_model(both[0])
    expected = dict(ref.named_parameters())
    with PackedCheckpoint(both[1], direct=direct) as ckpt:
        for r in ckpt.regions():
            fd = os.open(r.path, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
        from moetier.models import get_family

        for chunk in (ALIGN, 3 * ALIGN):
            state = ckpt.load_state(get_family("mixtral").weights, expected, torch.device("cpu"), torch.float32,
                                    verify=True, threads=3, chunk_bytes=chunk)
    for name, t in state.items():
        assert torch.equal(t, expected[name]), name


def test_tmpfs_falls_back_to_buffered_reads(mixtral, tmp_path):
    shm = Path("/dev/shm")
    if not shm.is_dir() or not os.access(shm, os.W_OK):
        pytest.skip("no writable /dev/shm")
    dst = shm / f"moetier-test-{os.getpid()}"
    try:
        shutil.copytree(mixtral[1], dst)
        with PackedCheckpoint(dst) as ckpt:
            r = ckpt.expert_region(0, 0)
            ckpt.read_expert(0, 0)
            direct = ckpt.reader.uses_direct(r.path, r.what)
        assert_same_state(load_model(dst, verify=True)[0], load_model(mixtral[0])[0])
        if direct:
            pytest.skip("this /dev/shm accepts O_DIRECT; the fallback was not exercised")
    finally:
        shutil.rmtree(dst, ignore_errors=True)


def test_filesystems_refusing_o_direct(mixtral, monkeypatch):
    """O_DIRECT refused at open (tmpfs on older kernels) or at the first read: buffered reads, same tensors."""
    from moetier.weights import direct_io

    ref, _, _ = load_model(mixtral[0])
    real_open = os.open

    def no_direct_open(path, flags, *a):
        if flags & os.O_DIRECT:
            raise OSError(22, "Invalid argument")
        return real_open(path, flags, *a)

    monkeypatch.setattr(direct_io.os, "open", no_direct_open)
    assert_same_state(load_model(mixtral[1], verify=True)[0], ref)
    monkeypatch.setattr(direct_io.os, "open", real_open)

    real_pread = direct_io._pread_full
    direct_fds = set()

    def einval_on_direct(fd, view, offset):
        if fd in direct_fds:
            raise OSError(22, "Invalid argument")
        return real_pread(fd, view, offset)

    monkeypatch.setattr(direct_io, "_pread_full", einval_on_direct)
    with PackedCheckpoint(mixtral[1]) as ckpt:
        r = ckpt.expert_region(1, 2)
        assert ckpt.reader.uses_direct(r.path, r.what)
        direct_fds.add(ckpt.reader._open(r.path, r.what).direct_fd)
        ckpt.reader._open(r.path, r.what).cache = None  # as if cold: the read must go to the disk
        gu, dn = ckpt.read_expert(1, 2, verify=True)
        assert not ckpt.reader.uses_direct(r.path, r.what)
    experts = ref.model.layers[1].mlp.experts
    assert torch.equal(gu, experts.gate_up_proj[2]) and torch.equal(dn, experts.down_proj[2])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dtype", [None, "bfloat16"])
def test_cuda_load_equals_the_hf_folder(both, dtype):
    """Pinned buffers, side-stream copies (and a cast on the device for bf16)."""
    a, _, _ = load_model(both[0], device="cuda", dtype=dtype)
    b, _, _ = load_model(both[1], device="cuda", dtype=dtype, verify=True)
    assert next(b.parameters()).device.type == "cuda"
    assert_same_state(a, b)
    with PackedCheckpoint(both[1]) as ckpt:
        from moetier.models import get_family

        expected = dict(a.named_parameters())
        state = ckpt.load_state(get_family("mixtral").weights, expected, torch.device("cuda"),
                                next(a.parameters()).dtype, verify=True, threads=3, chunk_bytes=ALIGN)
    for name, t in state.items():
        assert torch.equal(t, expected[name]), name


# -- bad input --------------------------------------------------------------------------------

def test_truncated_file_names_file_and_tensor(copy):
    f = copy / "weights-00002.bin"
    f.write_bytes(f.read_bytes()[:-5000])
    with pytest.raises(CheckpointError, match=r"weights-00002\.bin: truncated: .*tensor 'model\.layers\.\d+\.mlp\.experts\[\d\]'"):
        LLM(copy)


def test_file_truncated_after_opening_is_caught_by_the_read(copy, mixtral):
    ref, _, _ = load_model(mixtral[0])
    with PackedCheckpoint(copy) as ckpt:
        f = copy / "weights-00002.bin"
        os.truncate(f, f.stat().st_size - 3 * ALIGN)
        from moetier.models import get_family

        with pytest.raises(CheckpointError, match=r"weights-00002\.bin: truncated: tensor .* needs bytes"):
            ckpt.load_state(get_family("mixtral").weights, dict(ref.named_parameters()), torch.device("cpu"),
                            torch.float32)


def test_flipped_byte_is_found_with_verify(copy):
    index = _index(copy)
    e = index["experts"][5]
    f = copy / e["file"]
    data = bytearray(f.read_bytes())
    data[e["offset"] + 100] ^= 0x01
    f.write_bytes(bytes(data))
    load_model(copy, verify="off")  # sizes are fine: without checksums the damage cannot be seen
    pattern = re.escape(f"{e['file']}: checksum mismatch in tensor '{e['name']}' (expert {e['expert']} of "
                        f"layer {e['layer']})")
    for verify in (None, "first-read", True, "full"):  # the resident load reads it: checked on that first read
        with pytest.raises(CheckpointError, match=pattern):
            load_model(copy, verify=verify)
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        PackedCheckpoint(copy).read_expert(e["layer"], e["expert"], verify=True)
    with pytest.raises(CheckpointError, match=r"1 corrupt region"):
        PackedCheckpoint(copy).verify()


def test_flipped_byte_in_a_dense_tensor(copy):
    t = _index(copy)["tensors"][0]
    f = copy / t["file"]
    data = bytearray(f.read_bytes())
    data[t["offset"] + t["nbytes"] - 1] ^= 0x80
    f.write_bytes(bytes(data))
    for verify in (True, "first-read"):  # the default checks each region as the load reads it
        with pytest.raises(CheckpointError, match=rf"checksum mismatch in tensor '{t['name']}'"):
            LLM(copy, verify=verify)
    LLM(copy, verify="off")  # sizes only


def test_missing_file(copy):
    (copy / "weights-00002.bin").unlink()
    with pytest.raises(CheckpointError, match=r"weights-00002\.bin: weight file is missing .*tensor '"):
        LLM(copy)


def test_index_pointing_past_the_end(copy):
    index = _index(copy)
    last = max((t for t in index["experts"] if t["file"] == "weights-00002.bin"), key=lambda t: t["offset"])
    last["offset"] += 2 * ALIGN
    _write_index(copy, index)
    with pytest.raises(CheckpointError, match=re.escape(f"weights-00002.bin: the index places tensor '{last['name']}'") + ".*past the end"):
        LLM(copy)


@pytest.mark.parametrize("damage,message", [
    (lambda ix: "{not json", r"moetier-index\.json: malformed JSON"),
    (lambda ix: {**ix, "version": 99}, r"format version 99 is not supported"),
    (lambda ix: {**ix, "format": "other"}, r"malformed: not a moetier-packed index"),
    (lambda ix: {k: v for k, v in ix.items() if k != "tensors"}, r"malformed: 'tensors' is missing"),
    (lambda ix: _edit(ix, "tensors", 0, nbytes="12"), r"malformed: tensors\[0\] has nbytes='12'"),
    (lambda ix: _edit(ix, "tensors", 0, nbytes=8), r"tensor 'model\.embed_tokens\.weight' has nbytes=8 but shape"),
    (lambda ix: _edit(ix, "tensors", 1, offset=100), r"tensor '.+' starts at 100, not a multiple of 4096"),
    (lambda ix: _edit(ix, "tensors", 1, offset=0), r"overlaps the region before it"),
    (lambda ix: _edit(ix, "tensors", 0, dtype="int3"), r"dtype='int3'"),
    (lambda ix: _edit(ix, "tensors", 0, dtype=["float32"]), r"dtype=\['float32'\]"),
    (lambda ix: _edit(ix, "tensors", 0, shape=[128, -64]), r"shape=\[128, -64\]"),
    (lambda ix: {**ix, "dtype": {}}, r"malformed: dtype \{\}"),
    (lambda ix: _edit(ix, "tensors", 0, file="../x.bin"), r"in '\.\./x\.bin', which 'files' does not list"),
    (lambda ix: _edit(ix, "experts", 0, parts=[]), r"experts\[0\]' has 0 parts, expected 2"),
    (lambda ix: _edit(ix, "experts", 0, nbytes=4), r"experts\[0\]' has nbytes=4 but its parts span \d+"),
    (lambda ix: {**ix, "tensors": ix["tensors"] + ix["tensors"][:1]}, r"'model\.embed_tokens\.weight' is listed twice"),
])
def test_malformed_index(copy, damage, message):
    ix = damage(_index(copy))
    (copy / INDEX_NAME).write_text(ix if isinstance(ix, str) else json.dumps(ix))
    with pytest.raises(CheckpointError, match=message):
        LLM(copy)


def _edit(ix: dict, key: str, i: int, **changes) -> dict:
    ix[key][i].update(changes)
    return ix


def test_shape_disagreeing_with_config(copy):
    cfg = json.loads((copy / "config.json").read_text())
    cfg["intermediate_size"] = 80
    (copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"tensor 'model\.layers\.0\.mlp\.experts\[0\]'.*gate_up_proj.*has shape \[192, 64\], expected \[160, 64\]"):
        LLM(copy)


# -- convert: atomicity and the command line ---------------------------------------------------

def test_interrupted_convert_leaves_nothing(mixtral, tmp_path, monkeypatch):
    calls = 0
    real = packed_write._write_expert

    def flaky(*args, **kw):
        nonlocal calls
        calls += 1
        if calls == 3:
            raise KeyboardInterrupt  # like Ctrl-C midway
        return real(*args, **kw)

    monkeypatch.setattr(packed_write, "_write_expert", flaky)
    root = tmp_path / "out"
    root.mkdir()
    with pytest.raises(KeyboardInterrupt):
        convert(mixtral[0], root / "packed", progress=False)
    assert list(root.iterdir()) == []  # no output and no temporary folder

    monkeypatch.setattr(packed_write, "_write_expert", real)
    existing = convert(mixtral[0], root / "packed", progress=False)
    before = sorted(p.name for p in existing.iterdir())
    calls = 0
    monkeypatch.setattr(packed_write, "_write_expert", flaky)
    with pytest.raises(KeyboardInterrupt):
        convert(mixtral[0], existing, force=True, progress=False)
    assert sorted(p.name for p in root.iterdir()) == ["packed"]  # the old folder, untouched
    assert sorted(p.name for p in existing.iterdir()) == before
    PackedCheckpoint(existing).verify()


def test_convert_refuses_to_overwrite(mixtral, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(MoetierError, match="not empty; pass --force"):
        convert(mixtral[0], out, progress=False)
    convert(mixtral[0], out, force=True, progress=False)
    assert is_packed(out) and not (out / "keep.txt").exists()
    with pytest.raises(MoetierError, match="already a packed"):
        convert(out, tmp_path / "again", progress=False)
    with pytest.raises(MoetierError, match="must not be the source"):
        convert(mixtral[0], mixtral[0], force=True, progress=False)


def test_cli_convert_and_verify(mixtral, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["convert", str(mixtral[0]), str(out), "--max-file-size", "100KB", "--quiet"]) == 0
    assert len(list(out.glob("weights-*.bin"))) > 1
    assert main(["convert", "--verify", str(out), "--quiet"]) == 0
    assert ": ok:" in capsys.readouterr().out
    e = _index(out)["experts"][-1]
    f = out / e["file"]
    data = bytearray(f.read_bytes())
    data[e["offset"]] ^= 0xFF
    f.write_bytes(bytes(data))
    assert main(["convert", "--verify", str(out), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "checksum mismatch" in err and e["file"] in err and e["name"] in err
    assert main(["convert", str(mixtral[0]), str(out), "--quiet"]) == 1  # exists, no --force
    assert "--force" in capsys.readouterr().err


def test_cli_help_explains(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["convert", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "--verify" in text and "--dtype" in text and "--max-file-size" in text and "4 KiB" in text


def test_large_buffers_start_on_a_huge_page_and_small_ones_on_a_page():
    """Weight buffers of a huge page or more start on a huge-page boundary (so THP can back them whole);
    smaller ones stay page-aligned, rounded up to whole pages; each buffer is its own memory."""
    from moetier.weights.direct_io import ALIGN, HUGE_PAGE

    big, small = aligned_buffer(HUGE_PAGE + 5), aligned_buffer(100)
    assert big.data_ptr() % HUGE_PAGE == 0 and big.numel() == HUGE_PAGE + ALIGN
    assert small.data_ptr() % ALIGN == 0 and small.numel() == ALIGN
    big.fill_(7)
    small.fill_(1)
    assert int(big.sum()) == 7 * big.numel() and int(small.sum()) == small.numel()
