"""The error contract every command line of this project shares (llama.train, llama.generate, llama.chat,
llama.convert, llama.compare, llama.sweep, sharding.plan, input_pipeline.prepare):

- an expected failure (a bad flag value, a file that is missing, unreadable, read-only, full, malformed JSON
  or not text, a config field of the wrong type, an unknown preset, a bad mesh string) ends with ONE line on
  stderr, `error: <the file, flag or field>: <what was expected>`, and exit status 2;
- anything else is a bug and keeps its traceback.

    @cli.command                      # main(argv) -> exit code; expected errors -> "error: ..." and 2
    def main(argv=None) -> int:
        ap = cli.ArgumentParser(prog="python -m llama.x")        # usage errors: one line, exit 2
        ap.add_argument("--temperature", type=cli.number(0, math.inf))   # NaN fails a range check
        ...
    if __name__ == "__main__":
        sys.exit(main())

Expected failures are ValueError (every error class of this project derives from it: ConfigError,
CheckpointError, ConvertError, DataError, ShardingError, TokenizerError, ...; json.JSONDecodeError and
UnicodeDecodeError too) and OSError. Messages of this project name the input; OSError is rendered from its
filename and strerror.
"""

from __future__ import annotations

import argparse
import errno
import functools
import math
import re
import sys

_OS_HINTS = {errno.EROFS: "the file system is read-only", errno.ENOSPC: "no space left on the device",
             errno.EDQUOT: "disk quota exceeded", errno.EACCES: "permission denied"}


class UsageError(ValueError):
    """A flag value or a combination of flags that cannot work (the message names the flag)."""


def message(e: BaseException) -> str:
    """One line naming the input: `<file, flag or field>: <what was expected>`."""
    if isinstance(e, OSError) and getattr(e, "filename", None) is not None:
        what = _OS_HINTS.get(e.errno, e.strerror or type(e).__name__)
        files = e.filename if e.filename2 is None else f"{e.filename} -> {e.filename2}"
        text = f"{files}: {what}"
    elif isinstance(e, UnicodeDecodeError):
        text = f"not UTF-8 text ({e.reason} at byte {e.start}); expected a text file"
    else:
        text = str(e) or type(e).__name__
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


def fail(e: BaseException) -> int:
    print(f"error: {message(e)}", file=sys.stderr)
    return 2


def command(main):
    """Wraps a CLI `main(argv, ...) -> int | None`: returns its code (None -> 0); an expected failure prints one
    `error:` line and returns 2. argparse's own exits (--help, usage errors) pass through as SystemExit."""

    @functools.wraps(main)
    def wrapped(*args, **kwargs) -> int:
        try:
            code = main(*args, **kwargs)
        except (ValueError, OSError) as e:
            return fail(e)
        return 0 if code is None else code

    return wrapped


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the contract's one-line usage errors (exit 2)."""

    def error(self, msg: str):
        self.exit(2, f"error: {msg} (see {self.prog} --help)\n")


def _interval(lo, hi, lo_open, hi_open) -> str:
    return f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open or hi == math.inf else ']'}"


def check_range(name: str, x, lo=-math.inf, hi=math.inf, *, lo_open=False, hi_open=False):
    """x itself, or UsageError unless lo <= x <= hi (strict where open). Written as the positive condition so
    that NaN, which fails every comparison, fails the check."""
    ok = (x > lo if lo_open else x >= lo) and (x < hi if hi_open else x <= hi)
    if not ok:
        raise UsageError(f"{name}={x}: expected a number in {_interval(lo, hi, lo_open, hi_open)}")
    return x


def number(lo=-math.inf, hi=math.inf, *, lo_open=False, hi_open=False, integer=False):
    """An argparse `type=` accepting a float (or an integer) in the range; 'nan', 'inf' outside it fail."""

    def parse(text: str):
        try:
            x = int(text) if integer else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: expected {'an integer' if integer else 'a number'} in "
                                             f"{_interval(lo, hi, lo_open, hi_open)}") from None
        ok = (x > lo if lo_open else x >= lo) and (x < hi if hi_open else x <= hi)
        if not ok:
            raise argparse.ArgumentTypeError(f"{text!r}: expected a number in {_interval(lo, hi, lo_open, hi_open)}")
        return x

    parse.__name__ = "integer" if integer else "number"
    return parse


_SIZE = re.compile(r"\s*((?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)?\s*", re.IGNORECASE)
_BINARY = {"b": 1, "kb": 2**10, "mb": 2**20, "gb": 2**30, "tb": 2**40, "kib": 2**10, "mib": 2**20, "gib": 2**30,
           "tib": 2**40}


def byte_size(text: str) -> int:
    """argparse `type=` for a positive size: '5GB' (= 5 GiB, as Hugging Face shards), '300KB', '1000' bytes."""
    m = _SIZE.fullmatch(str(text))
    n = float(m.group(1)) * _BINARY[(m.group(2) or "B").lower()] if m else math.nan
    if not (1 <= n < math.inf):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a positive size such as 5GB, 300MB or 1000 (bytes)")
    return int(n)


__all__ = ["UsageError", "message", "fail", "command", "ArgumentParser", "check_range", "number", "byte_size"]
