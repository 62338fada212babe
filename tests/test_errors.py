"""Bad input gets an error that names the problem."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from moetier import LLM, CheckpointError, ConfigError, RequestError, SamplingParams
from tiny import make_checkpoint

CONFIG = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
              num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2, vocab_size=64,
              max_position_embeddings=32)


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("good"), "mixtral", CONFIG)


@pytest.fixture
def copy(good, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(good, dst)
    return dst


def _edit_config(folder, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    for k, v in changes.items():
        if v is None:
            cfg.pop(k)
    (folder / "config.json").write_text(json.dumps(cfg))


def test_missing_folder(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        LLM(tmp_path / "nope")


def test_missing_config(copy):
    (copy / "config.json").unlink()
    with pytest.raises(ConfigError, match=r"config\.json: missing"):
        LLM(copy)


def test_malformed_config(copy):
    (copy / "config.json").write_text('{"model_type": "mixtral", ')
    with pytest.raises(ConfigError, match="malformed JSON"):
        LLM(copy)


def test_unknown_model_type_lists_supported(copy):
    _edit_config(copy, model_type="llama")
    with pytest.raises(ConfigError, match="'llama' is not supported.*deepseek_v3.*mixtral"):
        LLM(copy)


def test_missing_required_key(copy):
    _edit_config(copy, hidden_size=None)
    with pytest.raises(ConfigError, match="'hidden_size' is missing"):
        LLM(copy)


def test_wrong_type_in_config(copy):
    _edit_config(copy, num_hidden_layers="two")
    with pytest.raises(ConfigError, match="'num_hidden_layers' should be int"):
        LLM(copy)


def test_unsupported_rope_type(copy):
    _edit_config(copy, rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0})
    with pytest.raises(ConfigError, match="rope type 'dynamic'"):
        LLM(copy)


def test_truncated_safetensors_names_file_and_tensor(copy):
    f = copy / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated: tensor '.+'"):
        LLM(copy)


def test_garbage_weight_file(copy):
    (copy / "model.safetensors").write_bytes(b"\x00" * 7)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        LLM(copy)


def test_wrong_shape_names_tensor_and_sizes(copy):
    f = copy / "model.safetensors"
    sd = load_file(f)
    name = "model.layers.1.self_attn.q_proj.weight"
    sd[name] = torch.zeros(16, 32)
    save_file(sd, str(f))
    with pytest.raises(CheckpointError, match=rf"{name}.*shape \[16, 32\], expected \[32, 32\]"):
        LLM(copy)


def test_config_disagreeing_with_expert_count(copy):
    _edit_config(copy, num_local_experts=3)
    with pytest.raises(CheckpointError, match="expert 3 .* 3 experts|shape"):
        LLM(copy)


def test_missing_tensor_is_named(copy):
    f = copy / "model.safetensors"
    sd = load_file(f)
    del sd["model.norm.weight"]
    save_file(sd, str(f))
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight"):
        LLM(copy)


def test_missing_shard(tmp_path):
    folder = make_checkpoint(tmp_path / "sharded", "mixtral", CONFIG, shard_size="20KB")
    shards = sorted(folder.glob("*.safetensors"))
    shards[-1].unlink()
    with pytest.raises(CheckpointError, match=f"{shards[-1].name}.*missing"):
        LLM(folder)


def test_no_weights(copy):
    (copy / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        LLM(copy)


def test_prompt_longer_than_context(good):
    llm = LLM(good, dtype="float32")
    with pytest.raises(RequestError, match="40 tokens but the model's context is 32"):
        llm.generate([{"prompt_token_ids": [1] * 40}], SamplingParams(max_tokens=4))


def test_bad_prompts_fail_before_any_work(good):
    llm = LLM(good, dtype="float32")
    with pytest.raises(RequestError, match="empty"):
        llm.generate([{"prompt_token_ids": [1, 2]}, {"prompt_token_ids": []}])
    with pytest.raises(RequestError, match="token id 64 is outside the vocabulary"):
        llm.generate([{"prompt_token_ids": [64]}])
    assert not llm.engine.has_unfinished()
    with pytest.raises(RequestError, match="needs a tokenizer"):
        llm.generate(["text without a tokenizer"])


def test_generation_stops_at_context_end(good):
    llm = LLM(good, dtype="float32")
    c = llm.generate([{"prompt_token_ids": [1] * 28}], SamplingParams(max_tokens=100, ignore_eos=True))[0].outputs[0]
    assert len(c.token_ids) == 4 and c.finish_reason == "length"


@pytest.mark.parametrize("kwargs", [dict(temperature=-1), dict(top_p=0), dict(max_tokens=0), dict(n=0),
                                    dict(top_k=-2)])
def test_bad_sampling_params(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)


def test_bad_dtype(good):
    with pytest.raises(ValueError, match="dtype 'int8'"):
        LLM(good, dtype="int8")
