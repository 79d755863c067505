"""Chat (SFT), preference (DPO) and weighted-text data: JSONL rows -> tokenized, loss-weighted documents ->
packed rows.

Formats (one JSON object per line):
- format="chat": {"messages": [{"role": "system"|"user"|"assistant"|"ipython"|"tool", "content": str}, ...]}
- format="preference": {"prompt": [messages], "chosen": [assistant message(s)] | str, "rejected": same}, the
  conversational preference format of TRL; a plain string stands for one assistant message.
- format="segments": {"segments": [{"text": str, "weight": int >= 0}, ...]}, pre-training text whose loss is
  weighted per span (`encode_segments`): the document is the texts concatenated, [BOS, ..., EOS] as any text
  document, and each target token counts `weight` times (default 1; 0 = context only). This is axolotl's
  template-free "input_output" format with an integer weight in place of its boolean "label" (a "label" is
  read as weight 1 or 0). Used with objective=pretrain, e.g. by the passkey experiment (llama/passkey.py) to
  weight the answer to the question.

Rendering: the Llama 3.1 chat format (Meta `llama3/chat_format.py`, `llama.tokenizer.encode_dialog`, id for id):
    <|begin_of_text|> per message: <|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>
A tokenizer without the Llama 3 special tokens (the SentencePiece model the main job trains has only
<unk> <s> </s>) gets the same layout with BOS = <s>, the header written as plain text
"<|start_header_id|>{role}<|end_header_id|>\\n\\n" (ordinary pieces) and the end of turn = EOS (</s>), the
token its generation already stops on (`SentencePieceTokenizer.stop_ids`).

Each document is an int32 array [3, n]: ids; weight (1 = a training target: SFT: assistant content and the
<|eot_id|> ending each assistant turn, Llama 3 paper section 4.1.3 and the issue; preference: the completion,
see `encode_preference`; segments: the segment's weight); part (1, or 1 = chosen / 2 = rejected for a
preference pair). Rows are tokenized once, when the source is opened (a progress bar), so bad rows and
over-long rows are found before training.

Packing (`ChatPackIterDataset`): whole documents, in stream order, into rows of exactly T tokens; a document
that does not fit starts the next row (the rest is padding: segment 0, loss_mask 0). Every part is a segment of
its own (ids 1, 2, ... within the row; positions restart at 0), so the document mask that pre-training uses
(model.hidden_states' segment_ids) keeps them apart: a packed row's loss is the sum of its documents' losses.
A preference pair is therefore two consecutive segments (2k-1 = chosen, 2k = rejected) of one row: the DPO
objective sums log-probs per segment (llama/loss.py). loss_mask[t] is the weight of targets[t] = ids[t+1].
"""

from __future__ import annotations

import copy
import json
import os
from typing import Any, Sequence

import grain
import numpy as np

from input_pipeline.packing import empty_rows
from input_pipeline.sources import DataError, Documents, expand_paths

# Same roles as llama.tokenizer.CHAT_ROLES ("tool" is written as "ipython", as Meta does); a test checks.
ROLES = ("system", "user", "assistant", "ipython", "tool")
OVERLONG = ("error", "drop")
CHOSEN, REJECTED = 1, 2


class ChatFormat:
    """How a tokenizer renders the Llama 3.1 chat layout (see the module docstring)."""

    def __init__(self, tok):
        self.tok = tok
        self.llama3 = all(hasattr(tok, a) for a in ("start_header_id", "end_header_id", "eot_id"))
        self.bos = int(tok.bos_id)
        self.eot = int(tok.eot_id) if self.llama3 else int(tok.eos_id)
        self._headers: dict[str, list[int]] = {}

    def header(self, role: str) -> list[int]:
        role = "ipython" if role == "tool" else role
        if role not in self._headers:
            t = self.tok
            self._headers[role] = ([t.start_header_id, *t.encode(role), t.end_header_id, *t.encode("\n\n")]
                                   if self.llama3 else t.encode(f"<|start_header_id|>{role}<|end_header_id|>\n\n"))
        return self._headers[role]

    def encode(self, messages: Sequence[dict], *, bos: bool = True, generation_prompt: bool = False):
        """(ids, weights, content) lists: weights 1 on assistant content and on the end of each assistant turn;
        content 1 on message content (not on headers and ends of turns: the 'special' tokens)."""
        ids, w, c = ([self.bos], [0], [0]) if bos else ([], [], [])
        for m in messages:
            h = self.header(m["role"])
            body = self.tok.encode(m["content"])
            a = int(m["role"] == "assistant")
            ids += h + body + [self.eot]
            w += [0] * len(h) + [a] * len(body) + [a]
            c += [0] * len(h) + [1] * len(body) + [0]
        if generation_prompt:
            h = self.header("assistant")
            ids, w, c = ids + h, w + [0] * len(h), c + [0] * len(h)
        return ids, w, c


def encode_chat(fmt: ChatFormat, messages: Sequence[dict]) -> np.ndarray:
    """[3, n] int32: ids, SFT weights, part (all 1)."""
    ids, w, _ = fmt.encode(messages)
    return np.asarray([ids, w, [1] * len(ids)], np.int32)


def encode_preference(fmt: ChatFormat, prompt, chosen, rejected, *, mask_special: bool) -> np.ndarray:
    """[3, n_chosen + n_rejected] int32: the two sequences prompt + completion, one after the other (part 1 =
    chosen, 2 = rejected). The prompt ends with the assistant header (the generation prompt), as TRL tokenizes
    it; the completion is everything after it. Weights: mask_special=False: every completion token (its content,
    the <|eot_id|> and any later header), TRL's completion_mask; mask_special=True: the completion's content
    tokens only, header and termination tokens masked out (Llama 3 paper section 4.1.4)."""
    p_ids, _, _ = fmt.encode(prompt, generation_prompt=True)
    out = []
    for part, completion in ((CHOSEN, chosen), (REJECTED, rejected)):
        ids, _, content = fmt.encode(completion, bos=False)
        h = len(fmt.header("assistant"))  # the first header is already the prompt's generation prompt
        ids, content = ids[h:], content[h:]
        w = content if mask_special else [1] * len(ids)
        n = len(p_ids) + len(ids)
        out.append(np.asarray([p_ids + ids, [0] * len(p_ids) + w, [part] * n], np.int32))
    return np.concatenate(out, axis=1)


def encode_segments(tok, segments: Sequence[tuple[str, int]], where: str = "segments") -> np.ndarray:
    """[3, n] int32: the ids of the segments' texts concatenated and encoded as ONE text with BOS and EOS (as
    `input_pipeline.encode_document` encodes a plain document: encoding each piece alone would start it with
    SentencePiece's dummy-prefix space and give ids that plain text never has); the weight of each token, i.e.
    of the loss on predicting it, is its segment's (EOS takes the last segment's; BOS is never a target); part 1.

    Segment k starts at token len(BOS + encode(texts before k)). DataError naming `where` when the tokenizer
    merges across a boundary (that prefix's ids are not a prefix of the whole text's), where no token could be
    given one weight."""
    text = "".join(t for t, _ in segments)
    ids = tok.encode(text, bos=True, eos=True)
    w = np.empty(len(ids), np.int32)
    w[0], start, prefix = 0, 1, ""
    for k, (t, weight) in enumerate(segments):
        prefix += t
        head = ids if k == len(segments) - 1 else tok.encode(prefix, bos=True, eos=False)
        end = len(head)
        if head != ids[:end]:
            raise DataError(f"{where}: the tokenizer merges the end of segments[{k}] with the start of segments"
                            f"[{k + 1}] ({prefix[-20:]!r} | {segments[k + 1][0][:20]!r}); move the boundary to a "
                            "space or punctuation")
        w[start:end] = weight
        start = end
    return np.stack([np.asarray(ids, np.int32), w, np.ones(len(ids), np.int32)])


# ------------------------------------------------------------------------------------------------ reading
def _check_messages(msgs, where: str, what: str) -> list[dict]:
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f"{where}: {what} must be a non-empty list of messages, got {type(msgs).__name__}")
    out = []
    for k, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise DataError(f"{where}: {what}[{k}] is {type(m).__name__}, expected {{'role': ..., 'content': ...}}")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise DataError(f"{where}: {what}[{k}]: unknown role {role!r}; expected one of {ROLES}")
        if not isinstance(content, str):
            raise DataError(f"{where}: {what}[{k}] ({role}): content is {type(content).__name__}, expected a string")
        if not content.strip():
            raise DataError(f"{where}: {what}[{k}] ({role}): empty content")
        out.append({"role": role, "content": content})
    return out


def _completion(x, where: str, what: str) -> list[dict]:
    if isinstance(x, str):
        x = [{"role": "assistant", "content": x}]
    msgs = _check_messages(x, where, what)
    if msgs[0]["role"] != "assistant":
        raise DataError(f"{where}: {what} must start with an assistant message, got role {msgs[0]['role']!r}")
    return msgs


def _check_segments(segs, where: str) -> list[tuple[str, int]]:
    if not isinstance(segs, list) or not segs:
        raise DataError(f"{where}: segments must be a non-empty list of {{'text': ..., 'weight': ...}}, got "
                        f"{type(segs).__name__}")
    out = []
    for k, seg in enumerate(segs):
        if not isinstance(seg, dict) or not isinstance(seg.get("text"), str) or not seg["text"]:
            raise DataError(f"{where}: segments[{k}]: expected {{'text': non-empty string, 'weight': int}}, got "
                            f"{seg!r:.80}")
        label = seg.get("label", True)  # axolotl's boolean label, read where no weight is given
        w = seg["weight"] if "weight" in seg else int(label) if isinstance(label, bool) else label
        w = int(w) if isinstance(w, float) and w.is_integer() else w  # JSON writers may print 20 as 20.0
        if isinstance(w, bool) or not isinstance(w, int) or w < 0:
            raise DataError(f"{where}: segments[{k}]: weight {seg.get('weight', seg.get('label'))!r}, expected an "
                            "integer >= 0 (the number of times each target token counts; 0 = context only)")
        out.append((seg["text"], w))
    if not any(w for _, w in out):
        raise DataError(f"{where}: every segment has weight 0: nothing to train on")
    return out


def parse_row(obj: Any, fmt_name: str, where: str):
    """The validated row: messages (chat), (prompt, chosen, rejected) (preference) or [(text, weight)]
    (segments). DataError naming `where` (file:line) for: not an object, missing field, unknown role, empty
    content or text, no assistant turn, chosen identical to rejected, a weight that is not an integer >= 0."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if fmt_name == "segments":
        if "segments" not in obj:
            raise DataError(f"{where}: no field 'segments' (found {sorted(obj)})")
        return _check_segments(obj["segments"], where)
    if fmt_name == "chat":
        if "messages" not in obj:
            raise DataError(f"{where}: no field 'messages' (found {sorted(obj)})")
        msgs = _check_messages(obj["messages"], where, "messages")
        if not any(m["role"] == "assistant" for m in msgs):
            raise DataError(f"{where}: no assistant turn: nothing to train on")
        return msgs
    missing = [k for k in ("prompt", "chosen", "rejected") if k not in obj]
    if missing:
        raise DataError(f"{where}: no field(s) {missing} (found {sorted(obj)}); expected prompt, chosen, rejected")
    prompt = _check_messages(obj["prompt"], where, "prompt")
    chosen, rejected = _completion(obj["chosen"], where, "chosen"), _completion(obj["rejected"], where, "rejected")
    if chosen == rejected:
        raise DataError(f"{where}: chosen is identical to rejected: no preference to learn")
    return prompt, chosen, rejected


class ChatDocuments(Documents):
    """Tokenized chat or preference documents ([3, n] int32 arrays), with `stats` and `where[i]` (file:line)."""

    def __init__(self, name, docs, where, stats):
        self.name, self._docs, self.where, self.stats = name, docs, where, stats

    def __len__(self):
        return len(self._docs)

    def __getitem__(self, i):
        return self._docs[i]


def open_chat(src, tokenizer, *, seq_len: int, progress: bool = True) -> ChatDocuments:
    """Reads, validates and tokenizes every row of a chat, preference or segments source (src.format). Rows
    longer than seq_len tokens (a preference row: chosen + rejected together) follow src.overlong: "error"
    (DataError naming file:line and the lengths) or "drop" (counted in stats["dropped_overlong"]). Nothing is
    truncated."""
    from tqdm import tqdm

    if src.overlong not in OVERLONG:
        raise DataError(f"Source.overlong={src.overlong!r}: expected one of {OVERLONG}")
    files = expand_paths(src.paths)
    rows = []
    for path in files:
        with open(path, "rb") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    obj = json.loads(line.decode("utf-8"))
                except UnicodeDecodeError as e:
                    raise DataError(f"{where}: invalid UTF-8 at byte {e.start} of the line") from None
                except json.JSONDecodeError as e:
                    raise DataError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
                rows.append((where, parse_row(obj, src.format, where)))
    fmt = ChatFormat(tokenizer)
    docs, wheres = [], []
    stats = {"files": len(files), "documents": 0, "rows": len(rows), "dropped_overlong": 0, "tokens": 0}
    for where, row in tqdm(rows, desc=f"tokenize {src.format} {os.path.basename(files[0])}", unit="row",
                           disable=not progress, mininterval=1.0):
        doc = (encode_chat(fmt, row) if src.format == "chat" else
               encode_segments(tokenizer, row, where) if src.format == "segments" else
               encode_preference(fmt, *row, mask_special=src.mask_special))
        if doc.shape[1] > seq_len:
            if src.overlong == "error":
                raise DataError(f"{where}: {doc.shape[1]} tokens > seq_len={seq_len}"
                                f"{' (chosen + rejected together)' if src.format == 'preference' else ''}; raise "
                                "seq_len, or set data.overlong=drop to drop such rows (counted), never truncated")
            stats["dropped_overlong"] += 1
            continue
        docs.append(doc)
        wheres.append(where)
        stats["tokens"] += doc.shape[1]
    stats["documents"] = len(docs)
    if not docs:
        raise DataError(f"{src.format}:{','.join(src.paths)}: zero usable rows (stats {stats})")
    return ChatDocuments(f"{src.format}:{','.join(src.paths)}", docs, wheres, stats)


# ------------------------------------------------------------------------------------------------ packing
def pack_documents(docs: Sequence[np.ndarray], seq_len: int) -> dict[str, np.ndarray]:
    """One row [T] from whole documents (each [3, n], n <= T in total); see the module docstring."""
    row = {k: v[0] for k, v in empty_rows(1, seq_len).items()}
    i, seg = 0, 0
    for doc in docs:
        ids, w, part = doc
        starts = np.flatnonzero(np.diff(part, prepend=-1))  # each part is a segment
        for s, e in zip(starts, [*starts[1:], len(ids)]):
            seg, n = seg + 1, e - s
            row["tokens"][i:i + n] = ids[s:e]
            row["targets"][i:i + n - 1] = ids[s + 1:e]
            row["loss_mask"][i:i + n - 1] = w[s + 1:e]
            row["positions"][i:i + n] = np.arange(n)
            row["segment_ids"][i:i + n] = seg
            i += n
    return row


def eval_rows(docs: Sequence[np.ndarray], seq_len: int, max_rows: int) -> tuple[dict[str, np.ndarray], int]:
    """Fixed held-out rows for the trainer's eval (sft/dpo): the documents in order, packed whole as training packs
    them (`pack_documents`: the same segments and masks), into at most `max_rows` rows of seq_len tokens. A pure
    function of its arguments, so it is the same after a resume. Returns (rows [R, T] dict, documents used)."""
    rows, cur, used, n = [], [], 0, 0
    for doc in docs:
        if used + doc.shape[1] > seq_len:
            if len(rows) + 1 == max_rows:
                break
            rows.append(pack_documents(cur, seq_len))
            cur, used = [], 0
        cur.append(doc)
        used, n = used + doc.shape[1], n + 1
    if cur:
        rows.append(pack_documents(cur, seq_len))
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}, n


class ChatPackIterDataset(grain.IterDataset):
    """Rows of whole documents from an IterDataset of blocks (lists) of [3, n] documents. State: the parent's
    state before the block holding the next unused document, and its index there (exact resume)."""

    def __init__(self, parent: grain.IterDataset, *, seq_len: int):
        super().__init__(parent)
        self._seq_len = seq_len

    def __iter__(self):
        return _ChatPackIterator(self._parent.__iter__(), self._seq_len)


class _ChatPackIterator(grain.DatasetIterator):
    def __init__(self, parent, seq_len: int):
        super().__init__(parent)
        self._T = seq_len
        self._block, self._block_state, self._j, self._skip = None, None, 0, 0

    def _peek(self):
        while self._block is None or self._j >= len(self._block):
            self._block_state = self._parent.get_state()
            try:
                self._block = next(self._parent)
            except StopIteration:
                self._block = None
                return None
            self._j, self._skip = self._skip, 0
        return self._block[self._j]

    def __next__(self):
        docs, used = [], 0
        while (doc := self._peek()) is not None and used + doc.shape[1] <= self._T:
            docs.append(doc)
            used += doc.shape[1]
            self._j += 1
        if not docs:
            raise StopIteration
        return pack_documents(docs, self._T)

    def get_state(self):
        if self._block is None:
            return {"parent": copy.deepcopy(self._parent.get_state()), "doc": int(self._skip)}
        return {"parent": copy.deepcopy(self._block_state), "doc": int(self._j)}

    def set_state(self, state):
        self._parent.set_state(state["parent"])
        self._block, self._j, self._skip = None, 0, int(state["doc"])

