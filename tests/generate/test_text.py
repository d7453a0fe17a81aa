"""Text in, text out: a BPE tokenizer trained here (the `tokenizers` library) and a chat
template are saved beside a tiny checkpoint, shipped in the artifact, and used without
transformers. Checked against transformers' own tokenizer (AutoTokenizer on the same folder)
and `generate`: encoding, decoding, chat template rendering, generated text, stop strings,
and the `moec generate` / `moec chat` commands."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from families import model as family_model  # noqa: I001

import moec
from moec.engine.cli import cmd_chat, cmd_generate
from moec.engine.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

TEXT = """The quick brown fox jumps over the lazy dog. A compiler turns models into kernels.
Mixture of experts layers route every token to a few experts. Tokens are sorted by expert,
the experts run as grouped matrix products, and the results are combined again. Generation
keeps the keys and values of every layer in a paged cache, so that each new token attends
to the whole sequence without recomputing it. Ça marche très bien, naïve café!"""
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]  # ids 0..3, as the tiny configs' pad/bos/eos
TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n"
            "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")


def save_tokenizer(folder: Path, vocab: int = 128) -> None:
    from tokenizers import Tokenizer as Tok
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    tok = Tok(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator([TEXT] * 4, trainers.BpeTrainer(vocab_size=vocab,
                                                            special_tokens=SPECIALS))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[
        ("<s>", tok.token_to_id("<s>"))])
    assert tok.get_vocab_size() <= vocab
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "pad_token": "<pad>", "unk_token": "<unk>", "chat_template": TEMPLATE}))


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("text")
    m = family_model("qwen3_moe", seed=4)
    m.save_pretrained(tmp / "ckpt")
    save_tokenizer(tmp / "ckpt")
    moec.compile(str(tmp / "ckpt"), max_tokens=64).save(tmp / "m.moec")
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp / "ckpt"))
    return m, hf_tok, tmp / "m.moec"


def _hf_generate(m, hf_tok, ids, new):
    with torch.no_grad():
        out = m.generate(torch.tensor([ids]), max_new_tokens=new, do_sample=False)
    return hf_tok.decode(out[0, len(ids):], skip_special_tokens=True)


def test_tokenizer_matches_transformers(text_model):
    _, hf_tok, path = text_model
    tok = Tokenizer.from_folder(path)
    assert tok is not None
    for s in ["The quick brown fox", "experts route tokens", "naïve café", "", "zzz qqq"]:
        assert tok.encode(s) == hf_tok(s)["input_ids"]
        ids = hf_tok(s)["input_ids"]
        assert tok.decode(ids) == hf_tok.decode(ids, skip_special_tokens=True)
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi fox"}]
    assert tok.apply_chat_template(chat) == hf_tok.apply_chat_template(
        chat, tokenize=False, add_generation_prompt=True)
    assert tok.encode_chat(chat) == list(hf_tok.apply_chat_template(
        chat, tokenize=True, add_generation_prompt=True, return_dict=False))


def test_text_generation_matches_transformers(text_model):
    m, hf_tok, path = text_model
    lm = moec.load(path)
    prompts = ["The quick brown", "Generation keeps the keys", "A"]
    outs = lm.generate(prompts, max_new_tokens=20)
    for p, o in zip(prompts, outs, strict=True):
        ids = hf_tok(p)["input_ids"]
        assert o.prompt_token_ids == ids
        assert o.text == _hf_generate(m, hf_tok, ids, 20)
    chat = [{"role": "user", "content": "Sorted tokens?"}]
    ids = list(hf_tok.apply_chat_template(chat, tokenize=True, add_generation_prompt=True,
                                          return_dict=False))
    assert lm.chat(chat, max_new_tokens=12).text == _hf_generate(m, hf_tok, ids, 12)


def test_stop_strings_cut_the_text(text_model):
    m, hf_tok, path = text_model
    lm = moec.load(path)
    full = lm.generate("The quick brown", max_new_tokens=30, ignore_eos=True).text
    assert len(full) > 8
    stop = full[5:8]
    out = lm.generate("The quick brown", max_new_tokens=30, ignore_eos=True, stop=[stop])
    assert out.finish_reason == "stop" and out.text == full[:full.index(stop)]
    streamed = "".join(ev.text for ev in lm.stream("The quick brown", max_new_tokens=30,
                                                    ignore_eos=True, stop=[stop]))
    assert streamed == out.text


class _Args:
    def __init__(self, path, **kw):
        self.artifact = str(path)
        self.prompt = self.prompt_ids = None
        self.max_new_tokens, self.temperature, self.top_k, self.top_p = 16, None, None, None
        self.min_p = self.repetition_penalty = self.seed = self.stop = None
        self.ignore_eos, self.kv_cache, self.max_seq_len, self.system = False, None, None, None
        self.__dict__.update(kw)


def test_cli_generate_and_chat(text_model):
    m, hf_tok, path = text_model
    out, err = io.StringIO(), io.StringIO()
    assert cmd_generate(_Args(path, prompt="The quick brown"), out, err) == 0
    want = _hf_generate(m, hf_tok, hf_tok("The quick brown")["input_ids"], 16)
    assert out.getvalue() == "The quick brown" + want + "\n"
    assert "time to first token" in err.getvalue() and "decode" in err.getvalue()
    out = io.StringIO()
    assert cmd_chat(_Args(path, max_new_tokens=8), io.StringIO("Hi fox\n/reset\nexperts?\n"),
                    out) == 0
    replies = out.getvalue().splitlines()
    first = list(hf_tok.apply_chat_template([{"role": "user", "content": "Hi fox"}],
                                            tokenize=True, add_generation_prompt=True,
                                            return_dict=False))
    assert replies[0] == _hf_generate(m, hf_tok, first, 8)
    assert len(replies) == 2
