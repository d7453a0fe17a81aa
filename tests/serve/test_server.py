"""The server under concurrency and misuse, on loopback: 16 clients at once get exactly the
tokens they get alone; bad requests get 4xx with an OpenAI-style body and the server goes on;
API keys; a full queue answers 503 with Retry-After; a client that leaves mid-stream has its
request cancelled and its cache blocks freed; timeouts; a failing step; /metrics parses."""

from __future__ import annotations

import asyncio
import http.client
import json
import time

import pytest
from serving import CONTEXT, Server

openai = pytest.importorskip("openai")

LONG = CONTEXT - 100  # tokens: seconds of decoding, so the request is cut before its end
PROMPTS = [("The quick brown fox " * k)[: 7 * k + 3] for k in range(1, 17)]  # 4 to 150 chars


def request(server, method, path, body=None, headers=None, timeout=60):
    """(status, headers, parsed JSON or text) of one plain HTTP request."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)
    try:
        data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
        conn.request(method, path, body=data, headers={"Content-Type": "application/json",
                                                       **(headers or {})})
        r = conn.getresponse()
        text = r.read().decode()
        try:
            return r.status, r.headers, json.loads(text)
        except ValueError:
            return r.status, r.headers, text
    finally:
        conn.close()


def metrics(server) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    status, _, text = request(server, "GET", "/metrics")
    assert status == 200
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def wait_for(pred, timeout=20.0):
    t0 = time.monotonic()
    while not pred():
        assert time.monotonic() - t0 < timeout, "timed out"
        time.sleep(0.02)


def open_stream(server, body):
    """A streaming request whose response headers have arrived; (connection, response)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("POST", "/v1/completions", body=json.dumps({**body, "stream": True}),
                 headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.status == 200, r.read()
    return conn, r


def test_16_concurrent_clients_get_their_tokens_alone(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    extra = {"return_token_ids": True, "ignore_eos": True}
    alone = [client.completions.create(model="tiny", prompt=p, max_tokens=24, temperature=0,
                                       extra_body=extra).choices[0].token_ids for p in PROMPTS]
    assert len(server.model.tokenizer.encode(PROMPTS[-1])) > 64  # prefilled in chunks

    peak = []
    step = server.engine.step

    def counting_step():
        peak.append(len(server.engine.running) + len(server.engine.waiting))
        return step()

    server.engine.step = counting_step
    try:
        async def together():
            aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x",
                                         max_retries=0)
            rs = await asyncio.gather(*[aclient.completions.create(
                model="tiny", prompt=p, max_tokens=24, temperature=0, extra_body=extra)
                for p in PROMPTS])
            await aclient.close()
            return [r.choices[0].token_ids for r in rs]

        batched = asyncio.run(together())
    finally:
        del server.engine.step
    assert batched == alone
    assert max(peak) >= 8  # they really ran together
    # and streamed, 16 at once: the same tokens
    async def streamed():
        aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)

        async def one(p):
            ids = []
            async for ch in await aclient.completions.create(
                    model="tiny", prompt=p, max_tokens=24, stream=True, extra_body=extra):
                ids += ch.choices[0].token_ids if ch.choices else []
            return ids

        out = await asyncio.gather(*[one(p) for p in PROMPTS])
        await aclient.close()
        return out

    assert asyncio.run(streamed()) == alone


BAD = [
    (b"{not json", 400, None),
    (b"", 400, None),
    (b"[1, 2]", 400, None),
    ({"prompt": "x", "max_tokens": "5"}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ({"prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ({"prompt": "x", "temperature": 3}, 400, "temperature"),
    ({"prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"prompt": "x", "n": 0}, 400, "n"),
    ({"prompt": "x", "stream": "yes"}, 400, "stream"),
    ({"prompt": 5}, 400, "prompt"),
    ({"prompt": [1, "a"]}, 400, "prompt"),
    ({"prompt": [1000]}, 400, "prompt"),  # outside the vocabulary
    ({"prompt": [5] * CONTEXT}, 400, "prompt"),  # as long as the context
    ({"max_tokens": 3}, 400, "prompt"),
    ({"prompt": "x", "model": "nope"}, 404, "model"),
    ({"prompt": "x", "presence_penalty": 0.5}, 400, "presence_penalty"),
    ({"prompt": "x", "echo": True}, 400, "echo"),
    ({"prompt": "x", "stop": [""]}, 400, "stop"),
    ({"prompt": "x", "logprobs": 50}, 400, "logprobs"),
]


@pytest.mark.parametrize("body,status,param", BAD, ids=[str(b)[:40] for b, _, _ in BAD])
def test_bad_completion_requests(server, body, status, param):
    before = metrics(server)['moec_requests_total{outcome=invalid}']
    code, _, out = request(server, "POST", "/v1/completions", body)
    assert code == status, out
    err = out["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["type"] == "invalid_request_error" and err["param"] == param
    assert metrics(server)['moec_requests_total{outcome=invalid}'] == before + 1
    code, _, out = request(server, "POST", "/v1/completions", {"prompt": "ok", "max_tokens": 2})
    assert code == 200 and out["choices"][0]["finish_reason"] in ("stop", "length")


@pytest.mark.parametrize("body,param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages"),
    ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": -2},
     "max_completion_tokens"),
    ({"messages": [{"role": "user", "content": "x " * CONTEXT}]}, "messages"),
])
def test_bad_chat_requests(server, body, param):
    code, _, out = request(server, "POST", "/v1/chat/completions", body)
    assert code == 400 and out["error"]["param"] == param, out


def test_routes_and_methods(server):
    code, _, out = request(server, "GET", "/v1/nothing")
    assert code == 404 and out["error"]["code"] == "not_found"
    code, _, out = request(server, "GET", "/v1/completions")
    assert code == 405 and "error" in out


def test_api_key(artifact):
    s = Server(artifact, max_batch=2, api_key="s3cret")
    try:
        ok = {"prompt": "x", "max_tokens": 2}
        assert request(s, "POST", "/v1/completions", ok)[0] == 401
        for auth in ("Bearer wrong", "s3cret", "Bearer s3cret2", "bearer s3cret", ""):
            code, hdrs, out = request(s, "POST", "/v1/completions", ok,
                                      {"Authorization": auth})
            assert code == 401 and out["error"]["code"] == "invalid_api_key", auth
        for path in ("/v1/models", "/metrics", "/v1/nothing"):
            assert request(s, "GET", path)[0] == 401
        assert request(s, "GET", "/health")[0] == 200
        good = {"Authorization": "Bearer s3cret"}
        assert request(s, "POST", "/v1/completions", ok, good)[0] == 200
        assert request(s, "GET", "/metrics", headers=good)[0] == 200
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=s.url + "/v1", api_key="wrong", max_retries=0
                          ).completions.create(model="tiny", prompt="x", max_tokens=1)
        r = openai.OpenAI(base_url=s.url + "/v1", api_key="s3cret", max_retries=0
                          ).completions.create(model="tiny", prompt="x", max_tokens=1)
        assert r.usage.completion_tokens == 1
    finally:
        s.stop()


def test_full_queue_answers_503_and_waiting_requests_run(artifact):
    s = Server(artifact, max_batch=1, max_queue=1)
    try:
        long = {"prompt": "The fox", "max_tokens": LONG, "ignore_eos": True}
        c1, r1 = open_stream(s, long)  # runs
        r1.readline()
        c2, r2 = open_stream(s, {**long, "max_tokens": 5})  # waits (queue of 1)
        assert len(s.engine.waiting) == 1 and len(s.engine.running) == 1
        code, hdrs, out = request(s, "POST", "/v1/completions", {"prompt": "x"})
        assert code == 503 and hdrs["Retry-After"] == "1"
        assert out["error"]["code"] == "queue_full"
        code, _, out = request(s, "POST", "/v1/completions", {"prompt": "x", "n": 3})
        assert code == 400  # more than the server can ever hold at once
        c1.close()  # the running one leaves: the waiting one runs to its end
        body = r2.read().decode()
        assert body.endswith("data: [DONE]\n\n") and '"finish_reason":"length"' in body
        m = metrics(s)
        assert m["moec_requests_total{outcome=rejected}"] == 1
        assert m["moec_requests_total{outcome=success}"] == 1
        wait_for(lambda: metrics(s)["moec_requests_total{outcome=cancelled}"] == 1)
        assert request(s, "POST", "/v1/completions", {"prompt": "x"})[0] == 200
        c2.close()
    finally:
        s.stop()


def test_disconnect_mid_stream_frees_blocks(server):
    before = metrics(server)
    conn, r = open_stream(server, {"prompt": "The fox", "max_tokens": LONG,
                                   "ignore_eos": True})
    for _ in range(3):
        assert r.readline().startswith(b"data: {")
        r.readline()
    assert metrics(server)["moec_kv_cache_blocks_in_use"] > 0
    conn.close()
    wait_for(lambda: metrics(server)["moec_kv_cache_blocks_in_use"] == 0)
    after = metrics(server)
    assert after["moec_requests_total{outcome=cancelled}"] == \
        before["moec_requests_total{outcome=cancelled}"] + 1
    assert after["moec_requests_running"] == after["moec_requests_waiting"] == 0
    generated = after["moec_generation_tokens_total"] - before["moec_generation_tokens_total"]
    assert 3 <= generated < LONG  # stopped early


def test_disconnect_while_waiting_for_a_whole_response(server):
    before = metrics(server)["moec_requests_total{outcome=cancelled}"]
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("POST", "/v1/completions", body=json.dumps(
        {"prompt": "The fox", "max_tokens": LONG, "ignore_eos": True}),
        headers={"Content-Type": "application/json"})
    wait_for(lambda: metrics(server)["moec_kv_cache_blocks_in_use"] > 0)
    conn.close()
    wait_for(lambda: metrics(server)["moec_requests_total{outcome=cancelled}"] == before + 1)
    wait_for(lambda: metrics(server)["moec_kv_cache_blocks_in_use"] == 0)


def test_request_timeout(artifact):
    s = Server(artifact, max_batch=2, request_timeout=0.3)
    try:
        body = {"prompt": "The fox", "max_tokens": LONG, "ignore_eos": True}
        code, _, out = request(s, "POST", "/v1/completions", body)
        assert code == 504 and out["error"]["code"] == "timeout"
        _, r = open_stream(s, body)
        text = r.read().decode()
        assert '"code":"timeout"' in text.splitlines()[-2] and "[DONE]" not in text
        wait_for(lambda: metrics(s)["moec_kv_cache_blocks_in_use"] == 0)
        assert metrics(s)["moec_requests_total{outcome=timeout}"] == 2
        assert request(s, "POST", "/v1/completions", {"prompt": "x", "max_tokens": 2})[0] == 200
    finally:
        s.stop()


def test_failing_step_fails_its_requests_and_the_server_goes_on(server):
    model = server.engine.model
    real = model.step

    def boom(*a, **k):
        raise RuntimeError("injected kernel failure")

    model.step = boom
    try:
        code, _, out = request(server, "POST", "/v1/completions", {"prompt": "x"})
    finally:
        model.step = real
    assert code == 500 and "injected kernel failure" in out["error"]["message"]
    assert metrics(server)["moec_kv_cache_blocks_in_use"] == 0
    assert request(server, "GET", "/health")[0] == 200
    assert request(server, "POST", "/v1/completions", {"prompt": "x"})[0] == 200


def test_metrics(server):
    before = metrics(server)
    code, _, out = request(server, "POST", "/v1/completions",
                           {"prompt": "The fox", "max_tokens": 7, "ignore_eos": True})
    assert code == 200
    m = metrics(server)

    def delta(k):
        return m[k] - before.get(k, 0)

    assert delta("moec_requests_total{outcome=success}") == 1
    assert delta("moec_request_finish_total{reason=length}") == 1
    assert delta("moec_generation_tokens_total") == 7
    assert delta("moec_prompt_tokens_total") == out["usage"]["prompt_tokens"]
    assert delta("moec_time_to_first_token_seconds_count") == 1
    assert delta("moec_inter_token_latency_seconds_count") == 6
    assert delta("moec_request_duration_seconds_count") == 1
    assert m["moec_time_to_first_token_seconds_bucket{le=+Inf}"] == \
        m["moec_time_to_first_token_seconds_count"]
    assert m["moec_kv_cache_blocks_in_use"] == 0
    assert m["moec_kv_cache_blocks_total"] == server.engine.pool.num_blocks
    assert m["moec_requests_running"] == m["moec_requests_waiting"] == 0


def test_full_kv_cache_makes_requests_wait_not_fail(artifact, server):
    """A pool of blocks for about 1.5 sequences and 4 requests at once: they wait (or are
    preempted and recomputed) instead of failing, and each gets its tokens alone."""
    g = server.engine.geometry
    blocks = 3 * (-(-160 // g.block_size)) // 2
    s = Server(artifact, max_batch=4, kv_cache=blocks * g.block_bytes())
    try:
        bodies = [{"prompt": p, "max_tokens": 120, "ignore_eos": True, "return_token_ids": True}
                  for p in PROMPTS[:4]]
        alone = [request(server, "POST", "/v1/completions", b)[2]["choices"][0]["token_ids"]
                 for b in bodies]

        assert 4 * s.engine.pool.blocks_for(len(alone[0]) + 1) > blocks == \
            s.engine.pool.num_blocks
        blocked = []  # after a step: sequences left waiting although the batch had room
        step = s.engine.step

        def watching_step():
            out = step()
            if s.engine.waiting and len(s.engine.running) < 4:
                blocked.append(len(s.engine.waiting))
            return out

        s.engine.step = watching_step

        async def together():
            aclient = openai.AsyncOpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0)
            rs = await asyncio.gather(*[aclient.completions.create(
                model="tiny", prompt=b["prompt"], max_tokens=120,
                extra_body={"ignore_eos": True, "return_token_ids": True}) for b in bodies])
            await aclient.close()
            return [r.choices[0].token_ids for r in rs]

        assert asyncio.run(together()) == alone
        assert blocked  # some waited for blocks (or were preempted, to be recomputed)
        m = metrics(s)
        assert m["moec_kv_cache_blocks_in_use"] == 0
        assert m["moec_requests_total{outcome=success}"] == 4
    finally:
        s.stop()


def test_zero_max_tokens_and_no_tokenizer(server):
    code, _, out = request(server, "POST", "/v1/completions",
                           {"prompt": "The fox", "max_tokens": 0, "stream": False})
    assert code == 200 and out["choices"][0]["text"] == ""
    assert out["choices"][0]["finish_reason"] == "length"
    assert out["usage"]["completion_tokens"] == 0
    conn, r = open_stream(server, {"prompt": "The fox", "max_tokens": 0})
    body = r.read().decode()
    assert '"finish_reason":"length"' in body and body.endswith("data: [DONE]\n\n")
    conn.close()
    # an artifact without a tokenizer takes token ids only, and names tokens by id
    tok, server.state.tokenizer = server.state.tokenizer, None
    try:
        code, _, out = request(server, "POST", "/v1/completions", {"prompt": "The fox"})
        assert code == 400 and "no tokenizer" in out["error"]["message"]
        code, _, out = request(server, "POST", "/v1/chat/completions",
                               {"messages": [{"role": "user", "content": "hi"}]})
        assert code == 400 and "no chat template" in out["error"]["message"]
        code, _, out = request(server, "POST", "/v1/completions", {
            "prompt": [1, 5, 9], "max_tokens": 3, "logprobs": 0, "return_token_ids": True,
            "ignore_eos": True})
        assert code == 200
        c = out["choices"][0]
        assert c["logprobs"]["tokens"] == [f"token_id:{t}" for t in c["token_ids"]]
    finally:
        server.state.tokenizer = tok


def test_expert_offload_serves_the_same_tokens(artifact, server):
    """--expert-budget: routed experts under a memory budget (moec.runtime.expert_cache),
    driven from the engine thread; 4 concurrent greedy requests get the resident tokens."""
    import moec

    size = max(ex.nbytes for ex in moec.load(str(artifact), expert_budget=1 << 40)
               .step_model.expert_cache.experts.values())
    s = Server(artifact, max_batch=4, load_kw={"expert_budget": 3 * size})
    try:
        bodies = [{"prompt": p, "max_tokens": 16, "ignore_eos": True, "return_token_ids": True}
                  for p in PROMPTS[:4]]
        want = [request(server, "POST", "/v1/completions", b)[2]["choices"][0]["token_ids"]
                for b in bodies]

        async def together():
            aclient = openai.AsyncOpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0)
            rs = await asyncio.gather(*[aclient.completions.create(
                model="tiny", prompt=b["prompt"], max_tokens=16,
                extra_body={"ignore_eos": True, "return_token_ids": True}) for b in bodies])
            await aclient.close()
            return [r.choices[0].token_ids for r in rs]

        assert asyncio.run(together()) == want
        stats = s.model.step_model.expert_cache.stats.summary()
        assert stats["bytes_read"] > 0  # experts really came from the artifact
    finally:
        s.stop()
