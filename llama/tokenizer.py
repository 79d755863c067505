"""Tokenizers behind one small interface: Llama 3 (tiktoken BPE) and Llama 2 style (SentencePiece BPE);
the Llama 3.1 chat format; a SentencePiece trainer for small corpora.

Every tokenizer has `.vocab_size`, `.bos_id`, `.eos_id`, `.pad_id`, `.stop_ids`, `.encode(text, *, bos, eos,
allow_special)`, `.decode(ids)` and `.decode_bytes(ids)` (raw bytes, for streaming output where one token can
hold part of a UTF-8 character). `load_tokenizer(path)` picks the class from the file's content.

Sources: `../shared/reference/llama31_facts.md` section 5; Meta `llama_models/llama3/tokenizer.py` and
`chat_format.py` (llama-models 0.3.0), whose behaviour the Llama 3 code reproduces id for id.
"""

from __future__ import annotations

import base64
import binascii
import importlib.resources
import io
import math
import os
import pathlib
import re
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Protocol

import sentencepiece as spm
import tiktoken

# Facts sheet 5.2 (Meta `Tokenizer.pat_str`). Not tiktoken's current cl100k pattern, which was rewritten.
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_NUM_SPECIAL = 256
# Facts sheet 5.4, Meta's current names (llama-models 0.3.0). The HF names of 128005, 128011 and of the
# reserved tokens differ, so callers should key special tokens by id (`Llama3Tokenizer.special_tokens`).
_LLAMA3_NAMED_SPECIAL = (
    "<|begin_of_text|>",  # +0: BOS
    "<|end_of_text|>",  # +1: EOS, base models end with it
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",  # +4: Meta's pad_id
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",  # +8: end of message, a tool call is pending
    "<|eot_id|>",  # +9: end of turn
    "<|python_tag|>",
    "<|image|>",
)
# Meta `llama3/tokenizer.py`: tiktoken panics on very long inputs (openai/tiktoken#195), so Meta encodes
# 400k-character chunks and cuts runs of > 25k whitespace or non-whitespace characters. The cuts change the
# ids of such texts, so they are part of the format: reproduce them exactly.
TIKTOKEN_MAX_ENCODE_CHARS = 400_000
MAX_NO_WHITESPACES_CHARS = 25_000
CHAT_ROLES = ("system", "user", "assistant", "ipython", "tool")  # "tool" is written as "ipython" (Meta)

_SPM_SPACE = "\u2581"  # "▁", SentencePiece's space marker
_TIKTOKEN_LINE = re.compile(rb"[A-Za-z0-9+/]+={0,2} [0-9]+\r?\n?")


class TokenizerError(ValueError):
    """A tokenizer file or input this project cannot use; the message names the file and what was expected."""


class Tokenizer(Protocol):
    """What the rest of the project may rely on (both classes below provide it)."""

    path: pathlib.Path
    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int
    stop_ids: tuple[int, ...]

    def encode(self, text: str, *, bos: bool = False, eos: bool = False, allow_special: bool = False) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def decode_bytes(self, ids: Sequence[int]) -> bytes: ...


def default_llama3_path() -> pathlib.Path:
    """The Llama 3 `tokenizer.model` that the `llama-models` package ships (facts sheet 5.7)."""
    try:
        path = importlib.resources.files("llama_models.llama3") / "tokenizer.model"
    except ModuleNotFoundError as e:
        raise TokenizerError(
            "no tokenizer path given and the package `llama-models` (which ships the Llama 3 tokenizer.model) "
            "is not installed: `pip install llama-models` or pass a path"
        ) from e
    return pathlib.Path(str(path))


def _checked_ids(ids: Sequence[int], vocab_size: int, path: pathlib.Path) -> list[int]:
    out = [int(i) for i in ids]  # also accepts numpy arrays and numpy ints
    bad = [i for i in out if not 0 <= i < vocab_size]
    if bad:
        raise TokenizerError(f"token ids {bad[:5]} are outside [0, {vocab_size}) for tokenizer {path}")
    return out


# ---------------------------------------------------------------------------------------------------------
# Llama 3: tiktoken BPE


def _read_tiktoken_ranks(path: pathlib.Path) -> dict[bytes, int]:
    """Parse `base64(token) rank` lines (facts sheet 5.1) with checks that name the file and line."""
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            parts = line.split()
            try:
                if len(parts) != 2:
                    raise ValueError
                token, rank = base64.b64decode(parts[0], validate=True), int(parts[1])
            except (ValueError, binascii.Error):
                raise TokenizerError(
                    f"{path}: line {lineno} is {line[:60]!r}; a tiktoken BPE file has lines 'base64(token) rank'"
                ) from None
            if token in ranks:
                raise TokenizerError(f"{path}: line {lineno} repeats token {token!r} (rank {ranks[token]})")
            ranks[token] = rank
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise TokenizerError(f"{path}: ranks must be exactly 0..{len(ranks) - 1} (rank = token id)")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:  # without every single byte some texts cannot be encoded at all
        raise TokenizerError(f"{path}: {len(missing)} single-byte tokens are missing (first: byte {missing[0]})")
    return ranks


def _split_long_runs(text: str, max_run: int) -> Iterator[str]:
    """Meta's `_split_whitespaces_or_nonwhitespaces`, same cut points: a run of more than `max_run`
    consecutive whitespace (or non-whitespace) characters is cut every `max_run` characters from its start.
    `\\s` in `re` and `str.isspace` use the same Unicode table (Py_UNICODE_ISSPACE)."""
    if len(text) <= max_run:
        yield text
        return
    start = 0
    for run in re.finditer(r"\s+|\S+", text):
        for cut in range(run.start() + max_run, run.end(), max_run):
            yield text[start:cut]
            start = cut
    yield text[start:]


class Llama3Tokenizer:
    """The Llama 3 / 3.1 / 3.2 tokenizer: 128,000 BPE ranks from the file plus 256 special tokens.

    Same ids as Meta's `Tokenizer.encode(..., allowed_special=set() or "all")`. Unlike HF tokenizers, encode
    adds no BOS by itself and reads special-token text in user text as plain text unless asked
    (facts sheet 5.3, pitfall 6).
    """

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = pathlib.Path(path) if path is not None else default_llama3_path()
        if not self.path.is_file():
            raise TokenizerError(f"Llama 3 tokenizer file {self.path} does not exist")
        ranks = _read_tiktoken_ranks(self.path)
        n_base = len(ranks)
        names = _LLAMA3_NAMED_SPECIAL + tuple(
            f"<|reserved_special_token_{2 + k}|>" for k in range(LLAMA3_NUM_SPECIAL - len(_LLAMA3_NAMED_SPECIAL))
        )
        self.special_tokens: dict[int, str] = {n_base + k: name for k, name in enumerate(names)}
        self._special_ids = {name: i for i, name in self.special_tokens.items()}
        self._enc = tiktoken.Encoding(
            name=self.path.name, pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks, special_tokens=self._special_ids
        )
        self.vocab_size = n_base + LLAMA3_NUM_SPECIAL  # 128256 = ModelConfig.vocab_size of every Llama 3
        self.bos_id = n_base  # 128000
        self.eos_id = n_base + 1  # 128001
        self.pad_id = n_base + 4  # 128004, <|finetune_right_pad_id|>
        self.start_header_id = n_base + 6
        self.end_header_id = n_base + 7
        self.eom_id = n_base + 8  # 128008
        self.eot_id = n_base + 9  # 128009
        self.python_tag_id = n_base + 10
        # Facts sheet 5.6: Meta's current list and HF Instruct eos_token_id agree.
        self.stop_ids = (self.eos_id, self.eom_id, self.eot_id)

    def __reduce__(self):  # pickles as its path (grain worker processes), not as 128k ranks
        return (type(self), (self.path,))

    def __repr__(self):
        return f"Llama3Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"

    def special_id(self, name: str) -> int:
        """Id of a special token by its Meta name, e.g. "<|eot_id|>" -> 128009."""
        if name not in self._special_ids:
            raise TokenizerError(f"{name!r} is not a special token of {self.path} (Meta names, facts sheet 5.4)")
        return self._special_ids[name]

    def encode(self, text: str, *, bos: bool = False, eos: bool = False, allow_special: bool = False) -> list[int]:
        """Text -> ids. With allow_special, special-token text such as "<|eot_id|>" becomes its single id;
        without it (the default, safe for untrusted text) it is encoded as ordinary characters."""
        if not isinstance(text, str):
            raise TokenizerError(f"encode expects str, got {type(text).__name__}")
        ids = [self.bos_id] if bos else []
        for i in range(0, len(text), TIKTOKEN_MAX_ENCODE_CHARS):
            for piece in _split_long_runs(text[i : i + TIKTOKEN_MAX_ENCODE_CHARS], MAX_NO_WHITESPACES_CHARS):
                if allow_special:
                    ids.extend(self._enc.encode(piece, allowed_special="all", disallowed_special=()))
                else:
                    ids.extend(self._enc.encode_ordinary(piece))
        if eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Ids -> text; special ids become their names; a cut UTF-8 character becomes U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        """Ids -> raw bytes. One token may be part of a character: 🤗 = [11410, 97, 245] (facts sheet 5.3)."""
        return self._enc.decode_bytes(_checked_ids(ids, self.vocab_size, self.path))


# ---------------------------------------------------------------------------------------------------------
# Llama 2 style: SentencePiece BPE


class SentencePieceTokenizer:
    """A SentencePiece model (Llama 2, llama2.c `tok512.model`, `train_sentencepiece` output).

    encode/decode are SentencePiece's own (Meta's Llama 2 `Tokenizer` adds only the BOS/EOS flags, facts
    sheet 5.8). pad_id: Meta uses the model's pad piece, -1 for Llama 2, which is no row of the embedding.
    Here pad_id is the model's pad piece when it has one, else its unk id (0): a real embedding row that
    encode never emits when byte fallback is on, the role <|finetune_right_pad_id|> plays for Llama 3.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = pathlib.Path(path)
        if not self.path.is_file():
            raise TokenizerError(f"SentencePiece model file {self.path} does not exist")
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.Load(str(self.path))
        except (OSError, RuntimeError) as e:
            raise TokenizerError(f"{self.path} is not a readable SentencePiece model: {e}") from None
        sp = self._sp
        self.vocab_size = sp.vocab_size()
        self.bos_id, self.eos_id, self.unk_id = sp.bos_id(), sp.eos_id(), sp.unk_id()
        self.pad_id = sp.pad_id() if sp.pad_id() >= 0 else self.unk_id
        self.stop_ids = (self.eos_id,)
        self._special_ids = {sp.id_to_piece(i): i for i in range(self.vocab_size) if sp.is_control(i)}
        self._special_re = (
            re.compile("(" + "|".join(map(re.escape, sorted(self._special_ids, key=len, reverse=True))) + ")")
            if self._special_ids
            else None
        )
        self._build_decode_table()

    def _build_decode_table(self) -> None:
        """Bytes of each id as SentencePiece's `Decode` writes them: "▁" -> " ", byte pieces <0xNN> -> that
        byte, control pieces -> nothing, unk -> the model's unk surface (" ⁇ " by default)."""
        from sentencepiece import sentencepiece_model_pb2  # protobuf; only needed here

        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(self._sp.serialized_model_proto())
        unk_surface = proto.trainer_spec.unk_surface.encode()
        sp = self._sp
        self._piece_bytes, self._is_byte, self._is_text = [], [], []
        for i in range(self.vocab_size):
            piece = sp.id_to_piece(i)
            if sp.is_control(i):
                surface = b""
            elif sp.is_unknown(i):
                surface = unk_surface
            elif sp.is_byte(i):
                surface = bytes([int(piece[3:5], 16)])  # "<0xAB>"
            else:
                surface = piece.replace(_SPM_SPACE, " ").encode()
            self._piece_bytes.append(surface)
            self._is_byte.append(sp.is_byte(i))
            self._is_text.append(not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i)))
        spec = proto.normalizer_spec
        self._drop_bos_space = spec.add_dummy_prefix or spec.remove_extra_whitespaces
        self._remove_extra_ws = spec.remove_extra_whitespaces

    def __reduce__(self):
        return (type(self), (self.path,))

    def __repr__(self):
        return f"SentencePieceTokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"

    def encode(self, text: str, *, bos: bool = False, eos: bool = False, allow_special: bool = False) -> list[int]:
        """Text -> ids. SentencePiece never reads control pieces ("<s>", "</s>") in text; allow_special
        does, encoding the text between them separately (each part gets its own dummy prefix)."""
        if not isinstance(text, str):
            raise TokenizerError(f"encode expects str, got {type(text).__name__}")
        ids = [self.bos_id] if bos else []
        if allow_special and self._special_re is not None:
            for k, part in enumerate(self._special_re.split(text)):
                if k % 2:
                    ids.append(self._special_ids[part])
                elif part:
                    ids.extend(self._sp.encode(part))
        else:
            ids.extend(self._sp.encode(text))
        if eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode(_checked_ids(ids, self.vocab_size, self.path))

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        """Like decode, but a character cut between byte-fallback pieces stays raw bytes (SentencePiece's own
        decode writes U+FFFD for each cut byte, also for bytes on both sides of a control id)."""
        # The leading-space rule of SentencePiece's `Decode` (sentencepiece_processor.cc, 0.2): while the
        # output is empty, a text piece loses its leading "▁" (the dummy prefix); with remove_extra_whitespaces
        # every such piece does, otherwise only the first one that had it.
        out, at_bos, bos_space_dropped = bytearray(), True, False
        for i in _checked_ids(ids, self.vocab_size, self.path):
            piece = self._piece_bytes[i]
            if self._is_byte[i]:
                out += piece
                continue
            if bos_space_dropped or out:
                at_bos = False
            bos_space_dropped = False
            if at_bos and self._drop_bos_space and self._is_text[i] and piece[:1] == b" ":
                piece, bos_space_dropped = piece[1:], not self._remove_extra_ws
            out += piece
        return bytes(out)


# ---------------------------------------------------------------------------------------------------------
# Loading and checks


def load_tokenizer(path: str | os.PathLike | None = None, *, vocab_size: int | None = None) -> Tokenizer:
    """Load a tokenizer, choosing the class from the file's content.

    path: None -> the Llama 3 tokenizer shipped by `llama-models`; a SentencePiece model (protobuf) ->
    SentencePieceTokenizer; a tiktoken BPE text file -> Llama3Tokenizer; a directory -> its
    `tokenizer.model` (or `original/tokenizer.model`, the Hugging Face repo layout).
    vocab_size: the model's vocab size; if given, `check_vocab` runs.
    """
    if path is None:
        tok = Llama3Tokenizer()
    else:
        path = pathlib.Path(path)
        if path.is_dir():
            found = [p for p in (path / "tokenizer.model", path / "original" / "tokenizer.model") if p.is_file()]
            if not found:
                raise TokenizerError(f"directory {path} has no tokenizer.model (nor original/tokenizer.model)")
            path = found[0]
        if not path.is_file():
            raise TokenizerError(f"tokenizer file {path} does not exist")
        with open(path, "rb") as f:
            head = f.read(256)
        if _TIKTOKEN_LINE.match(head):
            tok = Llama3Tokenizer(path)
        elif head[:1] == b"\n":  # protobuf field 1 (ModelProto.pieces), length-delimited
            tok = SentencePieceTokenizer(path)
        elif not head:
            raise TokenizerError(f"tokenizer file {path} is empty")
        elif head.lstrip()[:1] == b"{":
            raise TokenizerError(
                f"{path} looks like JSON (a Hugging Face tokenizer.json?), which is not read here: pass the "
                "tiktoken `tokenizer.model` (HF repos: original/tokenizer.model) or a SentencePiece .model"
            )
        else:
            raise TokenizerError(
                f"{path} is neither a SentencePiece model (protobuf) nor a tiktoken BPE file "
                f"(lines 'base64(token) rank'); it starts with {head[:32]!r}"
            )
    if vocab_size is not None:
        check_vocab(tok, vocab_size)
    return tok


def check_vocab(tokenizer: Tokenizer, model_vocab_size: int) -> None:
    """Fail if the tokenizer can emit ids that the model's embedding has no row for. A model vocab larger
    than the tokenizer's is fine (padded tables)."""
    if tokenizer.vocab_size > model_vocab_size:
        raise TokenizerError(
            f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} ids but the model's vocab_size is "
            f"{model_vocab_size}: ids >= {model_vocab_size} have no embedding row (wrong tokenizer for this model?)"
        )


# ---------------------------------------------------------------------------------------------------------
# Llama 3.1 chat format (facts sheet 5.5; Meta `llama3/chat_format.py`)


def encode_dialog(
    tok: Llama3Tokenizer, messages: Sequence[Mapping], add_generation_prompt: bool = True, *, bos: bool = True
) -> list[int]:
    """Messages -> ids in the Llama 3.1 Instruct format:

        <|begin_of_text|> then per message <|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>
        then, with add_generation_prompt, <|start_header_id|>assistant<|end_header_id|>\\n\\n

    A message is {"role": system|user|assistant|ipython|tool, "content": str}; "tool" is written as
    "ipython" (Meta). Content is not trimmed and its special-token text stays plain text. An assistant
    message may carry "eom": True (it ended with <|eom_id|>, a tool call is pending) and "python_tag": True
    (its body starts with <|python_tag|>, a code-interpreter call). bos=False continues an existing prompt.
    """
    if not isinstance(tok, Llama3Tokenizer):
        raise TokenizerError(f"the Llama 3.1 chat format needs the Llama 3 special tokens; got {tok!r}")
    ids = [tok.bos_id] if bos else []
    for k, msg in enumerate(messages):
        role, content = msg.get("role"), msg.get("content")
        if role not in CHAT_ROLES:
            raise TokenizerError(f"message {k}: unknown role {role!r}; expected one of {CHAT_ROLES}")
        if not isinstance(content, str):
            raise TokenizerError(f"message {k} ({role}): content must be a str, got {type(content).__name__}")
        extra = set(msg) - {"role", "content", "eom", "python_tag"}
        if extra:
            raise TokenizerError(f"message {k} ({role}): unknown keys {sorted(extra)}")
        if role != "assistant" and (msg.get("eom") or msg.get("python_tag")):
            raise TokenizerError(f"message {k} ({role}): 'eom' and 'python_tag' apply to assistant messages only")
        ids += _encode_header(tok, "ipython" if role == "tool" else role)
        if msg.get("python_tag"):
            ids.append(tok.python_tag_id)
        ids += tok.encode(content)
        ids.append(tok.eom_id if msg.get("eom") else tok.eot_id)
    if add_generation_prompt:
        ids += _encode_header(tok, "assistant")
    return ids


def _encode_header(tok: Llama3Tokenizer, role: str) -> list[int]:
    return [tok.start_header_id, *tok.encode(role), tok.end_header_id, *tok.encode("\n\n")]


# ---------------------------------------------------------------------------------------------------------
# Training a small SentencePiece tokenizer


def train_sentencepiece(
    texts: Iterable[str],
    vocab_size: int,
    out_path: str | os.PathLike,
    *,
    max_sentences: int = 300_000,
    num_threads: int = 1,
    character_coverage: float = 0.99995,
) -> pathlib.Path:
    """Train a Llama 2 style SentencePiece BPE model on `texts` and write it atomically to `out_path`.

    Llama 2's settings (facts sheet 5.8): byte fallback (ids 3..258 are <0x00>..<0xFF>, so nothing is ever
    unk), split digits, identity normalisation, dummy prefix, whitespace kept as is; unk/bos/eos/pad =
    0/1/2/-1. Texts are split into lines (a newline is then encoded as the byte <0x0A>, as in Llama 2); lines
    over 4096 characters are cut. Deterministic: when there are more than `max_sentences` lines, every k-th
    line is kept (no random sampling), which also bounds the time. The learned pieces depend on num_threads
    (SentencePiece splits the pair counting across threads), so the default 1 gives the same file on every
    machine; 2 MiB of text takes about a second. Returns out_path.
    """
    out_path = pathlib.Path(out_path)
    lines = [
        line[i : i + 4096] for text in texts for line in text.splitlines() if line for i in range(0, len(line), 4096)
    ]
    if not lines:
        raise TokenizerError(f"train_sentencepiece({out_path}): the texts hold no non-empty line")
    if len(lines) > max_sentences:
        lines = lines[:: math.ceil(len(lines) / max_sentences)]
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.Train(
            sentence_iterator=iter(lines),
            model_writer=model,
            model_type="bpe",
            vocab_size=vocab_size,
            byte_fallback=True,
            split_digits=True,
            normalization_rule_name="identity",
            add_dummy_prefix=True,
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            character_coverage=character_coverage,
            max_sentence_length=1 << 14,  # bytes; lines are <= 4096 characters
            input_sentence_size=0,  # all the lines chosen above
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            num_threads=num_threads,
            minloglevel=2,  # SentencePiece logs every step to stderr otherwise
        )
    except RuntimeError as e:
        raise TokenizerError(
            f"train_sentencepiece({out_path}, vocab_size={vocab_size}) failed on {len(lines)} lines: {e}"
        ) from None
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_path.parent, prefix=f".{out_path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(model.getvalue())
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only
        os.replace(tmp, out_path)
    except BaseException:
        os.unlink(tmp)
        raise
    return out_path
