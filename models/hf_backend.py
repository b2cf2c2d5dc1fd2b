"""Local transformers backend: ``hf:<path-or-hub-id>[+<adapter>]`` and ``default``.

- Batched generation with left padding; requests that share sampling settings run together.
- Concurrent ``achat`` calls (many simulated dialogues in flight) are gathered by a micro-batcher
  into one ``generate`` call, so async callers get batching without knowing about it.
- LoRA adapters through peft; CUDA (bf16) when present, else CPU (fp32).
- ``score_choices`` is exact: the summed log-probability of each answer's tokens after the prompt,
  normalized over the answers (one forward pass for all of them).
"""

from __future__ import annotations

import asyncio
import hashlib
import queue
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch

from esvr.models.chat import ChatError, ChatModel, ChatRequest, Message
from esvr.models.config import ModelConfig
from esvr.models.default_model import base_checkpoint
from esvr.models.memory import mark_freed


def split_hf_spec(spec: str) -> tuple[str, str | None]:
    """``hf:base+adapter`` -> (base, adapter); ``default`` -> ('default', None)."""
    body = spec[3:] if spec.startswith("hf:") else spec
    base, _, adapter = body.partition("+")
    return base, adapter or None


def _folder_fingerprint(path: str) -> str:
    """Identifies a local model folder's contents cheaply (names and sizes; adapter bytes in full)."""
    p = Path(path)
    if not p.exists():
        return path  # a hub id: the name is the identity
    h = hashlib.blake2b(digest_size=12)
    for f in sorted(q for q in p.rglob("*") if q.is_file()):
        h.update(str(f.relative_to(p)).encode())
        size = f.stat().st_size
        h.update(str(size).encode())
        if size < 64 << 20:  # adapters and configs: hash the bytes, retraining changes the id
            h.update(f.read_bytes())
    return h.hexdigest()


def pick_device(requested: str | None = None) -> torch.device:
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_causal_lm(base: str, adapter: str | None = None, device: torch.device | None = None):
    """(model, tokenizer) ready for inference; the adapter, if any, is applied with peft."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = device or pick_device()
    path = base_checkpoint(base)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    if adapter:
        from peft import PeftModel

        # Merged for inference: the same outputs, without the adapter's extra matmuls per token.
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    model.to(device).eval()  # type: ignore[arg-type]  # transformers' decorator hides Module.to's signature
    return model, tokenizer


class HFChat(ChatModel):
    def __init__(
        self,
        base: str,
        adapter: str | None = None,
        *,
        device: str | None = None,
        batch_size: int = 8,
        batch_wait_s: float = 0.02,
        weights: tuple[Any, Any] | None = None,
    ):
        """`weights`: a (model, tokenizer) already in memory (e.g. a benchmark's random model)."""
        super().__init__()
        self.base, self.adapter = base, adapter
        self.device = pick_device(device)
        # Loaded on first use: a stage whose replies all come from the response cache, or whose
        # work is already done (a resumed simulation), never pays for the weights.
        self._weights: tuple[Any, Any] | None = weights
        self._load_lock = threading.Lock()
        self.batch_size = batch_size
        self.batch_wait_s = batch_wait_s
        path = base_checkpoint(base)
        self.cache_id = f"hf:{base}@{_folder_fingerprint(path)}"
        if adapter:
            self.cache_id += f"+{adapter}@{_folder_fingerprint(adapter)}"
        self._lock = threading.Lock()  # one generate at a time on this model
        self._queue: queue.Queue[tuple[ChatRequest, Future] | None] | None = None  # None: stop the batcher

    def _loaded(self) -> tuple[Any, Any]:
        with self._load_lock:
            if self._weights is None:
                self._weights = load_causal_lm(self.base, self.adapter, self.device)
            return self._weights

    @property
    def model(self) -> Any:
        return self._loaded()[0]

    @property
    def tokenizer(self) -> Any:
        return self._loaded()[1]

    @property
    def loaded(self) -> bool:
        return self._weights is not None

    @classmethod
    def from_spec(cls, spec: ModelConfig) -> HFChat:
        base, adapter = split_hf_spec(spec.spec)
        return cls(base, adapter, device=spec.device, batch_size=spec.batch_size)

    # -- generation ----------------------------------------------------------------------------
    def _prompt_text(self, messages: Sequence[Message]) -> str:
        return self.tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)

    def _generate(self, requests: list[ChatRequest]) -> list[list[str]]:
        out: list[list[str]] = [[] for _ in requests]
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault((r.temperature, r.max_tokens, r.stop), []).append(i)
        for (temperature, max_tokens, stop), idx in groups.items():
            # Greedy decoding gives one answer however many are asked for; sampling expands.
            flat = [(i, k) for i in idx for k in range(requests[i].n if temperature > 0 else 1)]
            for start in range(0, len(flat), self.batch_size):
                chunk = flat[start : start + self.batch_size]
                texts = self._generate_texts(
                    [self._prompt_text(requests[i].message_dicts()) for i, _ in chunk],
                    temperature=temperature,
                    max_tokens=max_tokens,
                    stop=stop,
                    seeds=[(requests[i].seed, k) for i, k in chunk],
                )
                for (i, _), text in zip(chunk, texts):
                    out[i].append(text)
            for i in idx:
                if temperature <= 0:
                    out[i] = out[i] * requests[i].n
        return out

    def _generate_texts(
        self,
        prompts: list[str],
        *,
        temperature: float,
        max_tokens: int,
        stop: tuple[str, ...],
        seeds: Sequence[tuple[int, int]],
    ) -> list[str]:
        """`seeds`: per prompt, (the request's seed, which of its n samples)."""
        from transformers import LogitsProcessorList

        tok = self.tokenizer
        tok.padding_side = "left"
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        kwargs: dict[str, Any] = dict(max_new_tokens=max_tokens, pad_token_id=tok.pad_token_id)
        # Greedy decoding in both cases: sampling is greedy decoding over Gumbel-perturbed logits
        # (RowSeededSampling), so that a sample depends on its request only, not on its batch.
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if temperature > 0:
            sampling = RowSeededSampling(seeds, temperature, enc["input_ids"].shape[1])
            kwargs.update(logits_processor=LogitsProcessorList([sampling]))
        if stop:
            kwargs.update(stop_strings=list(stop), tokenizer=tok)
        with self._lock, torch.inference_mode():
            try:
                ids = self.model.generate(**enc, **kwargs)
            except Exception as exc:  # e.g. out of memory: name the model and the batch
                raise ChatError(f"{self.cache_id}: generation failed for a batch of {len(prompts)}: {exc}") from exc
        new = ids[:, enc["input_ids"].shape[1] :]
        self._count(
            calls=len(prompts),
            prompt_tokens=int(enc["attention_mask"].sum()),
            completion_tokens=int((new != tok.pad_token_id).sum()),
        )
        texts = tok.batch_decode(new, skip_special_tokens=True)
        return [_cut_at_stop(t, stop).strip() for t in texts]

    # -- async micro-batching --------------------------------------------------------------------
    async def achat(self, messages: Sequence[Message], **kwargs: Any) -> list[str]:
        req = ChatRequest.build(messages, **kwargs)
        fut: Future = Future()
        self._ensure_batcher().put((req, fut))
        return await asyncio.wrap_future(fut)

    def _ensure_batcher(self) -> queue.Queue:
        if self._queue is None:
            self._queue = queue.Queue()
            threading.Thread(target=self._batch_loop, name=f"batcher-{self.cache_id[:20]}", daemon=True).start()
        return self._queue

    def _batch_loop(self) -> None:
        q = self._queue
        assert q is not None
        while True:
            item = q.get()
            if item is None:
                return
            batch = [item]
            try:  # gather what arrives within a short window, up to a full batch
                while len(batch) < self.batch_size:
                    nxt = q.get(timeout=self.batch_wait_s)
                    if nxt is None:
                        q.put(None)
                        break
                    batch.append(nxt)
            except queue.Empty:
                pass
            try:
                results = self._generate([r for r, _ in batch])
                for (_, fut), res in zip(batch, results):
                    fut.set_result(res)
            except Exception as exc:  # noqa: BLE001 - handed to every waiting caller, raised there
                for _, fut in batch:
                    fut.set_exception(exc)

    # -- scoring ---------------------------------------------------------------------------------
    def _score(self, messages: list[Message], choices: list[str]) -> dict[str, float]:
        """Exact log-probabilities of each choice, with the prompt run once for all of them.

        Scoring every (prompt + choice) row in full would hold choices x prompt x vocabulary
        logits: with a judge's 1.5k-token prompt, 5 choices and a 49k vocabulary, ~1.5 GB per
        copy. Here the prompt's keys and values are computed once and shared, and logits exist
        only for the choice tokens.
        """
        tok = self.tokenizer
        prompt_ids = tok(self._prompt_text(messages), add_special_tokens=False)["input_ids"]
        choice_ids = [tok(c, add_special_tokens=False)["input_ids"] for c in choices]
        if any(not c for c in choice_ids):
            raise ValueError(f"score_choices: a choice tokenizes to nothing: {choices!r}")
        width = max(len(c) for c in choice_ids)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        rows = torch.tensor([c + [pad] * (width - len(c)) for c in choice_ids], device=self.device)
        mask = torch.tensor([[1] * (len(prompt_ids) + len(c)) + [0] * (width - len(c)) for c in choice_ids], device=self.device)
        with self._lock, torch.inference_mode():
            prefix = self.model(input_ids=torch.tensor([prompt_ids], device=self.device), use_cache=True, logits_to_keep=1)
            first = torch.log_softmax(prefix.logits[0, -1].float(), dim=-1)  # the choices' first token
            cache = prefix.past_key_values
            cache.batch_repeat_interleave(len(choices))
            # logits at choice position j predict token j+1; the last position predicts nothing
            rest = self.model(input_ids=rows, attention_mask=mask, past_key_values=cache, logits_to_keep=width).logits
            rest = torch.log_softmax(rest[:, : width - 1].float(), dim=-1) if width > 1 else None
        scores = []
        for row, c in enumerate(choice_ids):
            total = first[c[0]]
            if len(c) > 1:
                targets = torch.tensor(c[1:], device=self.device)
                total = total + rest[row, torch.arange(len(c) - 1, device=self.device), targets].sum()  # type: ignore[index]  # width > 1 here
            scores.append(total)
        probs = torch.softmax(torch.stack(scores), dim=0).tolist()
        self._count(calls=1, prompt_tokens=len(prompt_ids))
        return dict(zip(choices, probs))

    # -- streaming ------------------------------------------------------------------------------
    def stream(self, messages: Sequence[Message], **kwargs: Any) -> Iterator[str]:
        from transformers import LogitsProcessorList, TextIteratorStreamer

        req = ChatRequest.build(messages, **kwargs)
        tok = self.tokenizer
        enc = tok([self._prompt_text(messages)], return_tensors="pt", add_special_tokens=False).to(self.device)
        streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
        gen_kwargs: dict[str, Any] = dict(**enc, max_new_tokens=req.max_tokens, streamer=streamer, pad_token_id=tok.pad_token_id)
        gen_kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if req.temperature > 0:  # the same draw as `chat` gives this request
            sampling = RowSeededSampling([(req.seed, 0)], req.temperature, enc["input_ids"].shape[1])
            gen_kwargs.update(logits_processor=LogitsProcessorList([sampling]))

        def run() -> None:
            with self._lock, torch.inference_mode():
                self.model.generate(**gen_kwargs)

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        yield from streamer
        worker.join()

    def close(self) -> None:
        if self._queue is not None:
            self._queue.put(None)
            self._queue = None
        with self._load_lock:
            if self._weights is not None:
                self._weights = None
                mark_freed()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


class RowSeededSampling:
    """A logits processor that makes greedy decoding draw each row's next token from
    softmax(logits / temperature), from the row's own random stream.

    The Gumbel-max trick: the argmax of logits / T plus independent Gumbel noise is a draw from
    softmax(logits / T). The noise of a row at a step comes from a generator seeded by the row's
    (request seed, sample index) and the step, so a request's sample is the same whichever other
    requests the micro-batcher put beside it, and in whatever order (torch's one global stream,
    consumed row after row, made it depend on both).
    """

    def __init__(self, seeds: Sequence[tuple[int, int]], temperature: float, prompt_length: int):
        self.seeds = list(seeds)
        self.temperature = temperature
        self.prompt_length = prompt_length

    def _stream(self, seed: tuple[int, int], step: int) -> torch.Generator:
        digest = hashlib.blake2b(f"{seed[0]}:{seed[1]}:{step}".encode(), digest_size=8).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        step = input_ids.shape[1] - self.prompt_length
        vocab = scores.shape[1]
        uniform = torch.stack([torch.rand(vocab, generator=self._stream(s, step)) for s in self.seeds])
        gumbel = -torch.log(-torch.log(uniform.clamp(1e-20, 1.0 - 1e-7)))
        return scores / self.temperature + gumbel.to(scores.device, scores.dtype)


def _cut_at_stop(text: str, stop: Sequence[str]) -> str:
    cut = len(text)
    for s in stop:
        pos = text.find(s)
        if pos != -1:
            cut = min(cut, pos)
    return text[:cut]
