"""The host, set up for XLA:CPU: glibc's malloc on huge pages (its per-call scratch memory takes ~85x fewer page
faults), and one XLA:CPU device per core for long-prompt serving (`split_cpu`, further below).

XLA:CPU gives each call of a compiled program one buffer for all its temporaries, allocated with malloc and freed
when the call ends (`compiled.memory_analysis().temp_size_in_bytes`: 169 MB for the post-training bench's train
step). glibc serves a block that large with its own mmap and returns it with munmap, so every call faults in
every page anew: 41,000 faults per step of that bench, each a 4 KiB page the kernel zeroes (and, in a VM, an exit
to the hypervisor), 75-90 ms of system time in a 230-300 ms step on this project's 2-core machine
(docs/benchmarks.md, "The host allocator").

glibc can back those mmap'd blocks with transparent huge pages (2 MiB) instead: its `glibc.malloc.hugetlb=1`
tunable makes it madvise(MADV_HUGEPAGE) each one, where the kernel's THP mode is `madvise` (the common default;
under `always` every block gets them anyway, under `never` none can). Each call then takes ~500 faults instead of
41,000 (measured: system time 80 -> 20 ms per step) and the SFT step runs 10-25% faster; blocks are still returned
to the system when freed, so the resident size follows the program's use as before (a kept heap, tried first,
was as fast but held up to 3.5x the memory: freed blocks split by small allocations; docs/benchmarks.md).

The tunable is read once, when the process starts, so `use_huge_pages()` re-executes the command (same pid,
arguments and environment, plus the tunable) before it does any work: the commands that run models
(llama.train, llama.generate, llama.chat, llama.eval, llama.compare, llama.passkey) call it first thing in
their `__main__`, and the benchmarks' own side before any work. The cost is one more interpreter start and
import (~1 s). It does nothing where GLIBC_TUNABLES already sets `glibc.malloc.hugetlb`, off glibc (Linux only),
where the kernel's THP mode is not `madvise`, or with LLAMA_HUGE_PAGES=0; a program that imports this package is
never re-executed.
"""

from __future__ import annotations

import os
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"
REEXEC_MARK = "LLAMA_HUGE_PAGES_REEXEC"  # set in the re-executed process's environment


def thp_mode(path: str = THP_MODE) -> str | None:
    """The kernel's THP mode (the bracketed word of `always [madvise] never`), or None where it cannot be read."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def huge_pages_plan(environ=os.environ, libc: str | None = None, mode: str | None = "read") -> tuple[str, dict | None]:
    """(what happens, the environment to re-execute with, or None to go on as is), for this process's libc and
    THP mode unless given (mode None: unreadable)."""
    libc = platform.libc_ver()[0] if libc is None else libc
    mode = thp_mode() if mode == "read" else mode
    tunables = environ.get("GLIBC_TUNABLES", "")
    if environ.get("LLAMA_HUGE_PAGES", "1") == "0":
        return "off (LLAMA_HUGE_PAGES=0)", None
    if "glibc.malloc.hugetlb" in tunables:
        return f"set (GLIBC_TUNABLES={tunables})", None
    if environ.get(REEXEC_MARK):  # re-executed once already, and the tunable did not survive: never loop
        return "not kept (GLIBC_TUNABLES lost its setting on re-execution)", None
    if libc != "glibc":
        return f"unsupported (libc: {libc or platform.system()})", None
    if mode != "madvise":
        return f"not needed (THP mode: {mode})", None
    return "re-executing", dict(environ, GLIBC_TUNABLES=f"{tunables}:{TUNABLE}" if tunables else TUNABLE,
                                **{REEXEC_MARK: "1"})


def use_huge_pages() -> str:
    """Re-executes this process with glibc's malloc on transparent huge pages, as the module docstring says (this
    call then does not return), or returns why it did not."""
    what, env = huge_pages_plan()
    if env is None:
        return what
    argv = getattr(sys, "orig_argv", None)
    if not argv or not sys.executable:
        return "not re-executed (no sys.orig_argv or sys.executable to run again)"
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, *argv[1:]], env)
    except OSError as e:  # cannot re-execute: carry on without
        return f"not re-executed ({e})"
    return what  # unreachable: execve replaced the process


# ------------------------------------------------------------------------------ one XLA:CPU device per core
# XLA:CPU gives a program one device and spreads each op over the cores: the long prefill's attention loop (a
# dozen small ops per tile, docs/benchmarks.md) then hands off between threads at every op, and the
# 16K-token probe keeps ~1.9 of 2 cores busy. Split into one device per core, with the heads over them (tensor
# parallel, `llama.generate.cpu_mesh`), each device runs its own heads' loop on its own core: the 16K prefill ran
# 2.13-2.30 s against 2.56-2.62 on one device, and 4.3 CPU s against 4.8 (docs/benchmarks.md, "One device per
# core"). The device count is read when the CPU backend starts, so `split_cpu()` runs before any array exists.
DEVICE_COUNT = "--xla_force_host_platform_device_count"


def cpu_cores() -> int:
    """The CPUs this process may run on (its affinity mask; os.cpu_count() where that is not available)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def cpu_devices_plan(environ=os.environ, cores: int | None = None) -> tuple[str, str | None]:
    """(what happens, the XLA_FLAGS to set, or None to leave them): one CPU device per core, or LLAMA_CPU_DEVICES of
    them; nothing where XLA_FLAGS already sets a device count."""
    flags = environ.get("XLA_FLAGS", "")
    if DEVICE_COUNT in flags:
        return f"set (XLA_FLAGS={flags})", None
    want = environ.get("LLAMA_CPU_DEVICES")
    if want is not None:
        if not want.strip().isdigit() or int(want) < 1:
            raise ValueError(f"LLAMA_CPU_DEVICES={want!r}: expected a positive integer (CPU devices; 1: one device)")
        n = int(want)
    else:
        n = cpu_cores() if cores is None else cores
    if n <= 1:
        return "one device", None
    return f"{n} CPU devices", f"{flags} {DEVICE_COUNT}={n}".strip()


def split_cpu(environ=os.environ) -> str:
    """Splits the CPU into devices as `cpu_devices_plan` says (before the CPU backend starts: the commands call it in
    their `__main__`), and returns what it did. Accelerators are unaffected; the CPU's devices are idle there."""
    try:
        what, flags = cpu_devices_plan(environ)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    if flags is not None:
        environ["XLA_FLAGS"] = flags
    return what


__all__ = ["use_huge_pages", "huge_pages_plan", "thp_mode", "TUNABLE", "REEXEC_MARK", "cpu_cores",
           "cpu_devices_plan", "split_cpu", "DEVICE_COUNT"]
