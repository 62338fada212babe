"""``LLM``: the offline Python API, shaped like vLLM's."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence as Seq, Union

import torch

from .config import EngineConfig
from .errors import RequestError
from .outputs import RequestOutput
from .runtime.engine import Engine
from .runtime.sampling import SamplingParams
from .tokenizer import chat_prompt, eos_ids, load_tokenizer, require
from .weights.loader import load_model

PromptType = Union[str, dict, list[int]]


def resolve_model_path(model: str | Path) -> Path:
    """A checkpoint folder, or ``"demo"`` for the model that ships with the package."""
    if str(model) == "demo":
        from .demo import demo_path

        return demo_path()
    return Path(model).expanduser()


class LLM:
    """Load a MoE checkpoint and generate from it.

    >>> llm = LLM("path/to/checkpoint", device="cpu", dtype="float32")
    >>> out = llm.generate(["Once upon a time"], SamplingParams(max_tokens=32, temperature=0))
    >>> out[0].outputs[0].text
    """

    def __init__(self, model: str | Path, device: str = "cpu", dtype: Optional[str] = None,
                 max_model_len: Optional[int] = None, max_num_seqs: int = 64, max_batch_tokens: int = 8192,
                 seed: Optional[int] = None, *, verify: bool = False):
        """``verify``: check the checksum of every weight region while loading a packed folder."""
        self.config = EngineConfig(str(model), device, dtype, max_model_len, max_num_seqs, max_batch_tokens, seed)
        if seed is not None:
            torch.manual_seed(seed)
        self.path = resolve_model_path(model)
        self.model, self.args, raw_config = load_model(self.path, device, dtype, verify=verify)
        self.tokenizer = load_tokenizer(self.path)
        gen_path = self.path / "generation_config.json"
        self.generation_config = json.loads(gen_path.read_text()) if gen_path.exists() else {}
        limit = self.args.max_position_embeddings
        if max_model_len is not None and max_model_len > limit:
            raise ValueError(f"max_model_len {max_model_len} exceeds the model's max_position_embeddings {limit}")
        self.engine = Engine(self.model, self.tokenizer, eos_ids(self.generation_config, raw_config, self.tokenizer),
                             max_model_len or limit, max_num_seqs, max_batch_tokens)

    def get_tokenizer(self):
        return self.tokenizer

    def _prompt_ids(self, prompt: PromptType) -> tuple[Optional[str], list[int]]:
        if isinstance(prompt, str):
            return prompt, require(self.tokenizer, "a text prompt").encode(prompt)
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), [int(t) for t in prompt["prompt_token_ids"]]
            if "prompt" in prompt:
                return self._prompt_ids(prompt["prompt"])
            raise RequestError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
            return None, list(prompt)
        raise RequestError(f"cannot use {type(prompt).__name__} as a prompt; pass a str or {{'prompt_token_ids': [...]}}")

    def generate(self, prompts: Union[PromptType, Seq[PromptType]],
                 sampling_params: Union[SamplingParams, Seq[SamplingParams], None] = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Generate completions for every prompt; returns one RequestOutput per prompt, in order.

        All prompts are checked before any runs, so a bad one fails the call
        without doing half the work.
        """
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        params_list = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"got {len(params_list)} sampling params for {len(prompts)} prompts")
        encoded = [self._prompt_ids(p) for p in prompts]
        for _, ids in encoded:
            self.engine.check_prompt(ids)
        return self._run(encoded, params_list, use_tqdm)

    def chat(self, messages: Union[list[dict], list[list[dict]]],
             sampling_params: Union[SamplingParams, Seq[SamplingParams], None] = None,
             use_tqdm: bool = True, add_generation_prompt: bool = True) -> list[RequestOutput]:
        """Generate replies to one conversation (a list of messages) or to several."""
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [{"prompt_token_ids": chat_prompt(self.tokenizer, c, add_generation_prompt)} for c in convs]
        return self.generate(prompts, sampling_params, use_tqdm)

    def stream(self, prompt: PromptType, sampling_params: Optional[SamplingParams] = None) -> Iterator[str]:
        """Yield the text of one completion piece by piece as it is generated."""
        params = sampling_params or SamplingParams()
        if params.n != 1:
            raise ValueError("stream() makes one completion; use n=1")
        _, ids = self._prompt_ids(prompt)
        rid = uuid.uuid4().hex
        self.engine.add_request(rid, ids, params)
        try:
            while self.engine.has_unfinished():
                for ev in self.engine.step():
                    if ev.seq.request_id == rid and ev.delta:
                        yield ev.delta
        finally:
            self.engine.abort(rid)

    def _run(self, encoded, params_list, use_tqdm: bool) -> list[RequestOutput]:
        outputs: list[RequestOutput] = []
        for i, ((text, ids), params) in enumerate(zip(encoded, params_list)):
            seqs = self.engine.add_request(str(i), ids, params)
            outputs.append(RequestOutput(str(i), text, ids, [s.out for s in seqs]))
        bar = _progress(len(outputs), use_tqdm)
        done_tokens = 0
        try:
            while self.engine.has_unfinished():
                events = self.engine.step()
                done_tokens += len(events)
                if bar is not None:
                    finished = sum(o.finished for o in outputs)
                    bar.update(finished - bar.n)
                    bar.set_postfix_str(f"{done_tokens / max(bar.format_dict['elapsed'], 1e-9):.1f} tok/s", refresh=False)
        finally:
            for o in outputs:
                self.engine.abort(o.request_id)
            if bar is not None:
                bar.close()
        return outputs


def _progress(total: int, enabled: bool):
    if not enabled or total < 2:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="Generating", unit="req", dynamic_ncols=True)
