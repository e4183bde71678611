"""Text ⇄ token ids and chat templates for a model folder.

    tokenizer.json   → `tokenizers` (byte-level BPE, Llama-3, SmolLM2, …)
    tokenizer.model  → `sentencepiece` (Llama-2 style), used only when there is no tokenizer.json
    tokenizer_config.json  → special tokens, add_bos_token, chat_template
    generation_config.json, config.json → bos/eos ids the model stops on

Ids match what transformers' AutoTokenizer gives for the same folder.
"""

from __future__ import annotations

import functools
import json
import pathlib


class Tokenizer:
    """Encodes and decodes text for one model folder, and renders its chat template.

    A prompt rendered with `apply_chat_template` already holds every special
    token the model expects (the template writes them), so encode it with
    `add_special_tokens=False`, as transformers does; otherwise a tokenizer that
    adds BOS would add a second one.
    """

    def __init__(self, folder: pathlib.Path, backend, kind: str, tok_config: dict, model_ids: dict):
        self._folder, self._backend, self._kind, self._cfg = folder, backend, kind, tok_config
        self._chat_template = _read_chat_template(folder, tok_config)
        self._controls = None  # sentencepiece's control ids, when first needed
        self._bos_token = self._special("bos_token")
        self._eos_token = self._special("eos_token")
        bos = self._token_id(self._bos_token)
        if bos is None:
            bos = model_ids["bos"][0] if model_ids["bos"] else None
        if bos is None and kind == "sentencepiece" and backend.bos_id() >= 0:
            bos = backend.bos_id()
        self._bos_id = bos
        eos = list(model_ids["eos"])
        self._tok_eos_id = self._token_id(self._eos_token)
        if self._tok_eos_id is not None:
            eos.append(self._tok_eos_id)
        self._eos_ids = list(dict.fromkeys(eos))
        if self._bos_token is None and bos is not None:
            self._bos_token = self._id_to_token(bos)
        if self._eos_token is None and self._eos_ids:
            self._eos_token = self._id_to_token(self._eos_ids[0])

    @classmethod
    def from_model_dir(cls, path) -> Tokenizer:
        """Loads tokenizer.json, else tokenizer.model, from the folder; ValueError if neither is there."""
        folder = pathlib.Path(path)
        tok_config = _read_json(folder / "tokenizer_config.json")
        model_ids = _model_special_ids(folder)
        if (folder / "tokenizer.json").is_file():
            from tokenizers import Tokenizer as HFTokenizer

            try:
                backend = HFTokenizer.from_file(str(folder / "tokenizer.json"))
            except Exception as e:
                raise ValueError(f"{folder / 'tokenizer.json'}: cannot load ({e})") from e
            return cls(folder, backend, "tokenizers", tok_config, model_ids)
        if (folder / "tokenizer.model").is_file():
            import sentencepiece

            backend = sentencepiece.SentencePieceProcessor()
            try:
                backend.Load(str(folder / "tokenizer.model"))
            except Exception as e:
                raise ValueError(f"{folder / 'tokenizer.model'}: cannot load ({e})") from e
            return cls(folder, backend, "sentencepiece", tok_config, model_ids)
        raise ValueError(f"{folder}: no tokenizer.json or tokenizer.model in the model folder")

    # ── ids ────────────────────────────────────────────────────────────────

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`. With add_special_tokens, BOS/EOS are added the way the folder says:
        tokenizer.json: its post-processor alone (transformers 5 also ignores tokenizer_config's
        add_bos_token then); tokenizer.model: tokenizer_config's add_bos_token (default True) and
        add_eos_token (default False)."""
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, got {type(text).__name__}")
        if self._kind == "tokenizers":
            return self._backend.encode(text, add_special_tokens=add_special_tokens).ids
        ids = self._backend.encode(text)
        if add_special_tokens:
            if self._cfg.get("add_bos_token", True) and self._bos_id is not None:
                ids = [self._bos_id] + ids
            eos = self._tok_eos_id if self._tok_eos_id is not None else (self._eos_ids or [None])[0]
            if self._cfg.get("add_eos_token", False) and eos is not None:
                ids = ids + [eos]
        return ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        n = self.vocab_size
        bad = next((i for i in ids if not 0 <= i < n), None)
        if bad is not None:
            raise ValueError(f"token id {bad} is out of range for the tokenizer of {self._folder} (size {n})")
        if self._kind == "tokenizers":
            return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)
        sp = self._backend
        if skip_special_tokens:
            return sp.decode([i for i in ids if not sp.is_control(i)])
        parts, run = [], []
        for i in ids:  # control pieces (<s>, </s>) decode to nothing in sentencepiece; spell them out
            if sp.is_control(i):
                parts += [sp.decode(run), sp.id_to_piece(i)] if run else [sp.id_to_piece(i)]
                run = []
            else:
                run.append(i)
        return "".join(parts + ([sp.decode(run)] if run else []))

    def _stream_decoder(self, skip_special_tokens: bool = True):
        """(decode, hidden, window) for incremental detokenization.

        decode(ids) is decode(ids, skip_special_tokens) without the checks, for
        ids in range (the caller checks each once) and none in `hidden`: ids to
        leave out beforehand (sentencepiece's control pieces when skipped;
        passed through they would split a byte-fallback character in two).
        window: how many ids a decode should take at most, by the backend's
        cost (tokenizers: ~0.25 us a call and ~0.1 us an id; sentencepiece's
        Python wrapper: ~1.1 us a call and ~0.05 us an id).
        """
        if self._kind == "tokenizers":
            if skip_special_tokens:  # tokenizers' default; passing it costs ~0.15 us a call
                return self._backend.decode, frozenset(), 4
            return functools.partial(self._backend.decode, skip_special_tokens=False), frozenset(), 4
        if skip_special_tokens:
            return self._backend.decode, self._control_ids(), 8
        return functools.partial(self.decode, skip_special_tokens=False), frozenset(), 8

    def _control_ids(self) -> frozenset:
        if self._controls is None:  # once per tokenizer: ~4 ms for a 32,000-piece model
            sp = self._backend
            self._controls = frozenset(i for i in range(sp.get_piece_size()) if sp.is_control(i))
        return self._controls

    # ── chat ───────────────────────────────────────────────────────────────

    def apply_chat_template(self, messages, add_generation_prompt: bool = True, **kwargs) -> str:
        """Renders `messages` ([{"role": ..., "content": ...}, ...]) with the folder's chat template.

        The result already holds the template's special tokens: encode it with
        add_special_tokens=False. Extra keyword arguments (tools=..., …) reach the template.
        """
        if self._chat_template is None:
            raise ValueError(f"{self._folder}: the model has no chat template (tokenizer_config.json)")
        import jinja2

        try:
            template = _compile_template(self._chat_template)
        except jinja2.TemplateError as e:
            raise ValueError(f"{self._folder}: the chat template does not compile: {e}") from e
        variables = {"bos_token": self._bos_token or "", "eos_token": self._eos_token or ""}
        variables.update((k, self._special(k)) for k in ("unk_token", "pad_token") if self._special(k))
        context = {**variables, **kwargs, "messages": list(messages)}
        context["add_generation_prompt"] = add_generation_prompt
        try:
            return template.render(context)
        except jinja2.TemplateError as e:
            raise ValueError(f"chat template of {self._folder}: {e}") from e

    # ── properties ─────────────────────────────────────────────────────────

    @property
    def bos_token_id(self) -> int | None:
        return self._bos_id

    @property
    def eos_token_ids(self) -> list[int]:
        """Every id that ends a reply: generation_config.json, config.json and the tokenizer's eos_token."""
        return list(self._eos_ids)

    @property
    def vocab_size(self) -> int:
        if self._kind == "tokenizers":
            return self._backend.get_vocab_size(with_added_tokens=True)
        return self._backend.get_piece_size()

    @property
    def chat_template(self) -> str | None:
        return self._chat_template

    def __repr__(self) -> str:
        return f"Tokenizer({str(self._folder)!r}, {self._kind}, vocab_size={self.vocab_size})"

    # ── helpers ────────────────────────────────────────────────────────────

    def _special(self, key: str) -> str | None:
        value = self._cfg.get(key)
        if isinstance(value, dict):  # older files store AddedToken dicts
            value = value.get("content")
        return value if isinstance(value, str) else None

    def _token_id(self, token: str | None) -> int | None:
        if token is None:
            return None
        if self._kind == "tokenizers":
            return self._backend.token_to_id(token)
        i = self._backend.piece_to_id(token)
        return i if self._backend.id_to_piece(i) == token else None  # unknown pieces map to unk

    def _id_to_token(self, i: int) -> str | None:
        if self._kind == "tokenizers":
            return self._backend.id_to_token(i)
        return self._backend.id_to_piece(i) if 0 <= i < self._backend.get_piece_size() else None


def _read_json(path: pathlib.Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def _as_id_list(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, list) else [value])]


def _model_special_ids(folder: pathlib.Path) -> dict:
    """bos/eos ids from generation_config.json, then config.json (in that order, no duplicates)."""
    ids = {"bos": [], "eos": []}
    for name in ("generation_config.json", "config.json"):
        data = _read_json(folder / name)
        for key in ids:
            ids[key] += _as_id_list(data.get(f"{key}_token_id"))
    return {k: list(dict.fromkeys(v)) for k, v in ids.items()}


def _read_chat_template(folder: pathlib.Path, tok_config: dict) -> str | None:
    jinja_file = folder / "chat_template.jinja"  # newer transformers save the template here
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = tok_config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def _raise_exception(message):
    import jinja2

    raise jinja2.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # jinja's own tojson escapes HTML characters; templates expect plain JSON
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    import datetime

    return datetime.datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=16)
def _compile_template(source: str):
    """Chat templates come from model files, so they run sandboxed: no attribute writes, no imports."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)
