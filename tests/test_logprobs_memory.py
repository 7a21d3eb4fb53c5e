"""Memory of the chunked output head (``chunked_token_logprobs``) beyond its inputs: each chunk's
logits are formed in tiles of vocabulary columns (at most ``TILE_BYTES`` = 64 MiB of float32), and
the backward holds one tile at a time, turned into ∂/∂z in place (plus its low-precision copy for
the matmuls under autocast): 96 MiB, below TRL 1.16's fused-head tile (4096 tokens × 32768
vocabulary in bf16 = 256 MiB). The tiles give the log-probs, entropies and gradients of the full
logits.

The head's backward runs at the start of the training pass's backward, when every layer's saved
activations are still alive, so whatever it holds adds to the step's peak memory. Measured here on
the CPU by following every tensor that an operation of the backward (or forward) returns until it
is freed (:class:`LiveBytes`), and on a GPU with ``torch.cuda.max_memory_allocated``."""

from __future__ import annotations

import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import ccrl.objectives.logprobs as L
from ccrl.objectives import auto_chunk_size, chunked_token_logprobs, token_entropy, token_logprobs


class LiveBytes(TorchDispatchMode):
    """The largest total size of the storages that operations inside the block returned and that
    were still alive (reachable from a tensor) at the time, over every operation. Storages of
    ``outside`` tensors (the inputs) are not counted, nor are the views of them."""

    def __init__(self, outside=()):
        super().__init__()
        self.outside = {t.untyped_storage().data_ptr() for t in outside}
        self.live: dict[int, tuple[list, int]] = {}
        self.peak = 0

    def _purge(self) -> None:
        for ptr in list(self.live):
            refs, _ = self.live[ptr]
            refs[:] = [r for r in refs if r() is not None]
            if not refs:
                del self.live[ptr]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self._purge()                                  # a freed storage's address may be reused by ``out``
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                s = t.untyped_storage()
                if s.data_ptr() in self.outside or s.nbytes() == 0:
                    continue
                refs, n = self.live.get(s.data_ptr(), ([], 0))
                refs.append(weakref.ref(t))
                self.live[s.data_ptr()] = (refs, max(n, s.nbytes()))
        self.peak = max(self.peak, sum(n for _, n in self.live.values()))
        return out


def _inputs(N=512, H=32, V=4096, dtype=torch.float32):
    torch.manual_seed(0)
    h = torch.randn(N, H, dtype=dtype, requires_grad=True)
    w = (torch.randn(V, H, dtype=dtype) / H**0.5).requires_grad_()
    ids = torch.randint(0, V, (N,))
    return h, w, ids


@pytest.fixture
def tiles_of_1024(monkeypatch):
    """Chunks of 128 tokens in tiles of 1024 columns (4 tiles of a 4096-token vocabulary); returns
    the bytes of one float32 tile."""
    monkeypatch.setattr(L, "TILE_BYTES", 128 * 1024 * 4)
    return 128 * 1024 * 4


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_backward_holds_one_float32_tile_besides_the_gradients(tiles_of_1024, temperature):
    """Several chunks of several tiles, float32: the backward's extra memory is the gradients
    (V × H, N × H and one chunk's float32 N × H accumulator) and one (chunk, tile) float32 buffer;
    whole chunks with p = exp(log p) in a second buffer held 2 chunks (8 tiles here)."""
    h, w, ids = _inputs()
    lp, _ = chunked_token_logprobs(h, w, ids, 128, temperature=temperature)
    grads = w.numel() * 4 + h.numel() * 4 + 128 * h.shape[1] * 4
    with LiveBytes(outside=(h, w, ids)) as seen:
        (lp * torch.linspace(-1, 1, lp.numel())).sum().backward()
    assert seen.peak - grads <= 1.25 * tiles_of_1024, (seen.peak - grads) / tiles_of_1024


def test_backward_with_entropy_holds_two_float32_tiles(tiles_of_1024):
    """With the entropy's gradient both log p and p are needed: two tiles, no more."""
    h, w, ids = _inputs()
    lp, ent = chunked_token_logprobs(h, w, ids, 128, with_entropy=True)
    grads = w.numel() * 4 + h.numel() * 4 + 128 * h.shape[1] * 4
    with LiveBytes(outside=(h, w, ids)) as seen:
        (lp.sum() + 0.1 * ent.sum()).backward()
    assert seen.peak - grads <= 2.25 * tiles_of_1024, (seen.peak - grads) / tiles_of_1024


def test_forward_with_entropy_holds_two_float32_tiles(tiles_of_1024):
    """The forward folds the tiles into logsumexp and Σ p z online: a tile and one temporary."""
    h, w, ids = _inputs()
    with torch.no_grad(), LiveBytes(outside=(h, w, ids)) as seen:
        chunked_token_logprobs(h, w, ids, 128, with_entropy=True)
    assert seen.peak <= 2.25 * tiles_of_1024, seen.peak / tiles_of_1024


def test_backward_under_bf16_autocast_holds_one_float32_tile_and_its_bf16_copy(tiles_of_1024):
    """Under bf16 autocast the matmuls take a bf16 copy of ∂/∂z: at most 1.5 float32 tiles at a
    time besides the float32 gradients and the bf16 copies of one tile of the weight (1024 of its
    4096 rows) and of one chunk: the whole weight is never cast (that copy would add 0.375 tiles)."""
    h, w, ids = _inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp, _ = chunked_token_logprobs(h, w, ids, 128)
    assert lp.dtype == torch.float32
    grads = w.numel() * 4 + h.numel() * 4 + 128 * h.shape[1] * 4
    casts = 1024 * h.shape[1] * 2 + 128 * h.shape[1] * 2
    casts += 1024 * h.shape[1] * 4      # the CPU's addmm into float32 takes float32 copies of a tile's weights
    with LiveBytes(outside=(h, w, ids)) as seen:
        lp.sum().backward()
    assert seen.peak - grads - casts <= 1.6 * tiles_of_1024, (seen.peak - grads - casts) / tiles_of_1024


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_uneven_tiles_give_the_full_logits_log_probs_entropies_and_gradients(monkeypatch, temperature):
    """Tiles of 96 columns of a 700-token vocabulary (the last one of 28), with a bias, entropy and
    temperature: the same log-probs, entropies and gradients as the full logits."""
    monkeypatch.setattr(L, "MIN_TILE", 1)
    torch.manual_seed(0)
    N, H, V = 45, 16, 700
    h = torch.randn(N, H, requires_grad=True)
    w = (0.3 * torch.randn(V, H)).requires_grad_()
    b = (0.3 * torch.randn(V)).requires_grad_()
    ids = torch.randint(0, V, (N,))
    ids[:3] = torch.tensor([0, V - 1, 96])                      # the first and last column, a tile's first
    coef_lp, coef_h = torch.randn(N), torch.randn(N)

    def run(chunk, entropy=True):
        for t in (h, w, b):
            t.grad = None
        if chunk is None:
            z = torch.nn.functional.linear(h, w, b)
            lp, ent = token_logprobs(z, ids, temperature), token_entropy(z, temperature)
        else:
            lp, ent = chunked_token_logprobs(h, w, ids, chunk, bias=b, temperature=temperature, with_entropy=True)
        loss = (lp * coef_lp).sum() + ((ent * coef_h).sum() if entropy else 0)
        loss.backward()
        return lp.detach(), ent.detach(), [t.grad.clone() for t in (h, w, b)]

    for entropy in (True, False):
        ref = run(None, entropy)
        for chunk in (7, 16):
            monkeypatch.setattr(L, "TILE_BYTES", chunk * 96 * 4)
            assert L._vocab_tiles(V, chunk)[-1] == (672, 700)
            got = run(chunk, entropy)
            for g, r in zip([got[0], got[1], *got[2]], [ref[0], ref[1], *ref[2]]):
                torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)


def test_tiles_pass_gradcheck_in_float64(monkeypatch):
    monkeypatch.setattr(L, "MIN_TILE", 1)
    monkeypatch.setattr(L, "TILE_BYTES", 4 * 4 * 3)               # chunks of 4 tokens, tiles of 3 columns
    torch.manual_seed(0)
    h = torch.randn(9, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(11, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(11, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 11, (9,))
    assert len(L._vocab_tiles(11, 4)) == 4
    fn = lambda h, w, b: chunked_token_logprobs(h, w, ids, 4, bias=b, temperature=0.8, with_entropy=True)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (h, w, b))


def test_automatic_chunks_take_tiles_of_at_most_64_mib():
    """``auto`` chunks (256 MiB of float32 logits: 2,097 tokens at 32,000, 441 at 151,936) are
    formed in 4 tiles of at most 64 MiB, so the backward's 1.5 tiles stay at 96 MiB, under TRL's
    256 MiB bf16 tile."""
    assert L.TILE_BYTES == 64 * 2**20
    for v in (32_000, 151_936):
        c = auto_chunk_size(v)
        tiles = L._vocab_tiles(v, c)
        assert len(tiles) == 4 and tiles[0][0] == 0 and tiles[-1][1] == v
        assert all(1.5 * c * (e - s) * 4 <= 96 * 2**20 < 4096 * 32768 * 2 for s, e in tiles)
    assert L._vocab_tiles(50, 10**6) == [(0, 50)]                 # at least MIN_TILE columns


@pytest.mark.gpu
def test_backward_peak_cuda_memory_under_bf16_autocast():
    """On a GPU, bf16 autocast, 32,000 tokens, the automatic chunk: the backward's peak above the
    inputs is the float32 gradients, the bf16 weight and chunk, and at most 1.6 float32 tiles."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    N, H, V = 8192, 1024, 32_000
    torch.manual_seed(0)
    h = torch.randn(N, H, device="cuda", requires_grad=True)
    w = (torch.randn(V, H, device="cuda") / H**0.5).requires_grad_()
    ids = torch.randint(0, V, (N,), device="cuda")
    chunk = auto_chunk_size(V)
    tile = max(e - s for s, e in L._vocab_tiles(V, chunk)) * chunk * 4
    with torch.autocast("cuda", dtype=torch.bfloat16):
        lp, _ = chunked_token_logprobs(h, w, ids, "auto")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    lp.sum().backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - start
    fixed = (V * H + N * H) * 4 + V * H * 2 + chunk * H * (2 + 4)
    assert extra - fixed <= 1.6 * tile + 2**20, (extra - fixed) / tile
