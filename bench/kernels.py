#!/usr/bin/env python3
"""Ternary kernel (``ccrl::ternary_linear``) against PyTorch's CPU matmuls, and the bandwidth floor.

For (out, in) in {(6912, 2560), (2560, 6912), (4096, 4096)} and batch in {1, 8, 64}, the median
time of: the packed 2-bit kernel, fp32 ``F.linear``, bf16 ``F.linear``, and ``torch._int_mm`` on
int8 copies of the same ternary weights; the speed-up over each; and the fraction of the
memory-bandwidth floor reached (2-bit weight bytes / DRAM read bandwidth measured in the same
run). Every timed call reads weights that are not in cache: each method rotates over enough
copies of its weights (>= --cold-mb in all) that every call streams them from DRAM.

Usage:
    python bench/kernels.py                       # 2 threads, ~3-5 min on a 2-core machine
    python bench/kernels.py --threads 1 --runs 50 --json out.json
    python bench/kernels.py --tl                  # + the lookup-table GEMV experiment (batch 1)
    python bench/kernels.py --quick               # one shape, fewer runs (smoke test)
    python bench/kernels.py --batches 64          # only batch 64
    python bench/kernels.py --group-size none --act-block none   # BitNet b1.58 scales (per tensor / per token)
    python bench/kernels.py --busy-core           # 1 vs 2 threads, GEMV 6912x2560, idle and with one core busy
    python bench/kernels.py --decode-loop         # 1 vs 2 threads, the kernels between torch ops (an MLP block)

``--busy-core`` times only the batch-1 6912x2560 call (weights hot in cache: the question is
scheduling, not bandwidth) at 1 and 2 threads, interleaved, over ``--trials`` trials of
``--runs`` calls, first on the machine as it is, then with a busy-loop process pinned to one
core (``os.sched_setaffinity``). A trial's figure is the median of its calls; the table gives
min / median / max over the trials, and the mean over all calls (a call that waits for a
descheduled thread shows there even when it is rare). Then, per trial, the ratio of the
2-thread to the 1-thread figure with one core busy, as min / median / max over the trials, and
whether its median is within BUSY_CORE_LIMIT (1.3): two threads on a machine with one core
busy must not be much slower than one thread.

``--decode-loop`` times what a decoding step does with the kernels: an MLP block (6912x2560
up-projection, silu, 2560x6912 down-projection, residual and layer norm) at batch 1 and 64, at 1
and 2 threads interleaved, median ms per block over ``--trials`` trials of ``--runs`` blocks. At
batch 64 torch's silu and layer norm run on torch's intra-op threads between the kernel calls, so
the kernels' threads and torch's meet there.

``torch._int_mm`` on CPU is oneDNN's int8 GEMM where the CPU has VNNI or AMX; it uses AMX tiles
when the CPU has them (Sapphire Rapids and later). ``ONEDNN_MAX_CPU_ISA=AVX512_CORE_VNNI`` caps
oneDNN at AVX-512 VNNI, which makes ``_int_mm`` what it is on a VNNI CPU without AMX (Ice Lake,
Cascade Lake, Zen 4); the run prints the cap it ran under.

On a shared machine the numbers move between runs (and other processes on the same cores make
2-thread timings jump): run it more than once and compare medians.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

# Run as a script, this file's folder is sys.path[0] and the file would shadow the `kernels`
# package that transformers imports when it is installed: drop the folder (nothing here needs it).
if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
    del sys.path[0]

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from policies import packed as P  # noqa: E402
from policies.ternary import expand_scale  # noqa: E402

SHAPES = [(6912, 2560), (2560, 6912), (4096, 4096)]   # (out N, in K)
BUSY_CORE_LIMIT = 1.3   # --busy-core: the most the median (2 threads, one core busy) / (1 thread) may be
BATCHES = [1, 8, 64]
GiB = 1024**3
FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8")


def cpu_info() -> dict:
    info = {"model": platform.processor() or "?", "flags": {}}
    try:
        with open("/proc/cpuinfo") as fh:
            text = fh.read()
        for line in text.splitlines():
            if line.startswith("model name"):
                info["model"] = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                info["flags"] = {f: f in have for f in FLAGS}
                break
    except OSError:
        pass
    return info


def timed(fn, runs: int, budget_s: float) -> tuple[float, float, int]:
    """(median, min, n) seconds per call; fewer runs when one call is slow (at least 3)."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    fn()
    n = max(3, min(runs, int(budget_s / max(first, 1e-6))))
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), min(ts), n


def rotating(fn, items):
    state = {"i": 0}

    def call():
        state["i"] = (state["i"] + 1) % len(items)
        return fn(items[state["i"]])

    return call


def copies_for(nbytes: int, cold_mb: int) -> int:
    return max(2, -(-cold_mb * 2**20 // max(nbytes, 1)))


def dram_read_bandwidth(seconds: float) -> dict:
    """GB/s of summing a 1 GiB float32 tensor, sampled for ``seconds`` (p10/p50/p90)."""
    x = torch.ones(GiB // 4)
    x.sum()
    samples = []
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end or len(samples) < 5:
        t0 = time.perf_counter()
        x.sum()
        samples.append(GiB / (time.perf_counter() - t0) / 1e9)
    samples.sort()
    q = lambda p: samples[min(len(samples) - 1, int(p * len(samples)))]
    return {"p10": q(0.1), "p50": q(0.5), "p90": q(0.9), "n": len(samples)}


def ternary_weight(n: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g)


def _time_batch(m, n, k, packed, codes, f32, bf16, i8, args) -> dict:
    """Median ms of every method at batch m (each rotating over its cold weight copies)."""
    g = torch.Generator().manual_seed(m)
    x = torch.randn(m, k, generator=g)
    xb = x.to(torch.bfloat16)
    xi = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=g)
    op = torch.ops.ccrl.ternary_linear.default
    gs, ab = packed.group_size, packed.act_block_size
    r = {"N": n, "K": k, "M": m}
    with torch.inference_mode():
        r["kernel_ms"], r["kernel_min_ms"], _ = timed(
            rotating(lambda c: op(x, c, packed.scale, None, k, gs, ab), codes), args.runs, args.budget)
        r["kernel_hot_ms"], _, _ = timed(lambda: op(x, packed.codes, packed.scale, None, k, gs, ab),
                                         args.runs, args.budget)
        r["fp32_ms"], _, r["fp32_n"] = timed(rotating(lambda ww: F.linear(x, ww), f32), args.runs, args.budget)
        r["bf16_ms"], _, r["bf16_n"] = timed(rotating(lambda ww: F.linear(xb, ww), bf16), args.runs, args.budget)
        r["int_mm_ms"], _, r["int_mm_n"] = timed(rotating(lambda ww: torch._int_mm(xi, ww.t()), i8),
                                                 args.runs, args.budget)
    for key in ("kernel_ms", "kernel_min_ms", "kernel_hot_ms", "fp32_ms", "bf16_ms", "int_mm_ms"):
        r[key] *= 1e3
    return r


def bench_shape(n, k, batches, args, bw_gbps) -> list[dict]:
    w = ternary_weight(n, k)
    packed = P.pack_ternary(w, args.group_size, args.act_block)
    q, scale = P.unpack_ternary(packed)
    w_deq = (q.float() * expand_scale(scale, k, args.group_size)).contiguous()    # the same ternary weights
    wt8 = q.contiguous()                                                             # int8 [N, K]
    kbytes = packed.nbytes()
    rows = []
    codes = [packed.codes.clone() for _ in range(copies_for(packed.codes.numel(), args.cold_mb))]
    f32 = [w_deq.clone() for _ in range(copies_for(w_deq.numel() * 4, args.cold_mb))]
    bf16 = [w_deq.to(torch.bfloat16) for _ in range(copies_for(w_deq.numel() * 2, args.cold_mb))]
    i8 = [wt8.clone() for _ in range(copies_for(wt8.numel(), args.cold_mb))]
    for m in batches:
        r = _time_batch(m, n, k, packed, codes, f32, bf16, i8, args)
        r["floor_ms"] = kbytes / (bw_gbps * 1e9) * 1e3
        r["floor_fraction"] = r["floor_ms"] / r["kernel_ms"]
        r["x_fp32"] = r["fp32_ms"] / r["kernel_ms"]
        r["x_bf16"] = r["bf16_ms"] / r["kernel_ms"]
        r["x_int_mm"] = r["int_mm_ms"] / r["kernel_ms"]
        r["kernel_GMACs"] = n * k * m / (r["kernel_ms"] * 1e-3) / 1e9
        rows.append(r)
        print(
            f"| {n}x{k} | {m} | {r['kernel_ms']:.3f} | {r['kernel_hot_ms']:.3f} | {r['fp32_ms']:.3f} | "
            f"{r['bf16_ms']:.3f} | {r['int_mm_ms']:.3f} | {r['x_fp32']:.1f}x | {r['x_bf16']:.1f}x | "
            f"{r['x_int_mm']:.1f}x | {r['floor_ms']:.3f} | {r['floor_fraction']:.2f} |",
            flush=True,
        )
    return rows


def _time_tl(n, k, args) -> dict:
    op = torch.ops.ccrl.ternary_linear.default
    tl_op = torch.ops.ccrl._ternary_tl_linear.default
    packed = P.pack_ternary(ternary_weight(n, k))
    tl = torch.ops.ccrl._ternary_tl_pack(packed.codes, k, 128, 64)
    x = torch.randn(1, k)
    assert torch.equal(op(x, packed.codes, packed.scale, None, k, 128, 64), tl_op(x, tl, packed.scale, n, k, 128, 64))
    codes = [packed.codes.clone() for _ in range(copies_for(packed.codes.numel(), args.cold_mb))]
    tls = [tl.clone() for _ in range(len(codes))]
    r = {"N": n, "K": k}
    with torch.inference_mode():
        r["dot_hot"], _, _ = timed(lambda: op(x, packed.codes, packed.scale, None, k, 128, 64), args.runs, 5)
        r["tl_hot"], _, _ = timed(lambda: tl_op(x, tl, packed.scale, n, k, 128, 64), args.runs, 5)
        r["dot_cold"], _, _ = timed(rotating(lambda c: op(x, c, packed.scale, None, k, 128, 64), codes), args.runs, 5)
        r["tl_cold"], _, _ = timed(rotating(lambda c: tl_op(x, c, packed.scale, n, k, 128, 64), tls), args.runs, 5)
    for key in ("dot_hot", "tl_hot", "dot_cold", "tl_cold"):
        r[key] *= 1e3
    return r


def bench_tl(shapes, args) -> list[dict]:
    """Batch-1 GEMV: the dot-product kernel against the lookup-table experiment, hot and cold."""
    rows = []
    for n, k in shapes:
        rows.append(_time_tl(n, k, args))
        r = rows[-1]
        print(f"| {n}x{k} | {r['dot_hot']:.3f} | {r['dot_cold']:.3f} | {r['tl_hot']:.3f} | {r['tl_cold']:.3f} |",
              flush=True)
    return rows


def bench_overhead() -> dict:
    """Per-call cost of a tiny layer (16 x 64, batch 1): the work is negligible, the rest is the call."""
    w = torch.randn(16, 64)
    packed = P.pack_ternary(w)
    x = torch.randn(1, 64)
    layer = P.PackedBitLinear(64, 16)
    layer.packed_weight.copy_(packed.codes)
    layer.weight_scale.copy_(packed.scale)
    lin = torch.nn.Linear(64, 16, bias=False)
    op = torch.ops.ccrl.ternary_linear.default

    def per_call_us(fn, n=20000):
        for _ in range(1000):
            fn()
        ts = []
        for _ in range(5):
            t0 = time.perf_counter_ns()
            for _ in range(n):
                fn()
            ts.append((time.perf_counter_ns() - t0) / n / 1e3)
        return statistics.median(ts)

    out = {}
    with torch.inference_mode():
        out["ccrl::ternary_linear (op overload)"] = per_call_us(lambda: op(x, packed.codes, packed.scale, None, 64, 128, 64))
        if P._FAST is not None:
            out["policies._ternary.linear (no dispatcher)"] = per_call_us(
                lambda: P._FAST(x, packed.codes, packed.scale, None, 64, 128, 64))
        out["policies.packed.ternary_linear"] = per_call_us(lambda: P.ternary_linear(x, packed))
        out["PackedBitLinear module"] = per_call_us(lambda: layer(x))
        out["F.linear fp32 (same shape)"] = per_call_us(lambda: F.linear(x, w))
        out["nn.Linear module (same shape)"] = per_call_us(lambda: lin(x))
    return out


# spins on one core until its parent is gone (it runs in a session of its own, which a Ctrl-C or
# a killed parent would not reach)
_BUSY_LOOP = ("import os, sys\nos.sched_setaffinity(0, {int(sys.argv[1])})\nparent = os.getppid()\n"
              "while os.getppid() == parent:\n    for _ in range(1000000):\n        pass\n")


def start_busy_core() -> tuple[subprocess.Popen, int]:
    """A child process spinning on one core (the last this process may use); stop it with .kill()."""
    cpu = max(os.sched_getaffinity(0))
    # its own session, as another program's: where the kernel groups processes by session for
    # fair scheduling (autogroup), a child of this process would only share this process's slice
    proc = subprocess.Popen([sys.executable, "-c", _BUSY_LOOP, str(cpu)], start_new_session=True)
    time.sleep(0.3)                                  # let it start and settle on its core
    if proc.poll() is not None:
        raise SystemExit("bench/kernels.py: the busy-loop process exited at once")
    return proc, cpu


def _gemv_trials(call, threads: list[int], trials: int, runs: int) -> dict[int, list[list[float]]]:
    """Per thread count and trial, the ms of each of ``runs`` calls; the thread counts alternate
    within each trial (the order flips from trial to trial so neither always runs first)."""
    out: dict[int, list[list[float]]] = {t: [] for t in threads}
    for i in range(trials):
        for t in (threads if i % 2 == 0 else threads[::-1]):
            torch.set_num_threads(t)
            for _ in range(3):
                call()
            ts = []
            for _ in range(runs):
                t0 = time.perf_counter()
                call()
                ts.append((time.perf_counter() - t0) * 1e3)
            out[t].append(ts)
    return out


def busy_core_ratios(per: dict[int, list[list[float]]]) -> list[float]:
    """Per trial, the median 2-thread call over the median 1-thread call."""
    return [statistics.median(b) / statistics.median(a) for a, b in zip(per[1], per[2])]


def bench_busy_core(args) -> dict:
    """GEMV 6912x2560 (batch 1) at 1 and 2 threads, idle and with one core spinning."""
    n, k = SHAPES[0]
    packed = P.pack_ternary(ternary_weight(n, k), args.group_size, args.act_block)
    x = torch.randn(1, k)
    op = torch.ops.ccrl.ternary_linear.default
    gs, ab = packed.group_size, packed.act_block_size

    def call():
        op(x, packed.codes, packed.scale, None, k, gs, ab)

    threads = [1, 2]
    result = {"N": n, "K": k, "trials": args.trials, "runs": args.runs, "limit": BUSY_CORE_LIMIT}
    print(f"\nGEMV {n}x{k}, batch 1, weights hot; per trial the median of {args.runs} calls, "
          f"{args.trials} trials, 1 and 2 threads interleaved\n")
    print("| condition | threads | min ms | median ms | max ms | mean ms (all calls) |")
    print("|---|---|---|---|---|---|")
    with torch.inference_mode():
        for condition in ("idle", "one core busy"):
            busy = start_busy_core() if condition != "idle" else None
            try:
                per = _gemv_trials(call, threads, args.trials, args.runs)
            finally:
                if busy is not None:
                    busy[0].kill()
                    busy[0].wait()
            name = condition if busy is None else f"{condition} (cpu {busy[1]})"
            result[condition] = {"ms": {str(t): [statistics.median(ts) for ts in per[t]] for t in threads},
                                 "mean_ms": {str(t): statistics.fmean(sum(per[t], [])) for t in threads},
                                 "ratio_2_over_1": busy_core_ratios(per)}
            for t in threads:
                ms = result[condition]["ms"][str(t)]
                print(f"| {name} | {t} | {min(ms):.3f} | {statistics.median(ms):.3f} | {max(ms):.3f} | "
                      f"{result[condition]['mean_ms'][str(t)]:.3f} |", flush=True)
    ratios = result["one core busy"]["ratio_2_over_1"]
    med = statistics.median(ratios)
    result["busy_ratio"] = {"min": min(ratios), "median": med, "max": max(ratios), "pass": med <= BUSY_CORE_LIMIT}
    print(f"\nwith one core busy, 2 threads / 1 thread per trial: min {min(ratios):.2f}, median {med:.2f}, "
          f"max {max(ratios):.2f}: {'PASS' if med <= BUSY_CORE_LIMIT else 'FAIL'} (median <= {BUSY_CORE_LIMIT})",
          flush=True)
    torch.set_num_threads(args.threads)
    return result


def bench_decode_loop(args) -> dict:
    """An MLP block (up, silu, down, residual + layer norm) at batch 1 and 64, 1 and 2 threads."""
    (n, k), (n2, k2) = SHAPES[0], SHAPES[1]
    up = P.pack_ternary(ternary_weight(n, k), args.group_size, args.act_block)
    down = P.pack_ternary(ternary_weight(n2, k2, seed=1), args.group_size, args.act_block)
    op = torch.ops.ccrl.ternary_linear.default
    threads = [1, 2]
    result = {"trials": args.trials, "runs": args.runs}
    print(f"\nMLP block {k}->{n}, silu, {k2}->{n2}, residual + layer norm; per trial the median of {args.runs} "
          f"blocks, {args.trials} trials, 1 and 2 threads interleaved\n")
    print("| batch | threads | min ms | median ms | max ms | mean ms (all blocks) |")
    print("|---|---|---|---|---|---|")
    with torch.inference_mode():
        for m in (1, 64):
            x = torch.randn(m, k)

            def block(x=x):
                h = F.silu(op(x, up.codes, up.scale, None, k, up.group_size, up.act_block_size))
                o = op(h, down.codes, down.scale, None, k2, down.group_size, down.act_block_size)
                return F.layer_norm(o + x, (k,))

            per = _gemv_trials(block, threads, args.trials, args.runs)
            result[str(m)] = {str(t): [statistics.median(ts) for ts in per[t]] for t in threads}
            for t in threads:
                ms = result[str(m)][str(t)]
                print(f"| {m} | {t} | {min(ms):.3f} | {statistics.median(ms):.3f} | {max(ms):.3f} | "
                      f"{statistics.fmean(sum(per[t], [])):.3f} |", flush=True)
    torch.set_num_threads(args.threads)
    return result


def _size(text: str) -> int | None:
    """A block size argument: a positive integer, or 'none' (one scale per tensor / per token)."""
    if text.lower() == "none":
        return None
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'none', got {text!r}")
    return value


def _per(size: int | None, whole: str) -> str:
    return f"per {whole}" if size is None else f"per group of {size} along in-features"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=30, help="timed calls per case (fewer for slow cases)")
    ap.add_argument("--budget", type=float, default=3.0, help="seconds per case before runs are cut (min 3 runs)")
    ap.add_argument("--cold-mb", type=int, default=512, help="MB of weight copies each method rotates over")
    ap.add_argument("--bw-seconds", type=float, default=8.0, help="seconds of DRAM-bandwidth sampling")
    ap.add_argument("--tl", action="store_true", help="also time the lookup-table GEMV experiment")
    ap.add_argument("--no-overhead", action="store_true", help="skip the per-call overhead measurement")
    ap.add_argument("--quick", action="store_true", help="one shape, fewer runs")
    ap.add_argument("--batches", default=",".join(map(str, BATCHES)), help="comma-separated batch sizes")
    ap.add_argument("--group-size", type=_size, default=128,
                    help="kernel weight-scale group along in-features, or 'none' for one scale per tensor")
    ap.add_argument("--act-block", type=_size, default=64,
                    help="kernel activation block along in-features, or 'none' for one scale per token")
    ap.add_argument("--busy-core", action="store_true",
                    help="only time the 6912x2560 GEMV at 1 and 2 threads, idle and with one core busy")
    ap.add_argument("--decode-loop", action="store_true",
                    help="only time an MLP block (kernels between torch ops) at 1 and 2 threads, batch 1 and 64")
    ap.add_argument("--trials", type=int, default=9, help="trials per condition with --busy-core / --decode-loop")
    ap.add_argument("--json", default=None, help="write all results here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    shapes = SHAPES[:1] if args.quick else SHAPES
    if args.quick:
        args.runs, args.bw_seconds, args.cold_mb = 10, 3.0, 256

    if not P.extension_available():
        raise SystemExit("bench/kernels.py: the C++ kernels are not built (pip install -e .)")
    meta = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "kernel_isa": P.kernel_isa(),
        "available_isas": P.available_isas(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu": cpu_info(),
        "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA", "(not set: oneDNN picks the best, AMX included)"),
        "settings": {k: v for k, v in vars(args).items() if k != "json"},
        "weights": f"ternary, weight scale {_per(args.group_size, 'tensor')}; activations int8 with a "
                   f"scale {_per(args.act_block, 'token')} (kernel); fp32 / bf16 F.linear on the dequantised "
                   "weights; _int_mm on int8 {-1,0,1} copies with random int8 activations",
    }
    print(json.dumps(meta, indent=1))

    if args.decode_loop:
        loop = bench_decode_loop(args)
        if args.json:
            with open(args.json, "w") as fh:
                json.dump({"meta": meta, "decode_loop": loop}, fh, indent=1)
        return

    if args.busy_core:
        busy = bench_busy_core(args)
        if args.json:
            with open(args.json, "w") as fh:
                json.dump({"meta": meta, "busy_core": busy}, fh, indent=1)
        return

    bw = dram_read_bandwidth(args.bw_seconds)
    print(f"\nDRAM read bandwidth (1 GiB fp32 sum, {bw['n']} samples): "
          f"p10 {bw['p10']:.1f}  p50 {bw['p50']:.1f}  p90 {bw['p90']:.1f} GB/s; floor uses p50")

    print("\nmedian ms per call, weights streamed from DRAM (kernel hot: same weights every call)\n")
    print("| out x in | batch | kernel | kernel hot | fp32 | bf16 | _int_mm | vs fp32 | vs bf16 | vs _int_mm "
          "| 2-bit floor | floor / kernel |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for n, k in shapes:
        rows += bench_shape(n, k, [int(b) for b in args.batches.split(",")], args, bw["p50"])

    tl_rows = None
    if args.tl:
        print("\nbatch-1 GEMV, dot product vs lookup table (ms)\n")
        print("| out x in | dot hot | dot cold | table hot | table cold |")
        print("|---|---|---|---|---|")
        tl_rows = bench_tl(shapes, args)

    overhead = None
    if not args.no_overhead:
        overhead = bench_overhead()
        print("\nper-call overhead, 16x64 layer, batch 1 (us, inference_mode)")
        for key, val in overhead.items():
            print(f"  {key:40s} {val:6.2f}")

    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"meta": meta, "bandwidth": bw, "rows": rows, "tl": tl_rows, "overhead": overhead}, fh, indent=1)


if __name__ == "__main__":
    main()
