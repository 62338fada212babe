"""SamplingParams(prompt_logprobs=k) and LLM.next_token_logprobs against transformers' logits."""

import dataclasses

import pytest
import torch

from moetier import LLM, SamplingParams
from moetier.errors import RequestError
from moetier.runtime import prompt_logprobs
from tiny import (FAMILY_CONFIGS, MORE_FAMILY_CONFIGS, add_char_tokenizer, fixed_machine_profile, make_checkpoint,
                  reference_logits)

pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = ["the quick brown fox", "a", "0123456789" * 3, "MoE!"]
TOL = 1e-4  # float32: moetier and transformers order their sums differently


def _checkpoint(tmp_path_factory, family):
    cfg = dict({**FAMILY_CONFIGS, **MORE_FAMILY_CONFIGS}[family], vocab_size=97, eos_token_id=1, bos_token_id=0,
               pad_token_id=0)
    folder = make_checkpoint(tmp_path_factory.mktemp(family), family, cfg)
    add_char_tokenizer(folder)
    return folder


@pytest.fixture(scope="module", params=["mixtral", "deepseek_v3", "granitemoe"])  # granite: the logits scaling
def ckpt(request, tmp_path_factory):
    return _checkpoint(tmp_path_factory, request.param)


def _reference(folder, ids):
    """transformers' log-softmax at each prompt position, ``[len(ids), vocab]``."""
    return torch.log_softmax(reference_logits(folder, ids), dim=-1)


def _check_against_reference(entries, ids, ref, k, tokenizer):
    assert len(entries) == len(ids) and entries[0] is None
    for pos in range(1, len(ids)):
        row, actual, entry = ref[pos - 1], ids[pos], entries[pos]
        assert actual in entry
        assert entry[actual].logprob == pytest.approx(row[actual].item(), abs=TOL)
        # rank 1 = most likely; a near-tie with another token may go either way
        lo = int((row > row[actual] + TOL).sum()) + 1
        hi = int((row > row[actual] - TOL).sum()) + 1
        assert lo <= entry[actual].rank <= hi
        assert entry[actual].decoded_token == tokenizer.decode([actual])
        assert len(entry) in (k, k + 1)  # the top k, and the actual token when it is not among them
        for t, e in entry.items():  # every entry is that token's logprob
            assert e.logprob == pytest.approx(row[t].item(), abs=TOL)
        best = sorted((e.logprob for e in entry.values()), reverse=True)[:k]
        assert best == pytest.approx(torch.topk(row, k).values.tolist(), abs=TOL)
        others = [e.rank for t, e in entry.items() if t != actual]  # the top k's own places
        assert len(set(others)) == len(others) and set(others) <= set(range(1, k + 1))


@pytest.mark.parametrize("mode", ["latency", "throughput"])
def test_prompt_logprobs_match_transformers(ckpt, mode):
    llm = LLM(ckpt, dtype="float32")
    llm.machine_profile = fixed_machine_profile()
    k = 3
    params = SamplingParams(max_tokens=4, temperature=0, prompt_logprobs=k)
    outs = llm.generate(TEXTS, params, mode=mode, use_tqdm=False)
    for text, out in zip(TEXTS, outs):
        ids = out.prompt_token_ids
        assert ids == llm.tokenizer.encode(text)
        _check_against_reference(out.prompt_logprobs, ids, _reference(ckpt, ids), k, llm.tokenizer)
    if mode == "throughput":  # prompts cut into 5-token chunks across passes: the same entries
        plan = dataclasses.replace(llm.plan(TEXTS, params), max_seqs=2, prefill_tokens=5)
        chunked = llm.generate(TEXTS, params, plan=plan, use_tqdm=False)
        for a, b in zip(chunked, outs):  # attention over a cached chunk rounds differently: approx
            assert [e and sorted(e) for e in a.prompt_logprobs] == [e and sorted(e) for e in b.prompt_logprobs]
            flat = [[x.logprob for e in o.prompt_logprobs[1:] for x in e.values()] for o in (a, b)]
            assert flat[0] == pytest.approx(flat[1], abs=TOL)
        assert [o.outputs[0].token_ids for o in chunked] == [o.outputs[0].token_ids for o in outs]


def test_lm_head_runs_in_bounded_chunks(ckpt, monkeypatch):
    llm = LLM(ckpt, dtype="float32")
    vocab = llm.args.vocab_size
    monkeypatch.setattr(prompt_logprobs, "CHUNK_ELEMENTS", 3 * vocab)  # 3 rows per LM-head call
    rows = []
    hook = llm.model.lm_head.register_forward_pre_hook(lambda m, a: rows.append(a[0].shape[0]))
    text = "0123456789" * 3
    out = llm.generate([text], SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=0), use_tqdm=False)[0]
    hook.remove()
    ids = out.prompt_token_ids
    assert max(rows) <= 3 and sum(r for r in rows) >= len(ids) - 1  # every prompt row, 3 at a time at most
    ref = _reference(ckpt, ids)
    _check_against_reference(out.prompt_logprobs, ids, ref, 0, llm.tokenizer)
    assert all(len(e) == 1 for e in out.prompt_logprobs[1:])  # k = 0: the actual token only


def test_next_token_logprobs_are_full_distributions(ckpt, monkeypatch):
    llm = LLM(ckpt, dtype="float32")
    ids = llm.tokenizer.encode("hello there, MoE")
    got = llm.next_token_logprobs(ids)
    ref = _reference(ckpt, ids)[:-1]
    assert got.shape == ref.shape == (len(ids) - 1, llm.args.vocab_size)
    assert (got - ref).abs().max().item() <= TOL
    assert not llm.engine.has_unfinished()
    monkeypatch.setattr(prompt_logprobs, "CHUNK_ELEMENTS", 3 * llm.args.vocab_size)  # rows arrive 3 at a time
    for start in (1, 4, 5, len(ids) - 2):  # from a chunk's first, middle and last row on
        part = llm.next_token_logprobs(ids, start)
        assert part.shape[0] == len(ids) - 1 - start and (part - ref[start:]).abs().max().item() <= TOL
    with pytest.raises(RequestError, match="start"):
        llm.next_token_logprobs(ids, len(ids))
    others = [llm.tokenizer.encode(t) for t in ("0123456789", "MoE experts")]
    together = llm.next_token_logprobs_batch([ids, *others], 2)  # one step for the three
    for p, got in zip([ids, *others], together):
        assert (got - _reference(ckpt, p)[2:-1]).abs().max().item() <= TOL
    assert not llm.engine.has_unfinished()


def test_first_completion_only_one_token_prompt_and_bad_values(tmp_path_factory):
    folder = _checkpoint(tmp_path_factory, "mixtral")
    llm = LLM(folder, dtype="float32")
    out = llm.generate(["ab", "x"], SamplingParams(n=2, max_tokens=3, temperature=1.0, seed=3, prompt_logprobs=1,
                                                   logprobs=1), use_tqdm=False)
    assert len(out[0].prompt_logprobs) == len(out[0].prompt_token_ids) == 2  # a, b (no BOS)
    assert out[0].prompt_logprobs[0] is None and len(out[0].prompt_logprobs[1]) in (1, 2)
    assert out[1].prompt_logprobs == [None]  # a one-token prompt
    assert all(len(c.logprobs) == len(c.token_ids) for o in out for c in o.outputs)  # sample logprobs unchanged
    plain = llm.generate(["ab"], SamplingParams(max_tokens=3, temperature=0), use_tqdm=False)[0]
    assert plain.prompt_logprobs is None
    one = llm.generate([{"prompt_token_ids": [5]}], SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=2),
                       use_tqdm=False)[0]
    assert one.prompt_logprobs == [None]
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=-1)


def test_offloaded_experts_give_the_same_prompt_logprobs(tmp_path_factory, tmp_path):
    folder = _checkpoint(tmp_path_factory, "mixtral")
    params = SamplingParams(max_tokens=3, temperature=0, prompt_logprobs=2)
    want = LLM(folder, dtype="float32").generate(TEXTS, params, use_tqdm=False)
    llm = LLM(folder, dtype="float32", expert_slots=6, offload_dir=tmp_path)
    try:
        got = llm.generate(TEXTS, params, use_tqdm=False)
    finally:
        llm.close()
    assert [o.prompt_logprobs for o in got] == [o.prompt_logprobs for o in want]
