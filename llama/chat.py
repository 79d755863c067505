"""A chat REPL in the Llama 3.1 Instruct format, streaming the reply as it is generated.

    python -m llama.chat --checkpoint DIR [--system "You are a helpful assistant."] [--quantize int8]

Each turn re-encodes the whole dialog with `llama.tokenizer.encode_dialog` (system, user, assistant, ipython
headers; facts sheet 5.5), prefills it in one pass and decodes on the device a few tokens per host round trip
(`generate.stream`), stopping on <|eot_id|> (end of turn) or <|eom_id|> (end of message: a tool call is
pending; the reply is kept with "eom" so the next turn can carry the tool's output as an ipython message).
Commands: /reset clears the dialog, /exit (or end of input) quits.
"""

from __future__ import annotations

import codecs
import sys
from typing import Callable, Sequence

from llama import cli
from llama import generate as G
from llama.sampling import SamplingConfig
from llama.tokenizer import encode_dialog


def reply(params, cfg, tok, messages: Sequence[dict], *, sampling: SamplingConfig, seed: int = 0,
          max_new_tokens: int = 1024, write: Callable[[str], object] = sys.stdout.write, cache_dtype=None) -> dict:
    """Generates the assistant's next message for `messages`, writing its text to `write` as it arrives
    (whole UTF-8 characters only). Returns the message {"role": "assistant", "content", "eom"?} and, under
    "ids", the generated ids (stop token included)."""
    prompt = encode_dialog(tok, messages, add_generation_prompt=True)
    stops = tuple(tok.stop_ids)
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
    ids: list[int] = []
    sent = 0  # bytes of the reply already written
    for chunk in G.stream(params, prompt, cfg=cfg, max_new_tokens=max_new_tokens, sampling=sampling, seed=seed,
                          stop_ids=stops, truncate=True, cache_dtype=cache_dtype):
        ids += chunk
        # Decode the whole reply each time: token bytes concatenate, so the new bytes are a suffix.
        data = tok.decode_bytes([t for t in ids if t not in stops])
        write(utf8.decode(data[sent:]))
        sent = len(data)
    write(utf8.decode(b"", final=True))
    text = tok.decode([t for t in ids if t not in stops])
    msg = {"role": "assistant", "content": text}
    if ids and ids[-1] == tok.eom_id:
        msg["eom"] = True
    return {**msg, "ids": ids}


@cli.command
def main(argv: Sequence[str] | None = None, stdin=None, stdout=None) -> None:
    ap = cli.ArgumentParser(prog="python -m llama.chat", description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", required=True, help="model checkpoint directory (an Instruct model)")
    ap.add_argument("--tokenizer", help="Llama 3 tokenizer.model (default: DIR/tokenizer.model, else llama-models')")
    ap.add_argument("--system", help="system prompt")
    G.add_sampling_flags(ap, max_new_tokens=1024)
    ap.add_argument("--quantize", choices=["int8"])
    ap.add_argument("--lora", choices=G.LORA_MODES, default="merge",
                    help="a LoRA run or adapter checkpoint: merge the adapters at load, or apply them at runtime")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--mesh", help="e.g. data=1,fsdp=1,tensor=8")
    ap.add_argument("--cache-dtype", choices=["float32", "bfloat16", "int8"], help="KV cache dtype (default: compute)")
    a = ap.parse_args(argv)
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout

    tok = G.load_tokenizer_for(a.checkpoint, a.tokenizer)
    if not hasattr(tok, "eot_id"):
        raise cli.UsageError(f"--tokenizer: llama.chat needs the Llama 3 tokenizer (the 3.1 chat format's special tokens); got "
                         f"{tok!r}: pass --tokenizer with a Llama 3 tokenizer.model, or use llama.generate")
    cfg, params, _ = G.load_for_inference(a.checkpoint, mesh_text=a.mesh, quantize=a.quantize, dtype=a.dtype,
                                          lora_mode=a.lora)
    # The decode loop streams from one device-resident row; a mesh shards the weights (tensor parallel).
    sampling = SamplingConfig(a.temperature, a.top_p, a.top_k)
    system = [{"role": "system", "content": a.system}] if a.system else []
    messages = list(system)
    turn = 0
    while True:
        stdout.write("\n>>> ")
        stdout.flush()
        line = stdin.readline()
        if not line or line.strip() == "/exit":
            return
        if line.strip() == "/reset":
            messages = list(system)
            continue
        messages.append({"role": "user", "content": line.rstrip("\n")})
        try:
            out = reply(params, cfg, tok, messages, sampling=sampling, seed=a.seed + turn,
                        max_new_tokens=a.max_new_tokens, write=lambda s: (stdout.write(s), stdout.flush()),
                        cache_dtype=a.cache_dtype)
        except G.ContextLimitError as e:
            stdout.write(f"[context full: {e}; /reset to start over]\n")
            messages.pop()
            continue
        out.pop("ids")
        messages.append(out)
        turn += 1


if __name__ == "__main__":
    from llama import host

    host.use_huge_pages()  # re-executes once with glibc's malloc on huge pages (llama/host.py), before any work
    sys.exit(main())  # expected errors (they name the input): one `error:` line, exit 2 (llama/cli.py)
