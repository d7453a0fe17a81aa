"""The tokenizer and chat template an artifact ships (moec.frontend.hf_generate copies them
from the checkpoint folder), without transformers.

- `tokenizer.json` through the `tokenizers` library (what transformers' fast tokenizers run);
  special tokens are added by its post-processor as `PreTrainedTokenizerFast` does.
- The chat template (tokenizer_config.json's `chat_template`, or chat_template.jinja /
  chat_template.json) rendered with jinja2 the way transformers renders it: a sandboxed
  environment with trim_blocks and lstrip_blocks, loop controls, `raise_exception`,
  `strftime_now` and a `tojson` that keeps non-ASCII; the special tokens (`bos_token`,
  `eos_token`, ...) are template variables. The rendered chat is encoded without adding
  special tokens (the template has them), as transformers' `apply_chat_template` does.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from moec.errors import ArtifactError, InputError

_SPECIAL = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token",
            "mask_token")


def _token_text(v: Any) -> str | None:
    if isinstance(v, str):
        return v
    if isinstance(v, dict) and isinstance(v.get("content"), str):  # AddedToken form
        return v["content"]
    return None


class Tokenizer:
    """Text <-> token ids, and chat templates. Build with `Tokenizer.from_folder`."""

    def __init__(self, tok: Any, config: dict[str, Any], chat_template: str | None) -> None:
        self._tok = tok
        self.config = config
        self.chat_template = chat_template
        self.special_tokens = {k: t for k in _SPECIAL
                               if (t := _token_text(config.get(k))) is not None}
        self._template = None

    @staticmethod
    def from_folder(folder: str | Path) -> Tokenizer | None:
        """The tokenizer in `folder` (tokenizer.json), or None if there is none."""
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            return None
        from moec.deps import require

        # a dependency of moec: only a broken install lacks it
        _Tok = require("tokenizers", f"reading {path}", "pip install tokenizers").Tokenizer
        try:
            tok = _Tok.from_file(str(path))
        except Exception as e:  # tokenizers raises its own Exception subclass
            raise ArtifactError(f"{path} is not a tokenizer the `tokenizers` library reads: "
                                f"{e}") from None
        config: dict[str, Any] = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            p = folder / name
            if p.is_file():
                try:
                    config.update(json.loads(p.read_text(encoding="utf-8")))
                except (OSError, ValueError) as e:
                    raise ArtifactError(f"{p} cannot be read as JSON: {e}") from None
        template = config.get("chat_template")
        if (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        elif (folder / "chat_template.json").is_file():
            try:
                template = json.loads((folder / "chat_template.json").read_text(
                    encoding="utf-8")).get("chat_template", template)
            except (OSError, ValueError) as e:
                raise ArtifactError(f"{folder / 'chat_template.json'} cannot be read: "
                                    f"{e}") from None
        if isinstance(template, list):  # named templates: use the default one
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        return Tokenizer(tok, config, template if isinstance(template, str) else None)

    # ------------------------------------------------------------------ text
    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise InputError(f"a prompt must be a string or token ids, got "
                             f"{type(text).__name__}")
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_id(self, text: str) -> int | None:
        return self._tok.token_to_id(text)

    def eos_token_ids(self) -> list[int]:
        eos = self.special_tokens.get("eos_token")
        i = self.token_id(eos) if eos else None
        return [i] if i is not None else []

    # ------------------------------------------------------------------ chat
    def apply_chat_template(self, messages: Sequence[dict[str, Any]],
                            add_generation_prompt: bool = True, **kwargs: Any) -> str:
        """The prompt text of a conversation (`[{"role": ..., "content": ...}, ...]`)."""
        if self.chat_template is None:
            raise InputError("this model has no chat template (its checkpoint folder had none "
                             "in tokenizer_config.json or chat_template.jinja); pass plain "
                             "prompts instead")
        if not isinstance(messages, (list, tuple)) or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
            raise InputError("messages must be a list of {'role': str, 'content': ...} dicts")
        from moec.deps import require

        jinja2 = require("jinja2", "a chat template", "pip install jinja2")  # moec depends on it
        if self._template is None:
            self._template = _compile(self.chat_template)
        try:
            return self._template.render(messages=[dict(m) for m in messages],
                                         add_generation_prompt=add_generation_prompt,
                                         **{**self.special_tokens, **kwargs})
        except jinja2.TemplateError as e:
            raise InputError(f"the chat template rejected the messages: {e}") from None

    def encode_chat(self, messages: Sequence[dict[str, Any]], **kwargs: Any) -> list[int]:
        return self.encode(self.apply_chat_template(messages, **kwargs),
                           add_special_tokens=False)


def _compile(source: str) -> Any:
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ArtifactError(f"the chat template does not parse: {e}") from None


class IncrementalDecoder:
    """Text of a growing list of token ids, released only once stable: a token that ends in
    the middle of a UTF-8 character (byte-level BPE) is held until the character completes."""

    def __init__(self, tok: Tokenizer, prompt: Iterable[int] = ()) -> None:
        self._tok = tok
        self.ids: list[int] = []
        self.text = ""  # released so far

    def push(self, token: int) -> str:
        """Add one token; return the new stable text (maybe empty)."""
        self.ids.append(int(token))
        full = self._tok.decode(self.ids)
        if full.endswith("\ufffd"):
            return ""  # an incomplete character: wait for the next token
        new = full[len(self.text):] if full.startswith(self.text) else full
        self.text = full
        return new
