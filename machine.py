"""
What a run ran on and how its speed is timed: the code's commit, the machine in words (the CPU's
model, family and the instruction sets that decide its kernels, or the GPU's name), and the
round-robin timer that bench.py and dev/microbench.py share. A run records the first two with
its checkpoint; every speed figure names the machine it was measured on.
"""

import os
import platform
import statistics
import subprocess
import time

import torch


def code_commit():
    """The git commit of the code that runs, with '+changes' when the work tree differs from it;
    'unknown' outside a git checkout."""
    here = os.path.dirname(os.path.abspath(__file__))
    git = lambda *args: subprocess.run(["git", *args], cwd=here, capture_output=True, text=True, timeout=10)
    try:
        commit, dirty = git("rev-parse", "HEAD"), git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    if commit.returncode != 0:
        return "unknown"
    return commit.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def cpu_fields():
    """The first CPU's fields in /proc/cpuinfo ('model name', 'cpu family', 'flags', ...); {} where
    there is no such file (not Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            fields = dict(line.split(":", 1) for line in f.read().split("\n\n")[0].splitlines() if ":" in line)
    except OSError:
        return {}
    return {k.strip(): v.strip() for k, v in fields.items()}


def cpu_flags():
    return set(cpu_fields().get("flags", "").split())


def cpu_has_bf16():
    """Whether this CPU multiplies bfloat16 in hardware (AVX-512 BF16 or AMX; Linux's flags)."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def describe_device(device):
    """The device in words: a GPU's name, or the CPU's model, family and the instruction sets that
    decide its float32 and bfloat16 kernels (AVX2, AVX-512, AVX-512 BF16, AMX), and the threads."""
    if str(device).startswith("cuda"):
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    fields = cpu_fields()
    name, family, flags = fields.get("model name", platform.processor() or platform.machine()), fields.get("cpu family", ""), cpu_flags()
    have = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return (f"{name}" + (f" (family {family})" if family else "") + f", {' '.join(have) or 'no AVX2/AVX-512/AMX'}, "
            f"{torch.get_num_threads()} threads, torch {torch.__version__}")


def median_seconds(fn, repeats, device, warmup=1):
    """The median wall time of fn() over `repeats` runs after `warmup` untimed ones (a GPU is
    synchronised around each), and the result of the last run."""
    cuda = str(device).startswith("cuda")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def seconds_in_rounds(fns, rounds, device, calls=1, spread=False):
    """The median seconds per call of each of `fns` over `rounds` rounds, each round timing every
    fn `calls` times in turn: on a noisy machine a drift then slows them alike, and their ratios
    hold. With `spread`, each fn's (median, fastest, slowest) round."""
    times = [[] for _ in fns]
    for _ in range(rounds):
        for t, fn in zip(times, fns):
            t.append(median_seconds(lambda: [fn() for _ in range(calls)], 1, device, warmup=0)[0] / calls)
    return [(statistics.median(t), min(t), max(t)) if spread else statistics.median(t) for t in times]
