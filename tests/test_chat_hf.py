"""The hf: backend on the tiny random Llama, and one test on the real default model."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from esvr.models.backends import load_chat_model
from esvr.models.chat import ChatRequest
from esvr.models.hf_backend import HFChat, split_hf_spec

USER = [{"role": "user", "content": "How are you feeling today?"}]


@pytest.fixture(scope="module")
def tiny_chat(tiny_llama: Path) -> HFChat:
    return load_chat_model(f"hf:{tiny_llama}")


def test_spec_parsing():
    assert split_hf_spec("hf:/m/base+/m/adapter") == ("/m/base", "/m/adapter")
    assert split_hf_spec("hf:org/model") == ("org/model", None)
    assert split_hf_spec("default") == ("default", None)


def test_chat_returns_n_completions(tiny_chat: HFChat):
    greedy = tiny_chat.chat(USER, n=2, max_tokens=5)
    assert len(greedy) == 2 and greedy[0] == greedy[1]  # greedy: one answer, repeated
    sampled = tiny_chat.chat(USER, n=3, temperature=1.0, max_tokens=5, seed=1)
    assert len(sampled) == 3 and all(isinstance(s, str) for s in sampled)


def test_batch_matches_single_requests(tiny_chat: HFChat):
    msgs = [[{"role": "user", "content": f"question number {i}"}] for i in range(3)]
    batched = tiny_chat.chat_batch([ChatRequest.build(m, max_tokens=6) for m in msgs])
    single = [tiny_chat.chat(m, max_tokens=6) for m in msgs]
    assert batched == single  # left padding does not change greedy outputs


def test_score_choices_is_a_distribution(tiny_chat: HFChat):
    dist = tiny_chat.score_choices(USER, ["1", "2", "3", "4", "5"])
    assert set(dist) == {"1", "2", "3", "4", "5"}
    assert sum(dist.values()) == pytest.approx(1.0)
    assert all(0 < p < 1 for p in dist.values())


def test_concurrent_achat_calls_are_batched(tiny_chat: HFChat):
    before = tiny_chat.usage.calls

    async def many():
        return await asyncio.gather(*[tiny_chat.achat([{"role": "user", "content": f"hi {i}"}], max_tokens=4) for i in range(6)])

    replies = asyncio.run(many())
    assert len(replies) == 6 and all(len(r) == 1 for r in replies)
    assert tiny_chat.usage.calls - before == 6


def test_lora_adapter_is_loaded_from_the_spec(tiny_llama: Path, tmp_path: Path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)  # a non-zero adapter changes the outputs
    peft_model.save_pretrained(tmp_path / "adapter")

    plain = load_chat_model(f"hf:{tiny_llama}")
    adapted = load_chat_model(f"hf:{tiny_llama}+{tmp_path / 'adapter'}")
    assert adapted.cache_id != plain.cache_id
    assert plain.score_choices(USER, ["yes", "no"]) != adapted.score_choices(USER, ["yes", "no"])


def test_stream_yields_text(tiny_chat: HFChat):
    pieces = list(tiny_chat.stream(USER, max_tokens=5))
    assert "".join(pieces).strip() == tiny_chat.chat(USER, max_tokens=5)[0]


def test_real_default_model_answers_and_scores():
    model = load_chat_model("default")
    reply = model.chat([{"role": "user", "content": "Say hello to a friend in one short sentence."}], max_tokens=16)[0]
    assert len(reply.split()) >= 2
    dist = model.score_choices([{"role": "user", "content": "Is water wet? Answer Yes or No."}], ["Yes", "No"])
    assert sum(dist.values()) == pytest.approx(1.0)
    model.close()


def _full_sequence_scores(chat: HFChat, messages, choices) -> dict[str, float]:
    """The direct computation: every (prompt + choice) row run in full, no shared prefix."""
    tok = chat.tokenizer
    prompt = tok(chat._prompt_text(messages), add_special_tokens=False)["input_ids"]
    logps = []
    for choice in choices:
        ids = tok(choice, add_special_tokens=False)["input_ids"]
        with torch.inference_mode():
            logits = chat.model(input_ids=torch.tensor([prompt + ids])).logits.float()
        lp = torch.log_softmax(logits[0, len(prompt) - 1 : -1], dim=-1)
        logps.append(lp[torch.arange(len(ids)), torch.tensor(ids)].sum())
    return dict(zip(choices, torch.softmax(torch.stack(logps), dim=0).tolist()))


def test_score_choices_with_shared_prefix_is_exact(tiny_chat: HFChat):
    # choices of different token lengths: padding of the short ones must not leak into scores
    choices = ["Yes", "No, the patient feels worse.", "better", "Self-direction: thought"]
    fast = tiny_chat.score_choices(USER, choices)
    slow = _full_sequence_scores(tiny_chat, USER, choices)
    for c in choices:
        assert fast[c] == pytest.approx(slow[c], abs=1e-4)


def test_weights_load_on_first_use_and_cached_replies_need_none(tiny_llama: Path, tmp_path: Path):
    from esvr.models.chat import ResponseCache

    cache = ResponseCache(tmp_path / "responses.sqlite")
    first = load_chat_model(f"hf:{tiny_llama}", cache=cache)
    assert not first.inner.loaded  # built, not loaded: a resumed stage with nothing to do pays nothing
    reply = first.chat(USER, max_tokens=4)
    assert first.inner.loaded
    again = load_chat_model(f"hf:{tiny_llama}", cache=cache)
    assert again.chat(USER, max_tokens=4) == reply
    assert not again.inner.loaded  # every answer came from the response cache
    first.inner.close()
    assert not first.inner.loaded


def test_a_sample_depends_on_its_request_not_on_its_batch(tiny_chat: HFChat):
    """The micro-batcher groups whatever requests arrive together; a seeded sample must not
    change with them (a simulation rerun with other concurrency gives the same dialogues)."""
    mine = ChatRequest.build(USER, temperature=1.0, max_tokens=6, seed=7, n=2)
    # other requests with the same seed (dialogues at the same turn share one) go into its batch
    others = [
        ChatRequest.build([{"role": "user", "content": f"something else {i}"}], temperature=1.0, max_tokens=6, seed=7)
        for i in range(3)
    ]
    alone = tiny_chat.chat_batch([mine])[0]
    batched = tiny_chat.chat_batch([*others, mine])[-1]
    assert alone == batched
    assert alone[0] != alone[1]  # the n samples of one request differ
    assert tiny_chat.chat_batch([ChatRequest.build(USER, temperature=1.0, max_tokens=6, seed=8)])[0][0] not in alone
    streamed = "".join(tiny_chat.stream(USER, temperature=1.0, max_tokens=6, seed=7)).strip()
    assert streamed == alone[0]  # streaming draws what chat draws
