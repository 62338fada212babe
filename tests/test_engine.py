"""Engine behaviour: batching, seeds, stop rules, chat, streaming."""

import pytest

from moetier import LLM, SamplingParams
from tiny import add_char_tokenizer, make_checkpoint

CONFIG = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, vocab_size=97,
              max_position_embeddings=128, eos_token_id=1, bos_token_id=0)


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    folder = make_checkpoint(tmp_path_factory.mktemp("engine"), "mixtral", CONFIG)
    add_char_tokenizer(folder)
    return LLM(folder, dtype="float32")


PROMPTS = [[5, 17, 90, 3], list(range(10, 40)), [77], [9, 8, 7, 6, 5, 4, 3, 2, 10, 11, 12]]


def _ids(outs):
    return [o.outputs[0].token_ids for o in outs]


def test_mixed_length_batch_equals_one_at_a_time(llm):
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    batched = _ids(llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params))
    single = [_ids(llm.generate([{"prompt_token_ids": p}], params))[0] for p in PROMPTS]
    assert batched == single
    assert all(len(t) == 12 for t in batched)


def test_batch_with_small_max_num_seqs_is_the_same(llm, tmp_path):
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    want = _ids(llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params))
    llm.engine.max_num_seqs = 2  # sequences join as others finish
    try:
        assert _ids(llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params)) == want
    finally:
        llm.engine.max_num_seqs = 64


def test_seeded_sampling_repeats_and_seeds_differ(llm):
    p = {"prompt_token_ids": PROMPTS[0]}
    a = SamplingParams(max_tokens=16, temperature=1.5, seed=7, ignore_eos=True)
    b = SamplingParams(max_tokens=16, temperature=1.5, seed=8, ignore_eos=True)
    first = _ids(llm.generate([p], a))[0]
    assert _ids(llm.generate([p], a))[0] == first
    assert _ids(llm.generate([p], b))[0] != first
    # the same seeded request batched with others gives the same tokens
    mixed = _ids(llm.generate([{"prompt_token_ids": PROMPTS[1]}, p], [SamplingParams(max_tokens=5, temperature=0), a]))
    assert mixed[1] == first


def test_top_k_one_is_greedy(llm):
    p = [{"prompt_token_ids": PROMPTS[3]}]
    greedy = _ids(llm.generate(p, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)))
    assert _ids(llm.generate(p, SamplingParams(max_tokens=10, temperature=0.8, top_k=1, seed=1, ignore_eos=True))) == greedy


def test_top_p_restricts_to_the_most_likely_token_when_tiny(llm):
    p = [{"prompt_token_ids": PROMPTS[2]}]
    greedy = _ids(llm.generate(p, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)))
    assert _ids(llm.generate(p, SamplingParams(max_tokens=10, temperature=1.0, top_p=1e-6, seed=3, ignore_eos=True))) == greedy


def test_max_tokens_and_finish_reason(llm):
    out = llm.generate([{"prompt_token_ids": PROMPTS[0]}], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
    c = out[0].outputs[0]
    assert len(c.token_ids) == 5 and c.finish_reason == "length"
    assert out[0].prompt_token_ids == PROMPTS[0]


def test_stop_token_ids_end_generation(llm):
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    full = _ids(llm.generate([{"prompt_token_ids": PROMPTS[1]}], params))[0]
    stop_at = full[4]
    first = full.index(stop_at)
    c = llm.generate([{"prompt_token_ids": PROMPTS[1]}],
                     SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, stop_token_ids=[stop_at]))[0].outputs[0]
    assert c.token_ids == full[: first + 1] and c.finish_reason == "stop" and c.stop_reason == stop_at


def test_eos_from_generation_config_stops_unless_ignored(llm):
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    full = _ids(llm.generate([{"prompt_token_ids": PROMPTS[1]}], params))[0]
    llm.engine.eos = {full[2]}
    try:
        c = llm.generate([{"prompt_token_ids": PROMPTS[1]}], SamplingParams(max_tokens=12, temperature=0))[0].outputs[0]
        assert c.token_ids == full[: full.index(full[2]) + 1] and c.finish_reason == "stop"
        c = llm.generate([{"prompt_token_ids": PROMPTS[1]}], params)[0].outputs[0]
        assert c.token_ids == full
    finally:
        llm.engine.eos = {1}


def test_stop_string_truncates_text(llm):
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    full = llm.generate(["hello"], params)[0].outputs[0].text
    assert len(full) >= 6
    stop = full[3:5]
    c = llm.generate(["hello"], SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, stop=[stop]))[0].outputs[0]
    assert c.text == full[: full.index(stop)] and c.finish_reason == "stop" and c.stop_reason == stop
    c = llm.generate(["hello"], SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, stop=[stop],
                                               include_stop_str_in_output=True))[0].outputs[0]
    assert c.text == full[: full.index(stop) + len(stop)]


def test_streamed_text_equals_generated_text(llm):
    for stop in (None, ["zz", "q"]):
        params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, stop=stop)
        text = llm.generate(["abc"], params)[0].outputs[0].text
        assert "".join(llm.stream("abc", params)) == text


def test_chat_applies_template(llm):
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    out = llm.chat([{"role": "user", "content": "hi"}], params)
    rendered = "<user>hi\n<assistant>"
    want = llm.generate([rendered], params)
    assert out[0].prompt_token_ids == llm.tokenizer.encode(rendered, add_special_tokens=False)
    assert out[0].outputs[0].token_ids == want[0].outputs[0].token_ids


def test_n_completions_and_logprobs(llm):
    out = llm.generate(["abc"], SamplingParams(n=3, max_tokens=6, temperature=1.0, seed=5, logprobs=2,
                                               ignore_eos=True))[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    for c in out.outputs:
        assert len(c.logprobs) == 6
        for tok, lp in zip(c.token_ids, c.logprobs):
            assert lp["token"] == tok and lp["logprob"] <= 0 and len(lp["top"]) == 2
