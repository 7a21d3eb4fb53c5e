"""Packed ternary weights and the ``ccrl::ternary_linear`` op: every C++ path against the reference.

The C++ kernels must give the PyTorch reference's bits exactly (``torch.equal``), on every ISA
path this CPU has, for ragged shapes, edge-case activations and 1 or 2 threads. Tests that need
the compiled extension skip cleanly without it; the reference-only tests always run.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from torch import nn

from policies import packed as P
from policies.ternary import (
    BitLinear,
    dequantize_activation,
    dequantize_weight,
    quantize_activation,
    quantize_weight,
    quantize_weight_binary,
)

needs_ext = pytest.mark.skipif(not P.extension_available(), reason="C++ ternary kernels not built")
ISAS = P.available_isas()

# (N, K, group_size, act_block_size): ragged K, short last tiles, every scale granularity
SHAPES = [
    (64, 256, 128, 64),
    (40, 200, 128, 64),      # K not a multiple of 64 or 128, N not a multiple of 16
    (37, 100, 128, 64),      # K below one weight group
    (33, 300, None, 64),     # one weight scale per tensor
    (16, 130, 128, None),    # one activation scale per token
    (21, 77, None, None),    # both per tensor / per token
    (48, 512, 64, 128),      # activation block larger than the weight group
    (5, 16, 128, 64),        # a single chunk, a single short tile
    (272, 640, 128, 64),
    (40, 1200, None, None),  # sub-blocks longer than a GEMM chunk: int32 sums carried across chunks
    (24, 1536, 768, None),   # a chunk that ends one long sub-block and starts the next
]
BATCHES = [1, 2, 7, 23, 64]   # 23: full and partial register blocks of the GEMM paths


@pytest.fixture(autouse=True)
def _restore_isa():
    if P.extension_available():   # each test starts with the threads in use (no earlier stalls)
        assert torch.ops.ccrl._ternary_work_split("reset") in ("threads", "alone (a forked child)")
    yield
    P.set_kernel_isa("auto")


def _case(n, k, m, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g), torch.randn(m, k, generator=g), torch.randn(n, generator=g)


# ------------------------------------------------------------------ format


@pytest.mark.parametrize("n,k,gs,ab", SHAPES)
def test_pack_unpack_round_trip(n, k, gs, ab):
    w, _, _ = _case(n, k, 1)
    packed = P.pack_ternary(w, gs, ab)
    q, scale = P.unpack_ternary(packed)
    q0, s0 = quantize_weight(w, gs)
    assert q.dtype == torch.int8 and torch.equal(q, q0)
    assert torch.equal(scale, s0)


@pytest.mark.parametrize("n,k,gs,ab", SHAPES)
def test_packed_size_is_two_bits_per_weight(n, k, gs, ab):
    w, _, _ = _case(n, k, 1)
    packed = P.pack_ternary(w, gs, ab)
    k_pad = packed.k_pad
    assert k_pad >= k and k_pad % 16 == 0 and k_pad - k < max(16, min(gs or k_pad, ab or k_pad))
    assert packed.codes.dtype == torch.uint8 and tuple(packed.codes.shape) == (n, k_pad // 4)
    g = 1 if gs is None or gs >= k else -(-k // gs)
    assert tuple(packed.scale.shape) == ((1, 1) if gs is None else (n, g))
    assert packed.scale.dtype == torch.float32
    assert packed.nbytes() == n * k_pad // 4 + 4 * packed.scale.numel()


def test_binary_weights_share_the_format():
    w, x, _ = _case(32, 192, 3)
    q, scale = quantize_weight_binary(w, 64)
    packed = P.pack_quantized(q, scale, 64, 64)
    assert torch.equal(P.unpack_ternary(packed)[0], q)
    assert torch.equal(P.ternary_linear(x, packed), P.reference_linear(x, packed))


@pytest.mark.parametrize("rows,k", [(1, 1), (7, 42), (16, 256), (5, 129)])
def test_row_codes_round_trip_at_two_bits(rows, k):
    q = torch.randint(-1, 2, (rows, k), generator=torch.Generator().manual_seed(rows * k), dtype=torch.int8)
    codes = P.pack_rows(q)
    assert codes.dtype == torch.uint8 and tuple(codes.shape) == (rows, -(-k // 4))      # R * ceil(K / 4) bytes
    assert torch.equal(P.unpack_rows(codes, k), q)
    assert torch.equal(P.unpack_rows(codes[[rows - 1, 0]], k), q[[rows - 1, 0]])         # gathered rows
    assert (codes[0, 0] & 3).item() == q[0, 0].item() + 1                               # weight 0: low bits


@pytest.mark.parametrize("precision,gs,k", [("ternary", 16, 42), ("binary", 16, 42), ("ternary", 16, 48),
                                            ("binary", 64, 48), ("ternary", None, 42)])
def test_dequantized_rows_are_the_fake_quantized_values(precision, gs, k):
    from policies.ternary import fake_quantize_weight, quantize_stacked

    w = torch.randn(12, k)
    q, scale = quantize_stacked(w.view(12, 1, k), precision, gs)
    codes, scale = P.pack_rows(q.view(12, k)), scale.reshape(12, -1)
    got = P.dequantize_rows(codes, scale, k, gs)
    assert torch.equal(got, fake_quantize_weight(w.view(12, 1, k), precision, gs).view(12, k))
    half = P.dequantize_rows(codes, scale, k, gs, torch.bfloat16)
    assert half.dtype == torch.bfloat16 and torch.equal(half, got.to(torch.bfloat16))
    rows = torch.tensor([[11, 0, 5], [5, 5, 2]])                                         # only these rows
    assert torch.equal(P.dequantize_rows(codes, scale, k, gs, rows=rows), got[rows])
    none = P.dequantize_rows(codes, scale, k, gs, rows=torch.zeros(0, 3, dtype=torch.long))
    assert none.shape == (0, 3, k)


def test_bad_block_sizes_are_refused():
    w = torch.randn(16, 256)
    with pytest.raises(P.PackError, match="multiples of 16"):
        P.pack_ternary(w, 40, None)
    with pytest.raises(P.PackError, match="multiple of the smaller"):
        P.pack_ternary(w, 96, 64)


# ------------------------------------------------------------------ the arithmetic


@pytest.mark.parametrize("n,k,gs,ab", SHAPES[:5])
def test_reference_is_the_quantised_product(n, k, gs, ab):
    """The reference equals deq(q(x)) · deq(q(W))ᵀ up to float32 rounding (checked in float64)."""
    w, x, b = _case(n, k, 5)
    packed = P.pack_ternary(w, gs, ab)
    qx, step = quantize_activation(x, ab)
    qw, ws = quantize_weight(w, gs)
    exact = dequantize_activation(qx, step, ab).double() @ dequantize_weight(qw, ws, gs).double().T + b.double()
    got = P.reference_linear(x, packed, b).double()
    assert torch.allclose(got, exact, rtol=1e-5, atol=1e-5 * exact.abs().max().item())


@pytest.mark.parametrize("m", BATCHES)
@pytest.mark.parametrize("n,k,gs,ab", SHAPES)
def test_kernel_bit_identical_to_reference(n, k, gs, ab, m):
    w, x, b = _case(n, k, m, seed=n * 1000 + k + m)
    packed = P.pack_ternary(w, gs, ab)
    ref = P.reference_linear(x, packed, b)
    ref_nobias = P.reference_linear(x, packed)
    for isa in ISAS or ["reference"]:
        P.set_kernel_isa(isa if ISAS else "auto")
        assert torch.equal(P.ternary_linear(x, packed, b), ref), isa
        assert torch.equal(P.ternary_linear(x, packed), ref_nobias), isa


def _edge_inputs(k):
    g = torch.Generator().manual_seed(7)
    base = torch.randn(6, k, generator=g)
    halves = torch.arange(k, dtype=torch.float32) % 9 - 4 + 0.5          # x / step = n + 0.5: half-to-even
    halves[::64] = 127.0                                                 # step = 1 in every block
    rows = [
        torch.zeros(k),                                                  # all-zero activations
        base[0] * 1e30,                                                  # huge
        base[1] * 1e-30,                                                 # tiny: below the 1e-5 floor
        base[2] * 3e-6,                                                  # around the floor
        torch.where(base[3] > 0, 1e30, -1e-30) * base[3].abs(),          # mixed huge and tiny, both signs
        halves,
        torch.where(torch.arange(k) % 2 == 0, 1.0, -1.0) * 1e20,         # alternating signs
        base[4],
    ]
    return torch.stack(rows)


@pytest.mark.parametrize("n,k,gs,ab", [SHAPES[0], SHAPES[1], SHAPES[3], SHAPES[5]])
def test_edge_cases(n, k, gs, ab):
    w, _, b = _case(n, k, 1)
    x = _edge_inputs(k)
    for weight in (w, torch.zeros(n, k), w * 1e-3, torch.sign(w)):     # incl. all-zero weights
        packed = P.pack_ternary(weight, gs, ab)
        ref = P.reference_linear(x, packed, b)
        assert torch.isfinite(ref).all()
        for isa in ISAS:
            P.set_kernel_isa(isa)
            assert torch.equal(P.ternary_linear(x, packed, b), ref), isa
    zero = P.pack_ternary(torch.zeros(n, k), gs, ab)
    assert torch.equal(P.reference_linear(x, zero), torch.zeros(len(x), n))


# more threads than cores: threads that wait for a core while the others take their chunks
THREADS = [1, 2, 2 * (os.cpu_count() or 1) + 1]


@needs_ext
@pytest.mark.parametrize("threads", THREADS)
def test_threads_give_the_same_bits(threads):
    """Work is taken in chunks from a shared counter: who computes a row must not change its bits."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        # one chunk; several chunks of whole tile pairs; token blocks x tile chunks; a 2560-wide GEMV
        for n, k, m in [(272, 640, 1), (272, 640, 64), (1000, 384, 9), (400, 640, 200), (1000, 2560, 1)]:
            w, x, b = _case(n, k, m)
            packed = P.pack_ternary(w)
            ref = P.reference_linear(x, packed, b)
            for isa in ISAS:
                P.set_kernel_isa(isa)
                assert torch.equal(P.ternary_linear(x, packed, b), ref), (isa, threads)
    finally:
        torch.set_num_threads(before)


@needs_ext
def test_thread_counts_agree_bit_for_bit():
    """1, 2 and more threads than cores, plain and grouped calls, every ISA: the same bits."""
    before = torch.get_num_threads()
    g = torch.Generator().manual_seed(11)
    w, x = torch.randn(520, 1200, generator=g), torch.randn(150, 1200, generator=g)
    packed = P.pack_ternary(w)
    experts = P.pack_ternary(torch.randn(3, 200, 1200, generator=g))
    offs = torch.tensor([40, 40, 150])
    outs = {}
    try:
        for threads in THREADS:
            torch.set_num_threads(threads)
            for isa in ISAS:
                P.set_kernel_isa(isa)
                for _ in range(3):   # repeated: the chunks fall to different threads each time
                    outs.setdefault((isa, "plain"), []).append(P.ternary_linear(x, packed))
                    outs.setdefault((isa, "grouped"), []).append(P.ternary_linear_grouped(x, experts, offs))
    finally:
        torch.set_num_threads(before)
    for (isa, kind), ys in outs.items():
        assert all(torch.equal(y, ys[0]) for y in ys), (isa, kind)
        assert torch.equal(ys[0], outs[(ISAS[0], kind)][0]), (isa, kind)
    assert torch.equal(outs[(ISAS[0], "plain")][0], P.reference_linear(x, packed))


@needs_ext
@pytest.mark.skipif("avx2" not in ISAS, reason="the lookup-table experiment needs AVX2")
def test_lookup_table_experiment_threads_give_the_same_bits():
    n, k = 1024, 2560
    w, x, _ = _case(n, k, 1)
    packed = P.pack_ternary(w)
    tl = torch.ops.ccrl._ternary_tl_pack(packed.codes, k, 128, 64)
    ref = P.reference_linear(x, packed)
    before = torch.get_num_threads()
    try:
        for threads in THREADS:
            torch.set_num_threads(threads)
            for _ in range(3):
                assert torch.equal(torch.ops.ccrl._ternary_tl_linear(x, tl, packed.scale, n, k, 128, 64), ref), threads
    finally:
        torch.set_num_threads(before)


@needs_ext
def test_kernels_run_in_a_forked_child():
    """A forked child (DataLoader workers, multiprocessing) of a process that ran the kernels on 2
    threads gets the same bits and does not hang (OpenMP's threads do not survive fork: a parallel
    region in the child would wait for them for ever), also when the fork came while another
    thread of the parent was inside a call."""
    code = textwrap.dedent(
        """
        import os, threading, torch
        from policies import packed as P
        torch.set_num_threads(2)
        g = torch.Generator().manual_seed(0)
        w, x = torch.randn(1000, 2560, generator=g), torch.randn(3, 2560, generator=g)
        packed = P.pack_ternary(w)
        ref = P.reference_linear(x, packed)
        assert torch.equal(P.ternary_linear(x, packed), ref)     # the parent's threads exist now

        stop = threading.Event()
        def calls():                                             # the parent keeps calling meanwhile
            while not stop.is_set():
                assert torch.equal(P.ternary_linear(x, packed), ref)
        background = threading.Thread(target=calls)
        background.start()
        children = []
        for _ in range(3):
            pid = os.fork()
            if pid == 0:
                same = all(torch.equal(P.ternary_linear(x, packed), ref) for _ in range(20))
                os._exit(0 if same and torch.get_num_threads() == 2 else 1)
            children.append(pid)
        codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in children]
        stop.set()
        background.join()
        assert codes == [0, 0, 0], codes
        assert all(torch.equal(P.ternary_linear(x, packed), ref) for _ in range(20))
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


# spins on one core until its parent is gone (it runs in a session of its own)
BUSY_LOOP = ("import os, sys\nos.sched_setaffinity(0, {int(sys.argv[1])})\nparent = os.getppid()\n"
             "while os.getppid() == parent:\n    for _ in range(1000000):\n        pass\n")


@needs_ext
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs")
def test_two_threads_with_one_core_busy_are_not_much_slower_than_one():
    """A thread the OS has descheduled (another process on its core) must not hold a call back:
    with a busy loop on one of the cores, the 2-thread GEMV takes at most 1.3x the 1-thread time
    (medians; the two thread counts interleaved in the same test)."""
    n, k = 6912, 2560
    w, x, _ = _case(n, k, 1)
    packed = P.pack_ternary(w)
    op = torch.ops.ccrl.ternary_linear.default

    def call():
        op(x, packed.codes, packed.scale, None, k, packed.group_size, packed.act_block_size)

    before = torch.get_num_threads()
    # its own session, as another program's: where the kernel groups processes by session for
    # fair scheduling (autogroup), a child of this process would only share this process's slice
    busy = subprocess.Popen([sys.executable, "-c", BUSY_LOOP, str(max(os.sched_getaffinity(0)))],
                            start_new_session=True)
    times = {1: [], 2: []}
    try:
        time.sleep(0.3)
        with torch.inference_mode():
            for i in range(8):
                for threads in (1, 2) if i % 2 == 0 else (2, 1):
                    torch.set_num_threads(threads)
                    for _ in range(3):
                        call()
                    for _ in range(40):
                        t0 = time.perf_counter()
                        call()
                        times[threads].append(time.perf_counter() - t0)
    finally:
        busy.kill()
        busy.wait()
        torch.set_num_threads(before)
    one, two = statistics.median(times[1]), statistics.median(times[2])
    assert two <= 1.3 * one, f"2 threads {two * 1e3:.3f} ms, 1 thread {one * 1e3:.3f} ms"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(dtype):
    w, x, b = _case(48, 200, 5)
    packed = P.pack_ternary(w)
    xh, bh = x.to(dtype), b.to(dtype)
    y = P.ternary_linear(xh, packed, bh)
    assert y.dtype == dtype
    assert torch.equal(y, P.reference_linear(xh, packed, bh))


def test_leading_dims_and_empty_batch():
    w, _, _ = _case(40, 96, 1)
    packed = P.pack_ternary(w)
    x = torch.randn(2, 3, 96)
    y = P.ternary_linear(x, packed)
    assert y.shape == (2, 3, 40)
    assert torch.equal(y, P.reference_linear(x, packed))
    assert torch.equal(y.reshape(6, 40), P.ternary_linear(x.reshape(6, 96), packed))
    assert P.ternary_linear(torch.randn(0, 96), packed).shape == (0, 40)


def test_scales_cast_to_bfloat16_still_run():
    """A module cast with .to(bfloat16) may hand bf16 scales: widened exactly, same bits everywhere."""
    w, x, _ = _case(40, 200, 3)
    packed = P.pack_ternary(w)
    cast = packed._replace(scale=packed.scale.to(torch.bfloat16))
    ref = P.reference_linear(x, cast._replace(scale=cast.scale.float()))
    assert torch.equal(P.reference_linear(x, cast), ref)
    for isa in ISAS:
        P.set_kernel_isa(isa)
        assert torch.equal(P.ternary_linear(x, cast), ref)
        assert torch.equal(torch.ops.ccrl.ternary_linear(x, cast.codes, cast.scale, None, 200, 128, 64), ref)


def test_non_contiguous_input():
    w, _, _ = _case(32, 128, 1)
    packed = P.pack_ternary(w)
    x = torch.randn(128, 10).T
    assert torch.equal(P.ternary_linear(x, packed), P.reference_linear(x.contiguous(), packed))


def test_grouped_matches_one_call_per_matrix():
    g = torch.Generator().manual_seed(3)
    e, n, k = 4, 40, 200
    w = torch.randn(e, n, k, generator=g)
    bias = torch.randn(e, n, generator=g)
    packed = P.pack_ternary(w)
    assert tuple(packed.codes.shape) == (e, n, packed.k_pad // 4)
    counts = torch.tensor([3, 0, 9, 1])                                  # an expert with no tokens
    x = torch.randn(int(counts.sum()), k, generator=g)
    offs = counts.cumsum(0)
    y = P.ternary_linear_grouped(x, packed, offs, bias)
    start = 0
    for i, end in enumerate(offs.tolist()):
        one = P.PackedTernary(packed.codes[i], packed.scale[i], k, n, packed.group_size, packed.act_block_size)
        assert torch.equal(y[start:end], P.reference_linear(x[start:end], one, bias[i]))
        start = end
    for isa in ISAS:
        P.set_kernel_isa(isa)
        assert torch.equal(P.ternary_linear_grouped(x, packed, offs, bias), y), isa


@needs_ext
def test_direct_entry_point_matches_the_op():
    """The eager entry point (no dispatcher) gives the op's bits and defers whenever it must."""
    w, x, b = _case(40, 200, 3)
    packed = P.pack_ternary(w)
    args = (packed.codes, packed.scale, b, 200, 128, 64)
    y = P._FAST(x, *args)
    assert torch.equal(y, torch.ops.ccrl.ternary_linear.default(x, *args))
    assert torch.equal(y, P.reference_linear(x, packed, b))
    assert P._FAST(x.requires_grad_(), *args) is NotImplemented         # autograd: the op decides
    with torch.no_grad():
        assert torch.equal(P._FAST(x, *args), y)
    assert P._FAST(x.detach().to("meta"), *args) is NotImplemented


@needs_ext
def test_every_isa_selectable_and_bad_names_refused():
    assert "scalar" in ISAS
    for isa in ISAS:
        assert P.set_kernel_isa(isa) == isa
        assert P.kernel_isa() == isa
    with pytest.raises(P.PackError):
        P.set_kernel_isa("neon")
    for isa in ("avx512", "amx"):
        if isa not in ISAS:
            with pytest.raises(P.PackError):
                P.set_kernel_isa(isa)


# ------------------------------------------------------------------ torch.library integration


def test_opcheck():
    w, x, b = _case(40, 200, 3)
    packed = P.pack_ternary(w)
    args = (x, packed.codes, packed.scale, b, 200, 128, 64)
    torch.library.opcheck(torch.ops.ccrl.ternary_linear.default, args)
    per_tensor = P.pack_ternary(w, None, None)
    torch.library.opcheck(torch.ops.ccrl.ternary_linear.default,
                          (x, per_tensor.codes, per_tensor.scale, None, 200, None, None))
    stacked = P.pack_ternary(torch.randn(2, 40, 200))
    gargs = (x, stacked.codes, stacked.scale, None, torch.tensor([1, 3]), 200, 128, 64)
    torch.library.opcheck(torch.ops.ccrl.ternary_linear_grouped.default, gargs,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_compile_fullgraph_traces_the_op():
    w, x, b = _case(40, 200, 3)
    packed = P.pack_ternary(w)

    def f(inp):
        return torch.relu(P.ternary_linear(inp, packed, b)) * 2

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x), f(x))


@pytest.mark.slow
def test_compile_fullgraph_inductor():
    w, x, b = _case(40, 200, 3)
    packed = P.pack_ternary(w)
    layer = P.PackedBitLinear(200, 40, bias=True)
    layer.packed_weight.copy_(packed.codes)
    layer.weight_scale.copy_(packed.scale)
    layer.bias.data.copy_(b)
    compiled = torch.compile(lambda inp: layer(inp) + 1, fullgraph=True, dynamic=True)
    for m in (3, 5):
        xm = torch.randn(m, 200)
        assert torch.equal(compiled(xm), layer(xm) + 1)


def test_reference_runs_with_one_warning_without_the_extension():
    code = textwrap.dedent(
        """
        import sys, warnings
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import torch
            from policies import packed as P
            from policies.ternary import ternary_linear, pack_ternary
            w, x = torch.randn(40, 200), torch.randn(3, 200)
            p = pack_ternary(w)
            y = ternary_linear(x, p)
            y = ternary_linear(x, p)
        msgs = [str(c.message) for c in caught if "C++ kernels" in str(c.message)]
        assert len(msgs) == 1, msgs
        assert not P.extension_available() and P.kernel_isa() == "reference"
        assert torch.equal(y, P.reference_linear(x, p))
        torch.library.opcheck(torch.ops.ccrl.ternary_linear.default, (x, p.codes, p.scale, None, 200, 128, 64))
        print("ok")
        """
    )
    env = {**os.environ, "CCRL_KERNELS": "off"}           # as if the build had failed
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


# ------------------------------------------------------------------ modules


def _bit_model(precision="ternary", gs=128, ab=64, bias=True):
    torch.manual_seed(0)
    model = nn.Sequential(
        BitLinear(96, 64, bias=bias, precision=precision, group_size=gs, act_block_size=ab),
        nn.ReLU(),
        BitLinear(64, 40, bias=False, precision=precision, group_size=gs, act_block_size=ab),
        nn.Linear(40, 8),
    )
    return model


def test_pack_model_refuses_training_mode():
    model = _bit_model()
    with pytest.raises(P.PackError, match="eval"):
        P.pack_model_(model)
    assert isinstance(model[0], BitLinear)


@pytest.mark.parametrize("precision,gs,ab", [("ternary", 128, 64), ("binary", 32, 64), ("ternary", None, None)])
def test_pack_model_in_place(precision, gs, ab):
    model = _bit_model(precision, gs, ab).eval()
    x = torch.randn(5, 96)
    with torch.no_grad():
        qat = model(x)
        expected = model[3](P.reference_linear(
            torch.relu(P.reference_linear(x, P.pack_quantized(*model[0].quantized_weight(), gs, ab), model[0].bias)),
            P.pack_quantized(*model[2].quantized_weight(), gs, ab),
        ))
    assert P.pack_model_(model) is model
    assert isinstance(model[0], P.PackedBitLinear) and isinstance(model[2], P.PackedBitLinear)
    assert type(model[3]) is nn.Linear                                   # high-precision layers stay
    with torch.no_grad():
        packed_out = model(x)
    assert torch.equal(packed_out, expected)
    assert torch.allclose(packed_out, qat, rtol=1e-4, atol=1e-4)         # the QAT forward, up to rounding


def test_structure_only_model_loads_a_packed_state_dict():
    model = _bit_model().eval()
    P.pack_model_(model)
    state = model.state_dict()
    assert state["0.packed_weight"].dtype == torch.uint8

    class Config:
        ternary_packed = True

    fresh = _bit_model()                                                 # training mode, untrained
    fresh.config = Config()
    P.pack_model_(fresh)                                                 # structure only: no error
    assert fresh[0].packed_weight.shape == model[0].packed_weight.shape
    fresh.load_state_dict(state)
    fresh.eval()
    x = torch.randn(3, 96)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_config_flag_and_dtype_cast_keep_float32_scales():
    model = _bit_model().eval()

    class Config:
        ternary_packed = False

    model.config = Config()
    P.pack_model_(model)
    assert model.config.ternary_packed is True
    scale = model[0].weight_scale.clone()
    model.to(torch.bfloat16)
    assert model[0].weight_scale.dtype == torch.float32 and torch.equal(model[0].weight_scale, scale)
    assert model[0].bias.dtype == torch.bfloat16
    with torch.no_grad():
        assert model(torch.randn(2, 96, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_lazy_public_names():
    from policies import ternary

    assert ternary.pack_ternary is P.pack_ternary
    assert ternary.ternary_linear is P.ternary_linear
    assert ternary.PackedTernary is P.PackedTernary
