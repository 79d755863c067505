"""Helpers of the bad-input tests (tests/test_bad_inputs*.py): run a CLI in-process and fingerprint a tree."""

import hashlib
import os


def tree_digest(root) -> dict[str, str]:
    """relative path -> sha256 of every file (and "dir" for every directory) under root: byte-identical
    trees, and no file or directory added or removed, compare equal."""
    out = {}
    root = os.fspath(root)
    for d, dirs, files in os.walk(root):
        for n in dirs:
            out[os.path.relpath(os.path.join(d, n), root)] = "dir"
        for n in files:
            p = os.path.join(d, n)
            if os.path.islink(p):
                out[os.path.relpath(p, root)] = "link:" + os.readlink(p)
                continue
            with open(p, "rb") as f:
                out[os.path.relpath(p, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


def run_cli(main, argv, capsys) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of main(argv), whether it returns a code or raises SystemExit."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out = capsys.readouterr()
    return (0 if code is None else code), out.out, out.err
