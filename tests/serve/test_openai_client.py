"""The official `openai` client against a `moec serve` app on loopback: completions and chat,
whole and streamed, stop strings, seeds, n, logprobs and usage, each checked against the same
artifact generating in-process (`LanguageModel.generate`, its own engine)."""

from __future__ import annotations

import json
import urllib.request

import numpy as np
import pytest

openai = pytest.importorskip("openai")

PROMPT = "The quick brown fox jumps"
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi fox"}]


@pytest.fixture(scope="module")
def ref(artifact):
    import moec

    return moec.load(str(artifact), max_batch=4)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0,
                         timeout=60)


def test_models_and_health(server, client):
    ids = [m.id for m in client.models.list().data]
    assert ids == [server.state.model_name] == ["tiny"]
    with urllib.request.urlopen(server.url + "/health") as r:
        assert r.status == 200 and json.loads(r.read()) == {"status": "ok"}


def test_completion_matches_generate(client, ref):
    want = ref.generate(PROMPT, max_new_tokens=12)
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0,
                                  extra_body={"return_token_ids": True})
    (c,) = r.choices
    assert r.object == "text_completion" and r.model == "tiny" and r.id.startswith("cmpl-")
    assert c.text == want.text and c.finish_reason == want.finish_reason
    assert c.token_ids == want.token_ids and c.prompt_token_ids == want.prompt_token_ids
    assert r.usage.prompt_tokens == len(want.prompt_token_ids)
    assert r.usage.completion_tokens == len(want.token_ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    # token-id prompts and a batch of prompts: choices in prompt order
    other = "experts route tokens"
    r = client.completions.create(model="tiny", prompt=[PROMPT, other], max_tokens=6)
    assert [c.index for c in r.choices] == [0, 1]
    assert r.choices[0].text == ref.generate(PROMPT, max_new_tokens=6).text
    assert r.choices[1].text == ref.generate(other, max_new_tokens=6).text
    ids = ref.tokenizer.encode(other)
    r = client.completions.create(model="tiny", prompt=[ids, ids[:3]], max_tokens=6)
    assert r.choices[0].text == ref.generate(ids, max_new_tokens=6).text
    assert r.choices[1].text == ref.generate(ids[:3], max_new_tokens=6).text
    r = client.completions.create(model="tiny", prompt=ids, max_tokens=6)
    assert r.choices[0].text == ref.generate(ids, max_new_tokens=6).text


def test_chat_matches_generate(client, ref):
    want = ref.chat(CHAT, max_new_tokens=10)
    r = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=10)
    (c,) = r.choices
    assert r.object == "chat.completion" and c.message.role == "assistant"
    assert c.message.content == want.text and c.finish_reason == want.finish_reason
    assert r.usage.prompt_tokens == len(ref.tokenizer.encode_chat(CHAT))
    assert r.usage.completion_tokens == len(want.token_ids)
    # content as a list of text parts renders the same prompt
    parts = [{**m, "content": [{"type": "text", "text": m["content"]}]} for m in CHAT]
    r2 = client.chat.completions.create(model="tiny", messages=parts,
                                        max_completion_tokens=10)
    assert r2.choices[0].message.content == want.text


def test_streaming(client, ref):
    want = ref.generate(PROMPT, max_new_tokens=20)
    chunks = list(client.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=20, stream=True,
        stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == want.finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-2])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(
        want.token_ids)
    assert len([c for c in chunks if c.choices]) > 1  # it streamed, not one block

    want = ref.chat(CHAT, max_new_tokens=15)
    chunks = list(client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=15,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want.text
    assert chunks[-1].choices[0].finish_reason == want.finish_reason


def test_stop_strings(client, ref):
    full = ref.generate(PROMPT, max_new_tokens=30, ignore_eos=True).text
    stop = full[8:11]
    assert len(stop) == 3 and full.index(stop) >= 1
    cut = full[:full.index(stop)]
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=30, stop=[stop],
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].text == cut and r.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model="tiny", prompt=PROMPT, max_tokens=30,
                                            stop=stop, stream=True,
                                            extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks) == cut
    assert chunks[-1].choices[0].finish_reason == "stop"
    # a stop string that never comes: the whole text, finish "length"
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=30, stop=["QQQQ"],
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].text == full and r.choices[0].finish_reason == "length"


def test_seed_and_n(client, ref):
    def sample(**kw):
        r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=16,
                                      temperature=1.0, extra_body={"return_token_ids": True,
                                                                   "ignore_eos": True}, **kw)
        return [c.token_ids for c in r.choices]

    a, b, c = sample(seed=7), sample(seed=7), sample(seed=8)
    assert a == b and a != c
    assert a[0] == ref.generate(PROMPT, max_new_tokens=16, temperature=1.0, seed=7,
                                ignore_eos=True).token_ids
    # n choices: choice j samples with seed + j; reproducible, and they differ
    n3 = sample(seed=7, n=3)
    assert len(n3) == 3 and n3 == sample(seed=7, n=3)
    assert n3[0] == a[0] and n3[1] == c[0] and len({tuple(x) for x in n3}) == 3
    # greedy n: identical choices with indices 0..n-1
    r = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=8, n=2)
    assert [c.index for c in r.choices] == [0, 1]
    assert r.choices[0].message.content == r.choices[1].message.content
    assert r.usage.completion_tokens == sum(
        len(ref.chat(CHAT, max_new_tokens=8).token_ids) for _ in range(2))
    # streamed n: each choice's deltas rebuild its text
    texts = ["", ""]
    for ch in client.completions.create(model="tiny", prompt=PROMPT, max_tokens=10, n=2,
                                        temperature=1.0, seed=3, stream=True):
        for c in ch.choices:
            texts[c.index] += c.text
    whole = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=10, n=2,
                                      temperature=1.0, seed=3)
    assert texts == [c.text for c in whole.choices]


def test_logprobs(client, ref):
    want = ref.generate(PROMPT, max_new_tokens=8, logprobs=True, ignore_eos=True)
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, logprobs=3,
                                  extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    np.testing.assert_allclose(lp.token_logprobs, want.logprobs, rtol=1e-6, atol=1e-9)
    assert len(lp.tokens) == len(want.token_ids) == len(lp.top_logprobs) == len(lp.text_offset)
    assert "".join(lp.tokens) == r.choices[0].text  # this tokenizer's pieces are plain text
    assert lp.text_offset == list(np.cumsum([0] + [len(t) for t in lp.tokens[:-1]]))
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs, strict=True):
        assert 1 <= len(top) <= 3 and max(top.values()) == pytest.approx(chosen)  # greedy
    # chat: logprobs=true with top_logprobs, streamed and whole agree
    r = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=6,
                                       logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    want = ref.chat(CHAT, max_new_tokens=6, logprobs=True)
    np.testing.assert_allclose([e.logprob for e in content], want.logprobs, rtol=1e-6)
    for e in content:
        assert len(e.top_logprobs) == 2 and e.top_logprobs[0].logprob == pytest.approx(
            e.logprob) and e.top_logprobs[1].logprob <= e.logprob
        assert bytes(e.bytes).decode() == e.token
    streamed = [e for ch in client.chat.completions.create(
        model="tiny", messages=CHAT, max_tokens=6, logprobs=True, top_logprobs=2, stream=True)
        if ch.choices and ch.choices[0].logprobs for e in ch.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]
    # without logprobs: none
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=3)
    assert r.choices[0].logprobs is None


def test_client_errors(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt="x", max_tokens=1)
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="x", max_tokens=-1)
    assert e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=1,
                                       tools=[{"type": "function",
                                               "function": {"name": "f", "parameters": {}}}])
    assert "not supported" in e.value.body["message"]
