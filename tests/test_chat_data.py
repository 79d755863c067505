"""Chat (SFT), preference (DPO) and weighted-text (segments) data: rendering, loss masks and weights, packing, bad
rows, over-long rows, resume."""

import json

import numpy as np
import pytest

from input_pipeline import DataConfig, DataError, make_dataset
from input_pipeline.chat import ChatFormat, ROLES, encode_chat, encode_preference, encode_segments, pack_documents
from input_pipeline.tokenize import encode_document
from llama.tokenizer import CHAT_ROLES, encode_dialog, load_tokenizer
from tests.conftest import require_shared

CHAT = [
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                  {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"},
                  {"role": "assistant", "content": "6, of course."}]},
    {"messages": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi there"}]},
    {"messages": [{"role": "user", "content": "Name a colour"}, {"role": "assistant", "content": "blue"}]},
]
PREF = [
    {"prompt": [{"role": "user", "content": "2+2?"}], "chosen": [{"role": "assistant", "content": "4"}],
     "rejected": [{"role": "assistant", "content": "5"}]},
    {"prompt": [{"role": "user", "content": "Capital of France?"}], "chosen": "Paris", "rejected": "Rome, I think"},
]

SEGMENTS = [
    {"segments": [{"text": "The pass key is 71432. What is the pass key? The pass key is", "weight": 1},
                  {"text": " 71432", "weight": 20}, {"text": ".", "weight": 1}, {"text": "####", "weight": 0}]},
    {"segments": [{"text": "Question: 2+2?", "label": False}, {"text": " Answer: 4.", "label": True}]},
]


@pytest.fixture(scope="module")
def llama3():
    return load_tokenizer()


@pytest.fixture(scope="module")
def sp():
    return load_tokenizer(require_shared("assets", "llama2c_stories260K", "tok512.model"))


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_roles_match_the_tokenizer():
    assert ROLES == CHAT_ROLES


def test_chat_ids_are_the_llama31_format_and_mask_covers_assistant_content_and_eot(llama3):
    fmt = ChatFormat(llama3)
    msgs = CHAT[0]["messages"]
    ids, w, part = encode_chat(fmt, msgs)
    assert list(ids) == encode_dialog(llama3, msgs, add_generation_prompt=False)
    # the trained tokens, decoded, are exactly each assistant answer followed by <|eot_id|>
    trained = llama3.decode([int(i) for i, x in zip(ids, w) if x])
    assert trained == "4<|eot_id|>6, of course.<|eot_id|>"
    assert (part == 1).all() and w[0] == 0


def test_sentencepiece_renders_headers_as_text_and_ends_turns_with_eos(sp):
    fmt = ChatFormat(sp)
    assert not fmt.llama3 and fmt.eot == sp.eos_id
    ids, w, _ = encode_chat(fmt, CHAT[1]["messages"])
    assert ids[0] == sp.bos_id and ids[-1] == sp.eos_id and w[-1] == 1
    assert "<|start_header_id|>assistant<|end_header_id|>" in sp.decode([int(i) for i in ids])
    trained = [int(i) for i, x in zip(ids, w) if x]
    assert trained[-1] == sp.eos_id and sp.decode(trained[:-1]).strip() == "hi there"


@pytest.mark.parametrize("mask_special", [False, True])
def test_preference_rows(llama3, mask_special):
    fmt = ChatFormat(llama3)
    p = PREF[1]
    doc = encode_preference(fmt, p["prompt"], [{"role": "assistant", "content": "Paris"}],
                            [{"role": "assistant", "content": "Rome, I think"}], mask_special=mask_special)
    ids, w, part = doc
    prompt = encode_dialog(llama3, p["prompt"], add_generation_prompt=True)
    for k, answer in ((1, "Paris"), (2, "Rome, I think")):
        sel = part == k
        assert list(ids[sel][:len(prompt)]) == prompt and not w[sel][:len(prompt)].any()
        trained = llama3.decode([int(i) for i, x in zip(ids[sel], w[sel]) if x])
        assert trained == answer + ("" if mask_special else "<|eot_id|>")


def test_packed_row_holds_whole_documents_with_their_own_segments(llama3):
    fmt = ChatFormat(llama3)
    docs = [encode_chat(fmt, r["messages"]) for r in CHAT[1:]]
    n0, n1 = docs[0].shape[1], docs[1].shape[1]
    row = pack_documents(docs, n0 + n1 + 5)
    assert list(row["segment_ids"]) == [1] * n0 + [2] * n1 + [0] * 5
    assert list(row["positions"][:n0 + n1]) == list(range(n0)) + list(range(n1))
    assert list(row["tokens"][:n0]) == list(docs[0][0])
    assert list(row["targets"][:n0 - 1]) == list(docs[0][0][1:])
    assert list(row["loss_mask"][:n0 - 1]) == list(docs[0][1][1:]) and row["loss_mask"][n0 - 1] == 0
    assert not row["loss_mask"][n0 + n1 - 1:].any()


def _all_batches(path, tok, fmt, seq_len=64, batch=2, **kw):
    cfg = DataConfig.from_paths(path, format=fmt, num_epochs=1, shuffle=False, prefetch=0, **kw)
    with make_dataset(cfg, tok, seq_len=seq_len, global_batch_size=batch, seed=0, process_index=0,
                      process_count=1) as it:
        return list(it), it.stats


def test_chat_source_every_row_once_whole(tmp_path, llama3):
    path = write_jsonl(tmp_path / "c.jsonl", CHAT)
    batches, stats = _all_batches(path, llama3, "chat")
    fmt = ChatFormat(llama3)
    want = sorted(tuple(encode_chat(fmt, r["messages"])[0]) for r in CHAT)
    got = []
    for b in batches:
        for r in range(b["tokens"].shape[0]):
            for s in range(1, b["segment_ids"][r].max() + 1):
                got.append(tuple(b["tokens"][r][b["segment_ids"][r] == s]))
    assert sorted(got) == want
    assert list(stats.values())[0]["documents"] == 3


def test_overlong_rows_error_or_drop_with_a_count(tmp_path, llama3):
    long = {"messages": [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]}
    path = write_jsonl(tmp_path / "c.jsonl", CHAT + [long])
    with pytest.raises(DataError, match=r"c.jsonl:4: .* tokens > seq_len=64"):
        _all_batches(path, llama3, "chat")
    batches, stats = _all_batches(path, llama3, "chat", overlong="drop")
    s = list(stats.values())[0]
    assert s["dropped_overlong"] == 1 and s["documents"] == 3


@pytest.mark.parametrize("fmt,line,pattern", [
    ("chat", "{not json", r"b.jsonl:2: malformed JSON"),
    ("chat", {"messages": [{"role": "robot", "content": "x"}]}, r"b.jsonl:2: .*unknown role 'robot'"),
    ("chat", {"messages": [{"role": "user", "content": "hello"}]}, r"b.jsonl:2: no assistant turn"),
    ("chat", {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]},
     r"b.jsonl:2: messages\[1\] \(assistant\): empty content"),
    ("preference", {"prompt": [{"role": "user", "content": "q"}], "chosen": "a", "rejected": "a"},
     r"b.jsonl:2: chosen is identical to rejected"),
    ("preference", {"prompt": [{"role": "user", "content": "q"}], "chosen": "a"}, r"b.jsonl:2: no field"),
    ("segments", {"text": "a"}, r"b.jsonl:2: no field 'segments'"),
    ("segments", {"segments": [{"text": "a", "weight": -1}]}, r"b.jsonl:2: segments\[0\]: weight -1, expected an "
     "integer >= 0"),
    ("segments", {"segments": [{"text": "a", "weight": 1.5}]}, r"b.jsonl:2: segments\[0\]: weight 1.5"),
    ("segments", {"segments": [{"text": "a", "weight": True}]}, r"b.jsonl:2: segments\[0\]: weight True"),
    ("segments", {"segments": [{"text": "", "weight": 1}]}, r"b.jsonl:2: segments\[0\]: expected"),
    ("segments", {"segments": [{"text": "a", "weight": 0}, {"text": "b", "label": False}]},
     r"b.jsonl:2: every segment has weight 0"),
])
def test_bad_rows_name_file_and_line(tmp_path, llama3, fmt, line, pattern):
    good = {"chat": CHAT[1], "preference": PREF[0], "segments": SEGMENTS[0]}[fmt]
    path = write_jsonl(tmp_path / "b.jsonl", [good, line])
    with pytest.raises(DataError, match=pattern):
        _all_batches(path, llama3, fmt)


def test_preference_pairs_are_consecutive_segments_and_resume_is_exact(tmp_path, llama3):
    rows = [{"prompt": [{"role": "user", "content": f"q{i}"}], "chosen": f"yes {i}", "rejected": f"no {i}"}
            for i in range(12)]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    cfg = DataConfig.from_paths(path, format="preference", prefetch=0, mask_special=True)
    kw = dict(seq_len=64, global_batch_size=2, seed=3, process_index=0, process_count=1)
    with make_dataset(cfg, llama3, **kw) as it:
        first = [next(it) for _ in range(3)]
        state = it.get_state()
        rest = [next(it) for _ in range(4)]
    with make_dataset(cfg, llama3, **kw) as it:
        it.set_state(state)
        again = [next(it) for _ in range(4)]
    for a, b in zip(rest, again):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    b = first[0]
    for r in range(2):
        seg = b["segment_ids"][r]
        assert seg.max() % 2 == 0 and seg.max() >= 2  # whole pairs only
        for s in range(1, seg.max() + 1, 2):  # chosen then rejected share the prompt
            c, j = b["tokens"][r][seg == s], b["tokens"][r][seg == s + 1]
            assert llama3.decode([int(x) for x in c]).split("\n\n")[-1].startswith("yes")
            assert llama3.decode([int(x) for x in j]).split("\n\n")[-1].startswith("no")
    # per-host sharding: two processes read disjoint pairs
    seen = []
    for p in range(2):
        with make_dataset(DataConfig.from_paths(path, format="preference", prefetch=0, num_epochs=1),
                          llama3, seq_len=64, global_batch_size=2, seed=3, process_index=p, process_count=2) as it:
            seen.append({tuple(x["tokens"][0][x["segment_ids"][0] == s]) for x in it
                         for s in range(1, x["segment_ids"][0].max() + 1, 2)})
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 12


@pytest.mark.parametrize("name", ["llama3", "sp"])
def test_segments_are_one_text_with_each_token_weighted_by_its_segment(request, name):
    """The ids are those of the whole text as a plain document (a segment encoded alone would start with a dummy
    prefix under SentencePiece); each token carries its segment's weight, so loss_mask[t] (the weight of
    targets[t] = ids[t+1]) weights the prediction of that segment's tokens; EOS takes the last segment's."""
    tok = request.getfixturevalue(name)
    segs = [(x["text"], x["weight"]) for x in SEGMENTS[0]["segments"]]
    ids, w, part = encode_segments(tok, segs)
    np.testing.assert_array_equal(ids, encode_document(tok, "".join(t for t, _ in segs)))
    assert (part == 1).all() and w[0] == 0 and w[-1] == 0  # BOS is never a target; EOS after the weight-0 padding
    for weight, text in ((20, " 71432"), (0, "####")):  # between BOS and EOS
        assert tok.decode([int(i) for i, x in zip(ids[1:-1], w[1:-1]) if x == weight]).strip() == text.strip()
    assert tok.decode([int(i) for i, x in zip(ids[1:-1], w[1:-1]) if x == 1]).startswith("The pass key is 71432.")
    row = pack_documents([np.stack([ids, w, part])], len(ids) + 3)
    np.testing.assert_array_equal(row["loss_mask"][:len(ids) - 1], w[1:])  # the weight of each target
    assert (row["loss_mask"][len(ids) - 1:] == 0).all()  # EOS predicts nothing in a row of whole documents


def test_segments_that_split_a_token_are_refused(sp):
    """A boundary inside a word: the tokenizer merges across it, no token has a single weight."""
    with pytest.raises(DataError, match=r"row 7: the tokenizer merges the end of segments\[0\]"):
        encode_segments(sp, [("Once upon a ti", 1), ("me.", 5)], "row 7")


def test_segments_source_packs_whole_documents_with_their_weights(tmp_path, sp):
    path = write_jsonl(tmp_path / "s.jsonl", SEGMENTS)
    batches, stats = _all_batches(path, sp, "segments", seq_len=64, batch=2)
    assert list(stats.values())[0]["documents"] == 2
    rows = [(b["targets"][r], b["loss_mask"][r], b["segment_ids"][r]) for b in batches for r in range(2)]
    got = {}
    for t, m, seg in rows:
        for k in range(1, int(seg.max()) + 1):  # each document: its weighted targets, by weight
            on = seg == k
            got[tuple(sorted(set(m[on].tolist())))] = {x: sp.decode([int(i) for i in t[on & (m == x)]]).strip()
                                                      for x in set(m[on].tolist()) if x}
    assert got[(0.0, 1.0, 20.0)][20.0] == "71432"
    assert got[(0.0, 1.0)] == {1.0: "Answer: 4."}  # axolotl's labels: False = context only
