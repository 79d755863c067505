"""llama/host.py: a command that calls `use_huge_pages()` re-executes itself once with glibc's malloc on transparent
huge pages, and XLA:CPU's per-call scratch buffer then takes a small fraction of the page faults it takes without
(each call faults the whole buffer in anew either way: glibc maps and unmaps it). Each case runs in a fresh
process: the tunable is read when a process starts."""

import json
import os
import platform
import subprocess
import sys

import pytest

from llama import host

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A program whose temporaries XLA:CPU puts in one 128 MiB scratch buffer (two [4096, 4096] float32
# intermediates). Minor page faults per call over calls 3-8, against the buffer's 4 KiB pages.
PROBE = r"""
import json, os, resource, sys
from llama import host
what = host.use_huge_pages()
import jax, jax.numpy as jnp
x = jnp.ones((4096, 4096), jnp.float32)
f = jax.jit(lambda x: (jnp.exp(x).T + jnp.exp(x)).sum()).lower(x).compile()
temp = f.memory_analysis().temp_size_in_bytes
f(x).block_until_ready(), f(x).block_until_ready()
r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(6):
    f(x).block_until_ready()
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0) / 6
print(json.dumps({"what": what, "pid": os.getpid(), "tunables": os.environ.get("GLIBC_TUNABLES"),
                  "temp_pages": temp / 4096, "faults_per_call": faults}))
"""


def _probe(on: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    env.update(JAX_PLATFORMS="cpu", LLAMA_HUGE_PAGES=on, PYTHONPATH=ROOT)
    p = subprocess.Popen([sys.executable, "-c", PROBE], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-2000:]
    return json.loads(out.strip().splitlines()[-1]) | {"popen_pid": p.pid}


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc" or host.thp_mode() != "madvise",
                    reason=f"needs glibc and the kernel's THP mode 'madvise' (here: libc {platform.libc_ver()[0]!r}, "
                           f"THP {host.thp_mode()!r})")
def test_huge_pages_cut_the_per_call_page_faults():
    on, off = _probe("1"), _probe("0")
    # The command re-executed itself (same pid) with the tunable, and the second start went on as is
    assert on["tunables"] == host.TUNABLE and on["what"].startswith("set") and on["pid"] == on["popen_pid"], on
    assert off["tunables"] is None and off["what"].startswith("off"), off
    assert on["temp_pages"] >= 128 * 2**20 / 4096  # the scratch buffer the program needs (128 MiB)
    # Without the tunable each call faults in (more than) the whole buffer anew: the cost removed
    assert off["faults_per_call"] > 0.5 * off["temp_pages"], off
    # With it, 2 MiB pages: under 10% of the 4 KiB count (measured ~1,100 per call against 32,768 pages)
    assert on["faults_per_call"] < 0.1 * on["temp_pages"], on


def test_huge_pages_plan():
    plan = host.huge_pages_plan
    what, env = plan({"PATH": "/bin"}, libc="glibc", mode="madvise")
    assert what == "re-executing" and env == {"PATH": "/bin", "GLIBC_TUNABLES": host.TUNABLE, host.REEXEC_MARK: "1"}
    # other tunables are kept, in order
    _, env = plan({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, libc="glibc", mode="madvise")
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:" + host.TUNABLE
    # nothing to do: already set (by us after the re-exec, or by the user, either value), turned off, not glibc,
    # or a THP mode where the tunable changes nothing
    for environ, libc, mode, starts in [({"GLIBC_TUNABLES": host.TUNABLE}, "glibc", "madvise", "set"),
                                        ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "glibc", "madvise", "set"),
                                        ({"LLAMA_HUGE_PAGES": "0"}, "glibc", "madvise", "off"),
                                        ({host.REEXEC_MARK: "1"}, "glibc", "madvise", "not kept"),
                                        ({}, "", "madvise", "unsupported"), ({}, "musl", "madvise", "unsupported"),
                                        ({}, "glibc", "always", "not needed"), ({}, "glibc", "never", "not needed"),
                                        ({}, "glibc", None, "not needed")]:
        what, env = plan(environ, libc=libc, mode=mode)
        assert env is None and what.startswith(starts), (environ, libc, mode, what)


def test_thp_mode_reads_the_bracketed_word(tmp_path):
    f = tmp_path / "enabled"
    f.write_text("always [madvise] never\n")
    assert host.thp_mode(str(f)) == "madvise"
    f.write_text("[always] madvise never\n")
    assert host.thp_mode(str(f)) == "always"
    assert host.thp_mode(str(tmp_path / "missing")) is None


def test_cpu_devices_plan():
    plan, flag = host.cpu_devices_plan, host.DEVICE_COUNT
    # one device per core, other XLA flags kept
    assert plan({}, cores=2) == ("2 CPU devices", f"{flag}=2")
    assert plan({"XLA_FLAGS": "--xla_cpu_use_thunk_runtime=true"}, cores=4)[1] == \
        f"--xla_cpu_use_thunk_runtime=true {flag}=4"
    # a count already set (by the user, or the tests' conftest) is kept; one core or LLAMA_CPU_DEVICES=1: one device
    what, flags = plan({"XLA_FLAGS": f"{flag}=8"}, cores=2)
    assert flags is None and what.startswith("set")
    assert plan({}, cores=1) == ("one device", None)
    assert plan({"LLAMA_CPU_DEVICES": "1"}, cores=16) == ("one device", None)
    assert plan({"LLAMA_CPU_DEVICES": "3"}, cores=2)[1] == f"{flag}=3"
    for bad in ("0", "two", "-2", ""):
        with pytest.raises(ValueError, match="LLAMA_CPU_DEVICES"):
            plan({"LLAMA_CPU_DEVICES": bad}, cores=2)
    env = {"LLAMA_CPU_DEVICES": "x"}
    with pytest.raises(SystemExit, match="error: LLAMA_CPU_DEVICES='x'"):
        host.split_cpu(env)
    env = {}
    assert host.split_cpu(env) in ("one device", f"{host.cpu_cores()} CPU devices")
    assert env.get("XLA_FLAGS", f"{flag}=1") == f"{flag}={host.cpu_cores()}"
