"""`moec generate` and `moec chat`: text generation from a generation artifact.

    moec generate m.moec --prompt "Once upon a time" --max-new-tokens 64 --temperature 0.7
    moec chat m.moec --system "You are terse."

`generate` streams the text to stdout as it comes and ends with the timings on stderr: time to
first token, prefill tokens/s (prompt tokens / time to first token) and decode tokens/s (the
tokens after the first / the time after it). `chat` is an interactive loop: each line you type
is a user message; the model's reply streams back; the history is kept (`/reset` clears it,
`/exit` or end of input quits).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any, TextIO

from moec.errors import InputError
from moec.runtime.cache_policy import POLICIES


def add_sampling_arguments(s: argparse.ArgumentParser) -> None:
    s.add_argument("--max-new-tokens", type=int, default=64, help="most tokens to generate "
                   "(default: %(default)s)")
    s.add_argument("--temperature", type=float, default=None,
                   help="0 is greedy (the default unless the checkpoint's generation_config "
                        "says do_sample)")
    s.add_argument("--top-k", type=int, default=None, help="sample from the k likeliest "
                   "tokens only")
    s.add_argument("--top-p", type=float, default=None, help="sample from the likeliest tokens "
                   "whose probabilities add up to p (nucleus sampling)")
    s.add_argument("--min-p", type=float, default=None, help="drop tokens less likely than "
                   "min-p times the likeliest")
    s.add_argument("--repetition-penalty", type=float, default=None, help="penalise tokens "
                   "already seen: their positive logits divided by it, negative ones multiplied "
                   "(> 1 discourages repeats)")
    s.add_argument("--seed", type=int, default=None, help="seed of the sampling: the same "
                   "seed gives the same tokens")
    s.add_argument("--stop", action="append", default=None, help="a stop string (repeat)")
    s.add_argument("--ignore-eos", action="store_true", help="do not stop at the EOS token")
    s.add_argument("--kv-cache", default=None, help="KV cache size, e.g. 2GB (default: see "
                   "moec.engine.Engine)")
    s.add_argument("--max-seq-len", type=int, default=None, help="longest prompt + output in "
                   "tokens (default: the model's context, at most 4096)")
    add_device_argument(s)
    add_offload_arguments(s)


def add_device_argument(s: argparse.ArgumentParser) -> None:
    s.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N: where the "
                   "model runs (a CUDA artifact needs cuda; with --expert-budget the budget is "
                   "then device memory)")


def add_offload_arguments(s: argparse.ArgumentParser) -> None:
    s.add_argument("--expert-budget", default=None, help="keep at most this much of the routed "
                   "experts in memory, e.g. 3GB (the rest is read from the artifact as layers "
                   "route to it; moec.runtime.expert_cache)")
    s.add_argument("--expert-policy", default="adaptive", choices=POLICIES, help="with "
                   "--expert-budget: which experts leave memory first: adaptive (the expected "
                   "farthest next use, learned from the routing), least recently or least "
                   "frequently used (default: %(default)s)")
    s.add_argument("--expert-source", default="auto", choices=("auto", "host", "disk"),
                   help="with --expert-budget on a GPU: keep every expert in pinned host memory "
                   "(host; auto picks it there) or read misses from the artifact (disk: for "
                   "experts larger than host memory too; the only choice on a CPU)")
    s.add_argument("--prefetch", action="store_true", help="with --expert-budget: read the "
                   "experts the next layer's router predicts ahead (pre-gating; off by default: "
                   "mispredicted reads cost more than they hide, docs/offload.md)")


def _sampling(a: argparse.Namespace) -> dict[str, Any]:
    out = {"max_new_tokens": a.max_new_tokens, "temperature": a.temperature, "top_k": a.top_k,
           "top_p": a.top_p, "min_p": a.min_p, "repetition_penalty": a.repetition_penalty,
           "seed": a.seed, "stop": tuple(a.stop) if a.stop else None,
           "ignore_eos": a.ignore_eos or None}
    return {k: v for k, v in out.items() if v is not None}


def offload_kwargs(a: argparse.Namespace) -> dict[str, Any]:
    """moec.load's expert-offload arguments from add_offload_arguments' flags (none without
    --expert-budget)."""
    if getattr(a, "expert_budget", None) is None:
        return {}
    return {"expert_budget": a.expert_budget, "expert_policy": a.expert_policy,
            "expert_source": a.expert_source,
            "prefetch": a.prefetch}


def _load(a: argparse.Namespace, max_batch: int = 1) -> Any:
    import moec
    from moec.cli import _check_device
    from moec.engine import LanguageModel

    off = offload_kwargs(a)
    device = getattr(a, "device", "cpu")
    _check_device(a.artifact, device)
    model = moec.load(a.artifact, device=device, kv_cache=a.kv_cache, max_batch=max_batch,
                      max_seq_len=a.max_seq_len, **off) if _is_lm(a.artifact) else None
    if not isinstance(model, LanguageModel):
        raise InputError(f"{a.artifact} is not a generation artifact: compile a Hugging Face "
                         f"checkpoint folder (moec compile CKPT_DIR -o m.moec) to generate")
    return model


def _is_lm(path: str) -> bool:
    from moec.runtime.archive import opened
    from moec.runtime.verify import read_manifest

    with opened(path) as folder:
        return isinstance(read_manifest(folder).meta.get("generation"), dict)


def cmd_generate(a: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None
                 ) -> int:
    # the streams of the moment, not of import time (a caller may have replaced them since)
    out, err = out or sys.stdout, err or sys.stderr
    model = _load(a)
    if (a.prompt is None) == (a.prompt_ids is None):
        raise InputError("give the prompt as --prompt TEXT or as --prompt-ids \"1 2 3\"")
    if a.prompt_ids is not None:
        try:
            prompt: Any = [int(t) for t in a.prompt_ids.replace(",", " ").split()]
        except ValueError:
            raise InputError(f"--prompt-ids wants integers, got {a.prompt_ids!r}") from None
    else:
        prompt = a.prompt
    ids = model.encode(prompt)
    params = _sampling(a)
    t0 = time.perf_counter()
    first = last = None
    n = 0
    reason = None
    if a.prompt is not None and model.tokenizer is not None:
        out.write(a.prompt)
    for ev in model.stream([ids], **params):
        now = time.perf_counter()
        if ev.token >= 0:
            n += 1
            first = first if first is not None else now
            last = now
            if model.tokenizer is not None:
                out.write(ev.text)
            else:
                out.write(f"{ev.token} ")
            out.flush()
        if ev.finished:
            reason = ev.finish_reason
    out.write("\n")
    out.flush()
    ttft = (first - t0) if first is not None else float("nan")
    dec = (n - 1) / (last - first) if n > 1 and last > first else float("nan")
    err.write(f"[{n} tokens, finish: {reason}] time to first token {ttft * 1e3:.1f} ms, "
              f"prefill {len(ids) / ttft:.1f} tok/s ({len(ids)} prompt tokens), "
              f"decode {dec:.1f} tok/s\n")
    cache = model.step_model.expert_cache
    if cache is not None:
        s = cache.stats.summary()
        err.write(f"[experts] hit rate {_pct(s['hit_rate'])}, prefetch accuracy "
                  f"{_pct(s['prefetch_accuracy'])} (reads used {_pct(s['prefetch_precision'])}"
                  f"), read {s['bytes_read'] / 2**20:.1f} MiB, "
                  f"waited {s['wait_s'] * 1e3:.0f} ms of {s['read_s'] * 1e3:.0f} ms reading\n")
    return 0


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def profile_generation(a: argparse.Namespace, out: TextIO | None = None) -> dict[str, Any]:
    """`moec profile ARTIFACT` for a generation artifact: generate from a prompt (random token
    ids unless --prompt-ids) and report, per MoE layer, the expert cache's hit rate, prefetch
    accuracy and bytes read per token (with --expert-budget), and the routing load."""
    out = out or sys.stdout
    import json

    import numpy as np

    a.kv_cache, a.max_seq_len = None, None
    model = _load(a)
    g = model.step_model.geometry
    if a.prompt_ids:
        ids = [int(t) for t in a.prompt_ids.replace(",", " ").split()]
    else:
        ids = [int(t) for t in np.random.default_rng(0).integers(0, g.vocab_size, a.tokens)]
    counts: dict[int, np.ndarray] = {}
    cache = model.step_model.expert_cache
    if cache is not None:  # count the routing at the cache's hook
        inner = cache.fetch

        def fetch(layer: int, lids: Any, x: Any) -> None:
            e = int(cache.layers[layer]["num_experts"])
            counts.setdefault(layer, np.zeros(e, np.int64))
            np.add.at(counts[layer], lids.ravel(), 1)
            inner(layer, lids, x)

        cache.fetch = fetch  # type: ignore[method-assign]
    res = model.generate(ids, max_new_tokens=a.max_new_tokens, ignore_eos=True)
    data: dict[str, Any] = {"prompt_tokens": len(ids), "generated": len(res.token_ids)}
    if cache is not None:
        s = cache.stats.summary()
        data["experts"] = {**s, "budget": cache.budget, "policy": cache.policy}
        for layer, la in s["per_layer"].items():
            c = counts.get(layer)
            la["load"] = (c / c.sum()).tolist() if c is not None and c.sum() else None
            out.write(f"layer {layer}: hit rate {_pct(la['hit_rate'])}, prefetch accuracy "
                      f"{_pct(la['prefetch_accuracy'])}, {la['bytes_per_token'] or 0:.0f} "
                      f"bytes read per token\n")
        out.write(f"all layers: hit rate {_pct(s['hit_rate'])}, prefetch accuracy "
                  f"{_pct(s['prefetch_accuracy'])}, prefetched reads used "
                  f"{_pct(s['prefetch_precision'])}, overlap {_pct(s['overlap'])}\n")
    else:
        out.write("(no --expert-budget: every expert is resident; nothing to report about "
                  "the expert cache)\n")
    tmp = f"{a.output}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    import os

    os.replace(tmp, a.output)
    return data


def cmd_chat(a: argparse.Namespace, inp: TextIO | None = None, out: TextIO | None = None
             ) -> int:
    inp, out = inp or sys.stdin, out or sys.stdout
    model = _load(a)
    if model.tokenizer is None or model.tokenizer.chat_template is None:
        raise InputError(f"{a.artifact} has no chat template (tokenizer_config.json's "
                         f"chat_template in the checkpoint folder); use moec generate")
    params = _sampling(a)
    history: list[dict[str, str]] = []
    if a.system:
        history.append({"role": "system", "content": a.system})
    interactive = inp.isatty()
    while True:
        if interactive:
            out.write("> ")
            out.flush()
        line = inp.readline()
        if not line or line.strip() == "/exit":
            break
        text = line.rstrip("\n")
        if text.strip() == "/reset":
            history = history[:1] if a.system else []
            continue
        if not text.strip():
            continue
        history.append({"role": "user", "content": text})
        ids = model.tokenizer.encode_chat(history)
        reply = []
        for ev in model.stream([ids], **params):
            if ev.token >= 0 and ev.text:
                reply.append(ev.text)
                out.write(ev.text)
                out.flush()
        out.write("\n")
        out.flush()
        history.append({"role": "assistant", "content": "".join(reply)})
    return 0


def add_commands(sub: Any) -> None:
    s = sub.add_parser("generate", help="generate text with a causal LM artifact (compiled from "
                       "a checkpoint folder), streamed to stdout")
    s.add_argument("artifact", help="a generation artifact (moec compile CKPT_DIR -o m.moec)")
    s.add_argument("--prompt", default=None, help="the prompt text (needs the tokenizer)")
    s.add_argument("--prompt-ids", default=None, help='the prompt as token ids, e.g. "1 2 3"')
    add_sampling_arguments(s)
    s.set_defaults(fn=cmd_generate)

    s = sub.add_parser("chat", help="an interactive chat with a causal LM artifact, with its "
                       "chat template and the conversation's history")
    s.add_argument("artifact", help="a generation artifact with a chat template")
    s.add_argument("--system", default=None, help="a system message")
    add_sampling_arguments(s)
    s.set_defaults(fn=cmd_chat)
