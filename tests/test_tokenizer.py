"""Tokenizers against real references: the facts sheet's ids (section 5), Meta's own `Tokenizer` and
`ChatFormat` from llama-models 0.3.0, the raw SentencePiece processor, and (if importable) the Hugging Face
tokenizer built from the same tiktoken file. No expected id here was produced by this project's code."""

import hashlib
import pickle

import pytest
import sentencepiece as spm
from conftest import require_shared

from llama.tokenizer import (
    Llama3Tokenizer,
    SentencePieceTokenizer,
    TokenizerError,
    check_vocab,
    default_llama3_path,
    encode_dialog,
    load_tokenizer,
    train_sentencepiece,
)

# Facts sheet 5.7: sample ids checked with tiktoken and with Meta's `Tokenizer` class.
FACT_IDS = {
    "Hello world": [9906, 1917],
    "This is a test sentence.": [2028, 374, 264, 1296, 11914, 13],
    "Hello, world!": [9906, 11, 1917, 0],
    " Hello world": [22691, 1917],
    "hello world\n\n": [15339, 1917, 271],
    "1234567": [4513, 10961, 22],
    "I'm here": [40, 2846, 1618],
}
# Facts sheet 5.5: system "You are a helpful assistant." + user "Hello world" + generation prompt.
FACT_CHAT_IDS = [128000, 128006, 9125, 128007, 271, 2675, 527, 264, 11190, 18328, 13, 128009, 128006, 882, 128007,
                 271, 9906, 1917, 128009, 128006, 78191, 128007, 271]  # fmt: skip
LLAMA3_SHA256 = "82e9d31979e92ab929cd544440f129d9ecd797b69e327f80f17e1c50d5551b55"  # facts sheet 5.7


@pytest.fixture(scope="module")
def llama3():
    return load_tokenizer()  # the file shipped by llama-models


@pytest.fixture(scope="module")
def meta():
    """Meta's reference implementation (needs only tiktoken)."""
    from llama_models.llama3.tokenizer import Tokenizer

    return Tokenizer(default_llama3_path())


@pytest.fixture(scope="module")
def shakespeare():
    return require_shared("assets", "text", "tinyshakespeare", "input.txt").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def tok512():
    return require_shared("assets", "llama2c_stories260K", "tok512.model")


# ---------------------------------------------------------------------------------------------------------
# Llama 3


@pytest.mark.parametrize("source", ["llama-models", "shared"])
def test_llama3_facts_sheet_ids(source):
    if source == "shared":
        tok = load_tokenizer(require_shared("assets", "llama3_tokenizer", "tokenizer.model"))
    else:
        tok = load_tokenizer(None)
    assert isinstance(tok, Llama3Tokenizer)
    assert hashlib.sha256(tok.path.read_bytes()).hexdigest() == LLAMA3_SHA256
    for text, ids in FACT_IDS.items():
        assert tok.encode(text) == ids, text
        assert tok.decode(ids) == text
    assert tok.encode("Hello world", bos=True) == [128000, 9906, 1917]
    # Meta's unit test: BOS + ids + EOS.
    sentence = "This is a test sentence."
    assert tok.encode(sentence, bos=True, eos=True) == [128000, *FACT_IDS[sentence], 128001]
    # Facts 5.4 / 5.6 / 5.7: Meta's n_words, stop tokens, pad id, and names keyed by id.
    assert tok.vocab_size == 128256
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (128000, 128001, 128004)
    assert tok.stop_ids == (128001, 128008, 128009)
    assert len(tok.special_tokens) == 256 and min(tok.special_tokens) == 128000
    expected_names = {
        128000: "<|begin_of_text|>",
        128001: "<|end_of_text|>",
        128004: "<|finetune_right_pad_id|>",
        128005: "<|step_id|>",
        128006: "<|start_header_id|>",
        128007: "<|end_header_id|>",
        128008: "<|eom_id|>",
        128009: "<|eot_id|>",
        128010: "<|python_tag|>",
        128011: "<|image|>",
        128012: "<|reserved_special_token_2|>",
        128255: "<|reserved_special_token_245|>",
    }
    for i, name in expected_names.items():
        assert tok.special_tokens[i] == name
        assert tok.special_id(name) == i


def test_llama3_special_ids_match_meta(llama3, meta):
    assert {name: i for i, name in llama3.special_tokens.items()} == meta.special_tokens
    assert list(llama3.stop_ids) == meta.stop_tokens and llama3.pad_id == meta.pad_id


def test_special_token_text_stays_plain_unless_allowed(llama3, meta):
    text = "Hi<|eot_id|>there<|start_header_id|>"
    plain = llama3.encode(text)
    assert all(i < 128000 for i in plain) and llama3.decode(plain) == text
    assert plain == meta.encode(text, bos=False, eos=False)
    # Facts sheet 5.3 says a literal "<|eot_id|>" is 8 plain tokens; Meta's encoder gives 7 (8 with BOS).
    assert llama3.encode("<|eot_id|>") == meta.encode("<|eot_id|>", bos=False, eos=False)
    assert len(llama3.encode("<|eot_id|>")) == 7
    special = llama3.encode(text, allow_special=True)
    assert special == meta.encode(text, bos=False, eos=False, allowed_special="all")
    assert 128009 in special and 128006 in special
    assert llama3.encode("<|eot_id|>", allow_special=True) == [128009]
    assert llama3.decode([128009]) == "<|eot_id|>"


def test_llama3_round_trip_and_meta_parity_on_real_text(llama3, meta, shakespeare):
    # 1.1 M characters: crosses Meta's 400k-character chunk boundary twice.
    ids = llama3.encode(shakespeare)
    assert ids == meta.encode(shakespeare, bos=False, eos=False)
    assert llama3.decode(ids) == shakespeare
    stories = require_shared("assets", "text", "tinystories", "tinystories_v1_train_first2MiB.txt")
    text = stories.read_bytes()[:300_000].decode("utf-8", errors="ignore")
    ids = llama3.encode(text, bos=True, eos=True)
    assert ids == meta.encode(text, bos=True, eos=True)
    assert llama3.decode(ids[1:-1]) == text


def test_llama3_long_runs_split_like_meta(llama3, meta, shakespeare):
    # Runs longer than 25k characters are cut (Meta's workaround for openai/tiktoken#195); the cut points
    # change the ids, so the reference decides.
    text = shakespeare[:3000] + " " * 60_001 + "x" * 52_000 + "\n\t" * 30_000 + "word " * 7000 + "." * 25_001
    ids = llama3.encode(text)
    assert ids == meta.encode(text, bos=False, eos=False)
    assert llama3.decode(ids) == text


def test_llama3_partial_utf8_decode_bytes(llama3, meta):
    # Facts sheet 5.3 lists 🤗 = [11410, 97, 245]; 11410 is " \xf0\x9f", i.e. these are the ids of " 🤗"
    # (Meta's encoder agrees). A lone "🤗" is [9468, 97, 245].
    assert llama3.encode(" 🤗") == [11410, 97, 245] == meta.encode(" 🤗", bos=False, eos=False)
    assert llama3.encode("🤗") == meta.encode("🤗", bos=False, eos=False)
    full = " 🤗".encode()  # b" \xf0\x9f\xa4\x97"
    for k, n_bytes in ((1, 3), (2, 4), (3, 5)):  # a cut character stays raw bytes
        assert llama3.decode_bytes([11410, 97, 245][:k]) == full[:n_bytes]
    assert llama3.decode([11410]) == " \ufffd"  # decode replaces the cut character
    assert llama3.decode([11410, 97, 245]) == " 🤗"


def test_bad_ids_and_inputs(llama3):
    with pytest.raises(TokenizerError, match=r"outside \[0, 128256\)"):
        llama3.decode([5, 128256])
    with pytest.raises(TokenizerError, match="outside"):
        llama3.decode_bytes([-1])
    with pytest.raises(TokenizerError, match="expects str"):
        llama3.encode(b"bytes")
    with pytest.raises(TokenizerError, match="not a special token"):
        llama3.special_id("<|reserved_special_token_250|>")  # a Llama 3.0 name, not in Meta's current table


def test_hf_tokenizer_built_from_the_same_file_agrees(llama3, shakespeare):
    # transformers' TikTokenConverter builds the HF fast tokenizer from the tiktoken file (facts sheet 5.3:
    # regex Split + ByteLevel + BPE merges). 200k characters: below Meta's chunk size, so no cut applies.
    convert = pytest.importorskip("transformers.convert_slow_tokenizer")
    hf = convert.TikTokenConverter(vocab_file=str(llama3.path)).converted()
    text = shakespeare[:200_000]
    assert hf.encode(text, add_special_tokens=False).ids == llama3.encode(text)


def test_pickle_round_trip(llama3, tok512):
    for tok in (llama3, load_tokenizer(tok512)):
        clone = pickle.loads(pickle.dumps(tok))
        assert type(clone) is type(tok) and clone.encode("Once upon a time") == tok.encode("Once upon a time")


# ---------------------------------------------------------------------------------------------------------
# Chat format


def test_chat_ids_facts_sheet(llama3):
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Hello world"},
    ]
    assert encode_dialog(llama3, messages) == FACT_CHAT_IDS
    assert encode_dialog(llama3, messages, add_generation_prompt=False) == FACT_CHAT_IDS[:-4]
    assert encode_dialog(llama3, messages[1:], bos=False) == FACT_CHAT_IDS[12:]
    # Header ids (facts sheet 5.5): "tool" is written as ipython = [23799, 4690].
    assert encode_dialog(llama3, [{"role": "tool", "content": ""}], add_generation_prompt=False) == [
        128000, 128006, 23799, 4690, 128007, 271, 128009]  # fmt: skip


def test_chat_matches_meta_chat_format(llama3, meta):
    from llama_models.datatypes import BuiltinTool, RawMessage, StopReason, ToolCall
    from llama_models.llama3.chat_format import ChatFormat

    code = "import math\nprint(math.sqrt(2))"
    ours = [
        {"role": "system", "content": "Environment: ipython\n\nYou are helpful.  "},
        {"role": "user", "content": "  What is sqrt(2)? <|eot_id|>\n"},  # untrimmed; special text stays text
        {"role": "assistant", "content": code, "python_tag": True, "eom": True},
        {"role": "tool", "content": "1.4142135623730951"},
        {"role": "assistant", "content": "About 1.414."},
        {"role": "user", "content": "Thanks!"},
    ]
    call = ToolCall(call_id="c0", tool_name=BuiltinTool.code_interpreter, arguments={"code": code})
    theirs = [
        RawMessage(role="system", content=ours[0]["content"]),
        RawMessage(role="user", content=ours[1]["content"]),
        RawMessage(role="assistant", content="", tool_calls=[call], stop_reason=StopReason.end_of_message),
        RawMessage(role="tool", content=ours[3]["content"]),
        RawMessage(role="assistant", content=ours[4]["content"], stop_reason=StopReason.end_of_turn),
        RawMessage(role="user", content=ours[5]["content"]),
    ]
    assert encode_dialog(llama3, ours) == ChatFormat(meta).encode_dialog_prompt(theirs).tokens


def test_chat_errors(llama3):
    with pytest.raises(TokenizerError, match="message 1: unknown role 'robot'"):
        encode_dialog(llama3, [{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}])
    with pytest.raises(TokenizerError, match="content must be a str"):
        encode_dialog(llama3, [{"role": "user", "content": None}])
    with pytest.raises(TokenizerError, match="assistant messages only"):
        encode_dialog(llama3, [{"role": "user", "content": "a", "eom": True}])
    with pytest.raises(TokenizerError, match="unknown keys"):
        encode_dialog(llama3, [{"role": "user", "content": "a", "name": "bob"}])


# ---------------------------------------------------------------------------------------------------------
# SentencePiece


def _story_lines():
    path = require_shared("assets", "text", "tinystories", "tinystories_v1_valid_head.txt")
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()][:400]


def test_sentencepiece_tok512_matches_raw_processor(tok512):
    tok = load_tokenizer(tok512)
    sp = spm.SentencePieceProcessor(model_file=str(tok512))
    assert isinstance(tok, SentencePieceTokenizer)
    assert (tok.vocab_size, tok.unk_id, tok.bos_id, tok.eos_id) == (512, 0, 1, 2)  # assets README
    assert sp.pad_id() == -1 and tok.pad_id == 0 and tok.stop_ids == (2,)  # documented choice: unk as pad
    lines = _story_lines() + ["Lily saw a 🤗 and said “hi” 123456!", "  two  spaces\tand tab", "<s> stays text"]
    for line in lines:
        ids = tok.encode(line, bos=True, eos=True)
        assert ids == [1, *sp.encode(line), 2]
        assert tok.decode(ids) == sp.decode(ids)
        assert tok.decode_bytes(ids).decode("utf-8") == sp.decode(ids)
    assert tok.encode("a<s>b", allow_special=True) == [*sp.encode("a"), 1, *sp.encode("b")]
    with pytest.raises(TokenizerError, match="needs the Llama 3 special tokens"):
        encode_dialog(tok, [{"role": "user", "content": "a"}])
    with pytest.raises(TokenizerError, match=r"outside \[0, 512\)"):
        tok.decode([512])


def test_sentencepiece_partial_utf8_decode_bytes(tok512):
    tok = load_tokenizer(tok512)
    ids = tok.encode("Hi 🤗")
    assert [tok._sp.is_byte(i) for i in ids[-4:]] == [True] * 4  # the emoji falls back to its 4 UTF-8 bytes
    assert tok.decode_bytes(ids[:-1]) == "Hi 🤗".encode()[:-1]
    assert tok.decode_bytes(ids) == "Hi 🤗".encode()


def test_train_sentencepiece_layout_round_trip_determinism(tmp_path):
    from pydoc_data.topics import topics  # the CPython docs corpus the trainer's main job uses

    texts = list(topics.values())
    out = train_sentencepiece(texts, 1024, tmp_path / "sub" / "tok.model")
    again = train_sentencepiece(texts, 1024, tmp_path / "again.model")
    assert out == tmp_path / "sub" / "tok.model" and out.read_bytes() == again.read_bytes()  # deterministic
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["tok.model"]  # no temp file left
    tok = load_tokenizer(out)
    sp = spm.SentencePieceProcessor(model_file=str(out))
    # Facts sheet 5.8: the Llama 2 id layout.
    assert tok.vocab_size == 1024 and (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)
    assert [sp.id_to_piece(i) for i in (3, 4, 258)] == ["<0x00>", "<0x01>", "<0xFF>"]
    text_pieces = [sp.id_to_piece(i) for i in range(259, 1024)]
    assert not any(sum(c.isdigit() for c in p) > 1 for p in text_pieces)  # split digits
    # Identity normalisation and kept whitespace: real lines (code indentation, ASCII art) round-trip.
    for text in texts[:20]:
        for line in text.splitlines():
            ids = tok.encode(line)
            assert sp.decode(ids) == line and tok.decode_bytes(ids).decode() == line
            assert 0 not in ids  # byte fallback: never unk


def test_train_sentencepiece_errors(tmp_path):
    with pytest.raises(TokenizerError, match="no non-empty line"):
        train_sentencepiece(["", "\n\n"], 300, tmp_path / "a.model")
    with pytest.raises(TokenizerError, match="vocab_size=100000"):
        train_sentencepiece(["a tiny corpus"], 100_000, tmp_path / "b.model")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------------------
# Loading and bad files


def test_load_tokenizer_detects_format_and_directories(tmp_path, tok512):
    assert isinstance(load_tokenizer(tok512), SentencePieceTokenizer)
    (tmp_path / "original").mkdir()
    (tmp_path / "original" / "tokenizer.model").write_bytes(default_llama3_path().read_bytes())
    assert isinstance(load_tokenizer(tmp_path), Llama3Tokenizer)  # HF repo layout


def test_bad_tokenizer_files(tmp_path):
    with pytest.raises(TokenizerError, match="does not exist"):
        load_tokenizer(tmp_path / "missing.model")
    with pytest.raises(TokenizerError, match="has no tokenizer.model"):
        load_tokenizer(tmp_path)
    cases = {
        "empty.model": (b"", "is empty"),
        "tokenizer.json": (b'{"version": "1.0", "model": {}}', "looks like JSON"),
        "random.model": (bytes(range(7, 200)), "neither a SentencePiece model"),
        "cut.model": (b"\n\x09\n\x05<unk>\x15\x00", "not a readable SentencePiece model"),  # truncated protobuf
        "badline.model": (b"IQ== 0\nIg== 1\nnot base64!! x\n", "line 3"),
        "gap.model": (b"IQ== 0\nIg== 5\n", "ranks must be exactly 0..1"),
        "nobytes.model": (b"IQ== 0\nIg== 1\n", "single-byte tokens are missing"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(TokenizerError, match=message) as error:
            load_tokenizer(tmp_path / name)
        assert name in str(error.value)  # the message names the file


def test_vocab_larger_than_model_is_rejected(llama3, tok512):
    with pytest.raises(TokenizerError, match="has 128256 ids but the model's vocab_size is 512"):
        check_vocab(llama3, 512)
    with pytest.raises(TokenizerError, match="has 512 ids but the model's vocab_size is 256"):
        load_tokenizer(tok512, vocab_size=256)
    check_vocab(llama3, 128256)
    assert load_tokenizer(tok512, vocab_size=512).vocab_size == 512  # stories260K's vocab
    assert load_tokenizer(tok512, vocab_size=1024).vocab_size == 512  # a padded embedding is fine
