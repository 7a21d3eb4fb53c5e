"""The rollout engine's decode step against its physical floor: the memory a step must read.

One decode step at R rows and context L must read every weight once (of the input embedding only
the R rows it looks up; a tied embedding is read whole by the output head) and every row's
keys and values up to L. At a memory bandwidth B no implementation can take less than

    floor = (weight bytes + KV-cache bytes) / B

so step / floor says how far the engine is from the hardware. The script builds a Llama of
``--model`` and the size options (``bench.common``, random init) with a ``--vocab`` output head,
prefills R rows of L random tokens (``--rows``, ``--context``) and times the engine's decode step
as RL rollouts run it: ``ccrl.rollout.decode_graph.StaticDecode`` (sample the next token of every
row from the tempered distribution, record its log-prob and entropy, feed it through the policy
into the static KV cache; grouped-query attention on the cache as it is, ``ccrl.rollout.attention``),
on CUDA one captured CUDA graph of it replayed per token
(``capture_step``, as ``cuda_graph: auto`` decodes), on CPU the same step run eagerly. The two
halves are also timed alone: ``feed`` (the policy's forward on one token per row) and ``sample``
(sampling and recording on the (R, V) logits: several float32 passes over R × V, which a large
vocabulary makes visible). Where the engine's attention runs the Triton decode kernel
(``ccrl.rollout.decode_kernel``: CUDA, bf16 weights, Triton installed) the step and the feed are
timed again with ``decode_kernel: sdpa`` in the same run (rows ``step (sdpa)``, ``feed (sdpa)``;
``--no-sdpa`` skips them).

B is measured in the same run by copying a ``--bandwidth-bytes`` buffer on the device (read + write
bytes over the time; on CPU a ``memcpy`` of the same size), or given with ``--bandwidth-gbs``; the
nominal bandwidth of the GPUs the script knows (NVIDIA datasheets) is printed beside it, and the
floor at both. Weight bytes are counted as stored (``--dtype``): ``bf16`` weights (2 bytes a
parameter), ``fp32`` weights, or ``autocast`` (fp32 weights under bf16 autocast, the RL trainer's
``mixed_precision: bf16`` with float32 weights; the engine casts each linear weight to bf16 once
per rollout, ``ccrl.rollout.precision``, and the floor counts the float32 weights once). KV bytes are those of the context L at the middle of the
timed steps; the static cache the graph attends over spans the prompt plus every decoded column,
which is also printed. ``--compile`` adds a row with the policy's forward compiled by
``torch.compile`` (``--compile-mode``) and then captured in the same CUDA graph, to compare kernel
fusion against the hand-made graph alone (the Triton decode attention is compiled as the opaque
custom op ``ccrl::decode_attention``; BENCHMARKS.md says what has been measured with it).

Run (CPU smoke):  python bench/decode_floor.py --device cpu --model llama --hidden 64 --layers 2 --heads 2
                                             --intermediate 128 --vocab 1000 --rows 4 --context 32 --steps 4
GPU:              python bench/decode_floor.py --device cuda --dtype bf16 --model llama-0.5b --vocab 151936
                                             --rows 128 --context 1024 [--compile]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch  # noqa: E402

from bench.common import (  # noqa: E402
    LLAMA_BASE,
    LLAMA_PRESETS,
    TINY_LLAMA,
    add_size_options,
    environment_lines,
    llama_config,
    table,
)

MODELS = {"tiny-llama": TINY_LLAMA, "llama-base": LLAMA_BASE, "llama": TINY_LLAMA, **LLAMA_PRESETS}
"""--model → the Llama config the size options start from (``llama``: the tiny Llama's)"""

NOMINAL_GBS = (("H200", 4800.0), ("H100 NVL", 3900.0), ("H100 PCIe", 2000.0), ("H100", 3350.0),
               ("A100-SXM4-80GB", 2039.0), ("A100 80GB PCIe", 1935.0), ("A100", 1555.0))
"""device-name substring → HBM bandwidth in GB/s from NVIDIA's datasheets (first match wins; plain
"H100" is the SXM5 80 GB part, whose name is "NVIDIA H100 80GB HBM3")"""


def nominal_bandwidth(device: torch.device) -> tuple[str, float | None]:
    """(device name, its datasheet bandwidth in GB/s or None when unknown)."""
    if device.type != "cuda":
        from bench.common import cpu_name

        return cpu_name(), None
    name = torch.cuda.get_device_name(device)
    return name, next((gbs for key, gbs in NOMINAL_GBS if key in name), None)


def measure_bandwidth(device: torch.device, nbytes: int, repeats: int = 10) -> float:
    """GB/s of copying an ``nbytes`` buffer on ``device``: (read + write bytes) / time, the median of
    ``repeats`` copies after one warm-up."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        times.append(_timed(lambda: dst.copy_(src), device, 1))
    return 2 * nbytes / statistics.median(times) / 1e9


def _timed(fn, device: torch.device, n: int) -> float:
    """Seconds per call of ``fn`` over ``n`` calls (CUDA events on a GPU, the wall clock on CPU)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        for _ in range(n):
            fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1e3 / n
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def build_model(args, device: torch.device):
    """The randomly initialised Llama of ``--model`` and the size options, ``--vocab`` wide, in ``--dtype``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from ccrl.models import cast_parameters

    cfg = llama_config(MODELS[args.model], args, args.context + capacity(args) + 64)
    hf = dict(cfg)
    config = AutoConfig.for_model(hf.pop("model_type"), vocab_size=args.vocab, pad_token_id=0, bos_token_id=1,
                                  eos_token_id=2, **hf)
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(config).eval().requires_grad_(False)
    cast_parameters(model, torch.bfloat16 if args.dtype == "bf16" else torch.float32)
    return model.to(device), cfg


COMPILE_WARMUP = 3
"""eager calls of a part with the compiled forward before its capture: compiling, and the kernel
benchmarks of ``max-autotune``, must happen outside the capture"""


def capacity(args) -> int:
    """Columns one prefilled batch decodes: the warm-up and capture of the step and of the feed (which
    move the cache on), their timed calls, and a margin."""
    return 2 * (args.warmup + 2 + COMPILE_WARMUP + args.steps * args.repeats) + 8


def weight_bytes(model, rows: int, linear_dtype: torch.dtype | None = None) -> int:
    """Bytes of weights one decode step reads: every parameter once, except an untied input embedding,
    of which only the ``rows`` looked-up rows. ``linear_dtype``: the step runs under autocast to it,
    so the float32 weights of plain ``nn.Linear`` layers (a tied output head too) are read as the
    copies the engine casts once per rollout (``ccrl.rollout.precision``)."""
    emb = model.get_input_embeddings().weight
    linear = {id(m.weight) for m in model.modules() if type(m) is torch.nn.Linear}
    linear |= {id(m.bias) for m in model.modules() if type(m) is torch.nn.Linear and m.bias is not None}

    def size(p) -> int:
        cast = linear_dtype is not None and id(p) in linear and p.dtype == torch.float32
        return linear_dtype.itemsize if cast else p.element_size()

    total = sum(p.numel() * size(p) for p in model.parameters())
    if id(emb) in linear:                                    # tied: the head reads the whole matrix
        return total
    return total - emb.numel() * size(emb) + rows * emb.shape[1] * emb.element_size()


class Decode:
    """A prefilled batch and its static decoding (the engine's ``StaticDecode``), ready to step."""

    def __init__(self, model, args, device: torch.device):
        from ccrl.rollout import RolloutCache, SamplingConfig
        from ccrl.rollout.attention import casts_keys_under_autocast
        from ccrl.rollout.decode_graph import StaticDecode
        from policies.hf_compat import cache_kwargs

        g = torch.Generator(device="cpu").manual_seed(args.seed)
        ids = torch.randint(3, args.vocab, (args.rows, args.context), generator=g).to(device)   # (R, L)
        mask = torch.ones_like(ids)
        pos = torch.arange(args.context, device=device).expand(args.rows, -1)
        sampling = SamplingConfig(max_new_tokens=capacity(args), temperature=1.0, cuda_graph="static")
        cache = RolloutCache(extra=sampling.max_new_tokens, store_autocast=casts_keys_under_autocast(model))
        with self.precision(args, device):
            out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1,
                        **cache_kwargs(cache))
        self.generator = torch.Generator(device=device).manual_seed(args.seed)
        # EOS -1: no row ever finishes, every step decodes all R rows
        self.dec = StaticDecode(model, out, cache, ids, mask, sampling, -1, 0, 1, self.generator, False, device)
        self.cache, self.args, self.device = cache, args, device
        self.columns = 0                                     # columns decoded so far (warm-ups included)

    @staticmethod
    def precision(args, device: torch.device):
        """bf16 autocast for ``--dtype autocast``, else nothing."""
        import contextlib

        if args.dtype != "autocast":
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=torch.bfloat16)

    def callable(self, part: str, eager_first: int = 0):
        """A function running one ``part`` (``step``, ``feed`` or ``sample``) of the decode step: a replay
        of its captured CUDA graph on a GPU (the first call of the part runs eagerly as the capture's
        warm-up), the eager call on CPU; ``eager_first`` eager calls come before either."""
        fn = getattr(self.dec, part)
        advances = part != "sample"
        for _ in range(eager_first):
            with self.precision(self.args, self.device):
                fn()
            self.columns += advances
        if self.device.type != "cuda":
            def eager():
                with self.precision(self.args, self.device):
                    fn()
                self.columns += advances
            return eager
        from ccrl.rollout.decode_graph import capture_step

        with self.precision(self.args, self.device):
            graph = capture_step(fn, self.generator, self.device)   # runs fn once eagerly, then records it
        self.columns += advances                                   # (a capture records kernels, runs none)

        def replay():
            graph.replay()
            self.columns += advances
        return replay

    def kv_bytes_per_position(self) -> int:
        """Bytes of keys and values of one position, summed over the layers and the R rows."""
        total = 0
        for layer in self.cache.layers:
            k, v = layer.keys, layer.values                                     # (R, heads, positions, dim)
            total += (k[:, :, 0].numel() * k.element_size() + v[:, :, 0].numel() * v.element_size())
        return total


def time_part(decode: Decode, part: str, args, eager_first: int = 0) -> list[float]:
    """Seconds per call of ``part``, ``--repeats`` timings of ``--steps`` calls each after ``--warmup`` calls."""
    fn = decode.callable(part, eager_first)
    for _ in range(args.warmup):
        fn()
    return [_timed(fn, decode.device, args.steps) for _ in range(args.repeats)]


def run(model, args, device: torch.device, forward=None, kernel: str = "auto") -> tuple[list[list], dict]:
    """Timings of the step and its two halves on one prefilled batch; returns the rows and the sizes.
    ``forward`` replaces the policy's forward for the decode steps (not the prefill); ``kernel`` is
    the engine's ``decode_kernel`` (``auto``: the Triton decode attention where it runs; ``sdpa``);
    the rows of ``sdpa`` are labelled so when the kernel runs at ``auto``."""
    from ccrl.rollout.attention import kernel_wanted, rollout_attention
    from ccrl.rollout.engine import varying_shape_attention
    from ccrl.rollout.precision import cast_linear_weights_once

    suffix = " (sdpa)" if kernel == "sdpa" and kernel_wanted(model, "auto") else ""
    rows, info = [], {}
    with torch.no_grad(), varying_shape_attention(device), rollout_attention(model, kernel), \
            cast_linear_weights_once(model):
        decode = Decode(model, args, device)
        if forward is not None:
            model.forward = forward
        info["kv_per_position"] = decode.kv_bytes_per_position()
        first = COMPILE_WARMUP if forward is not None else 0
        step = time_part(decode, "step", args, first)
        info["context"] = args.context + decode.columns - args.steps * args.repeats / 2   # the timed steps' middle
        rows.append(("step" + suffix, step))
        rows.append(("feed" + suffix, time_part(decode, "feed", args, first)))
        if not suffix:
            rows.append(("sample", time_part(decode, "sample", args)))
        info["attended"] = args.context + capacity(args)                      # the static cache's length
    return rows, info


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__[__doc__.index("Run (CPU"):],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", choices=list(MODELS), default="llama-0.5b",
                   help="the Llama whose sizes the size options change (bench.common.LLAMA_PRESETS, ...)")
    add_size_options(p)
    p.add_argument("--rows", type=int, default=128, help="R: rows decoded together (prompts x G of a rollout)")
    p.add_argument("--context", type=int, default=1024, help="L: prompt tokens per row before the timed steps")
    p.add_argument("--dtype", choices=["bf16", "fp32", "autocast"], default="bf16",
                   help="bf16 weights; fp32 weights; or fp32 weights under bf16 autocast")
    p.add_argument("--steps", type=int, default=64, help="decode steps per timing")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps before the timings of each part")
    p.add_argument("--repeats", type=int, default=3, help="timings per part (min / median / max)")
    p.add_argument("--bandwidth-gbs", type=float, default=None,
                   help="memory bandwidth for the floor in GB/s (default: measured here by a device copy)")
    p.add_argument("--bandwidth-bytes", type=int, default=None,
                   help="bytes of the copy that measures it (default 2 GiB on CUDA, 256 MiB on CPU)")
    p.add_argument("--no-sdpa", dest="sdpa_too", action="store_false",
                   help="where the Triton decode attention runs (CUDA, bf16), do not also time the step with SDPA")
    p.add_argument("--compile", action="store_true",
                   help="also time the step with the policy's forward compiled by torch.compile, inside the graph")
    p.add_argument("--compile-mode", default="max-autotune-no-cudagraphs",
                   help="torch.compile mode of --compile (its own CUDA graphs stay off: the engine captures)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (CPU)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.vocab is None:
        args.vocab = 32000
    if min(args.rows, args.context, args.steps, args.repeats) < 1 or args.warmup < 0:
        p.error("--rows, --context, --steps and --repeats must be >= 1, --warmup >= 0")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    if args.bandwidth_bytes is None:
        args.bandwidth_bytes = 2 * 2**30 if device.type == "cuda" else 256 * 2**20
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()

    print("# Decode step vs its floor: (weight bytes + KV-cache bytes) / memory bandwidth")
    for line in environment_lines(args.threads, args.device):
        print(line)
    from ccrl.rollout.attention import kernel_wanted

    model, cfg = build_model(args, device)
    params = sum(p.numel() for p in model.parameters())
    name, nominal = nominal_bandwidth(device)
    measured = measure_bandwidth(device, args.bandwidth_bytes)
    bandwidth = args.bandwidth_gbs or measured
    rows, info = run(model, args, device)
    if args.sdpa_too and kernel_wanted(model, "auto"):
        rows += run(model, args, device, kernel="sdpa")[0]
    if args.compile:
        rows += compiled_rows(model, args, device)
    w = weight_bytes(model, args.rows, torch.bfloat16 if args.dtype == "autocast" else None)
    kv = info["kv_per_position"] * info["context"]
    floor = (w + kv) / (bandwidth * 1e9)
    floor_nominal = (w + kv) / (nominal * 1e9) if nominal else None
    print(f"settings: Llama {cfg} ({params / 1e6:.1f}M parameters, vocabulary {args.vocab}), "
          f"{args.dtype} {'weights' if args.dtype != 'autocast' else '(fp32 weights, bf16 autocast)'}, R={args.rows} "
          f"rows, context L={args.context} + the columns decoded before the timed steps, temperature 1, "
          f"{args.warmup} warm-up + {args.repeats} x {args.steps} timed steps per part, "
          f"{'CUDA graph replays' if device.type == 'cuda' else 'eager steps'}, seed {args.seed}")
    print(f"bytes per step: weights {w / 1e6:.1f} MB, KV cache {kv / 1e6:.1f} MB at the timed steps' middle "
          f"context {info['context']:.0f} (the static cache attends over {info['attended']} positions: "
          f"{info['kv_per_position'] * info['attended'] / 1e6:.1f} MB)")
    print(f"bandwidth: measured {measured:.0f} GB/s (copy of {args.bandwidth_bytes / 2**30:.2f} GiB, read + write)"
          f"{f', given {args.bandwidth_gbs:.0f} GB/s (used)' if args.bandwidth_gbs else ' (used)'}; nominal "
          f"{f'{nominal:.0f} GB/s' if nominal else 'unknown'} ({name})")
    print(f"floor: {floor * 1e3:.3f} ms per step at {bandwidth:.0f} GB/s"
          + (f", {floor_nominal * 1e3:.3f} ms at the nominal {nominal:.0f} GB/s" if floor_nominal else ""))
    print()
    out = []
    for label, times in rows:
        med = statistics.median(times)
        row = [label, med * 1e3, min(times) * 1e3, max(times) * 1e3, args.rows / med]
        row += [med / floor, med / floor_nominal if floor_nominal else ""] if label.startswith(("step", "compiled step")) \
            else ["", ""]
        out.append(row)
    print(table(["part", "median ms/step", "min", "max", "tokens/s (R / step)", "step / floor (measured bw)",
                 "step / floor (nominal bw)"], out))
    print("\nstep = sample the next token of every row and record it, then feed it through the policy (the "
          "engine's decode step); feed and sample are its two halves timed alone. The floor counts each weight "
          "and the context's KV cache once at the bandwidth shown; the step also reads and writes (R, V) float32 "
          "buffers for sampling. With --dtype autocast the linear weights count at bf16 (the copies the engine "
          "casts once per rollout).")
    return 0


def compiled_rows(model, args, device: torch.device) -> list:
    """The step with ``model.forward`` compiled (``--compile-mode``) and captured in the engine's graph."""
    original = model.forward
    try:
        rows, _ = run(model, args, device, forward=torch.compile(original, mode=args.compile_mode, dynamic=False))
    except Exception as err:  # noqa: BLE001 - report the failure as a row, the measured rows stand
        print(f"--compile: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
        return []
    finally:
        model.forward = original
    return [(f"compiled {label}", times) for label, times in rows]


if __name__ == "__main__":
    sys.exit(main())
