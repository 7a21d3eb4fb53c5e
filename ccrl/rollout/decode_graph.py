"""The CUDA-graph decoder: static decoding of every row to the end, one decode step captured in a
CUDA graph and replayed per token.

Decoding a token is launch-bound on a GPU at RL sizes: the GPU waits between a few hundred small
kernels while the host launches them. So the decode step (the policy's forward on the [N, 1]
sampled tokens, then sampling, log-prob, entropy, α, persona-probability and route recording for
the next column) is captured once per rollout and replayed per token. What a graph needs, the
static decoding (:class:`StaticDecode`) provides: every row stays in the batch to the end
(finished rows emit pad with log-prob 0, as in the eager loop; no compaction), the cache is written
in place at a device-side slot (:meth:`ccrl.rollout.cache.RolloutCache.make_static`) and attended
through a prepared boolean [N, 1, 1, L] mask (HF models and Quillan take a 4-D mask as is), and the
slot, the column, the positions and the finished flags are device tensors the step advances
itself, so a replay needs no host work.

The attended length L moves up in windows (``SamplingConfig.attend_window``, w columns): while
columns [k·w, (k+1)·w) are fed, L = P + (k+1)·w (at most P + T), so a step reads the keys and values
written so far plus less than one window of masked ones, not the whole preallocated P + T. Each
window has its own shapes and so its own graph: its first step runs eagerly as the capture's
warm-up, the second is captured, and the rest of the window replays it; the previous window's graph
is dropped. At 1,024 new tokens a step reads on average about half the cache it would read at a
fixed L = P + T, for T / w captures (w = 0: one window over the whole cache, one graph).

Sampling draws on the device (:func:`ccrl.rollout.sampling.draw`, the exponential race that
``torch.multinomial`` runs for one sample). From the same generator state the graph replays give
exactly what the static decoding gives run eagerly (``cuda_graph: "static"``, its eager twin, on
any device), whose samples are those of the eager loop (both draw N × V exponentials per step);
greedy decoding gives the eager loop's tokens.

A policy whose decode step reads a value back to the host, or refuses the prepared mask, raises
:class:`NotCapturable` naming the operation; ``cuda_graph: auto`` then decodes that policy with the
eager loop from then on, ``True`` raises (``ccrl.rollout.engine``).
"""

from __future__ import annotations

import contextlib
import traceback

import torch

from ccrl.rollout.record import assemble, sample_and_record, start_decode
from ccrl.rollout.types import Rollout
from policies.hf_compat import cache_kwargs


class NotCapturable(RuntimeError):
    """The policy's decode step cannot be captured in a CUDA graph (it synchronises with the host,
    or capture failed); the message names the operation."""


class StaticDecode:
    """Static decoding: every row stays in the batch to the end (finished rows emit pad, mask 0),
    the cache is written in place at a device-side slot, and every per-step quantity lives in a
    device tensor that the step itself advances. A step (sample column t, feed that token) thus
    has fixed shapes and no host logic, so one CUDA graph of it is replayed for every token."""

    def __init__(self, model, out, cache, prompt_ids, prompt_mask, sampling, eos_id, pad_id, G, generator,
                 record_council, device):
        self.s = s = start_decode(out, cache, prompt_ids, prompt_mask, sampling, eos_id, pad_id, G, record_council,
                                  device)
        self.model, self.cache, self.sampling, self.generator, self.G = model, cache, sampling, generator, G
        self.device = device
        N, P = s.prompt_ids.shape
        T = sampling.max_new_tokens
        self.N, self.P, self.T = N, P, T
        self.length = P + T                                                      # positions attended (see attend)
        self.slot = torch.full((1,), P, dtype=torch.long, device=device)        # cache slot of the token fed next
        self.col = torch.zeros((1,), dtype=torch.long, device=device)           # completion column sampled next
        self.keys = torch.arange(P + T, device=device)                          # (P + T,) cache slots
        self.mask = torch.cat([s.prompt_mask, s.prompt_mask.new_ones((N, T))], dim=1).bool()  # (N, P + T)
        self.pos = s.prompt_mask.sum(-1, keepdim=True)                          # (N, 1) position of the fed token
        self.tok = torch.zeros(N, dtype=torch.long, device=device)              # (N,) the token fed next
        self.done = torch.zeros(N, dtype=torch.bool, device=device)
        s.logits = s.logits.clone()                                              # buffers the step rewrites
        s.alpha_last = None if s.alpha_last is None else s.alpha_last.clone()
        s.plp_last = None if s.plp_last is None else s.plp_last.clone()
        cache.make_static(self.slot)

    def sample(self) -> None:
        """Draw column ``col`` from the current logits and record it (finished rows: pad, 0)."""
        tok, finished = sample_and_record(self.s, self.sampling, self.generator, self.done, None, self.col)
        self.done |= finished
        self.tok.copy_(tok)

    def feed(self) -> None:
        """Run the sampled tokens through the policy at ``slot``; keep what the next column needs."""
        s = self.s
        L = self.length
        mask = (self.mask[:, :L] & (self.keys[:L] <= self.slot))[:, None, None, :]   # (N, 1, 1, L)
        out = self.model(input_ids=self.tok[:, None], attention_mask=mask, position_ids=self.pos,
                         use_cache=True, **cache_kwargs(self.cache), **s.step_kw)
        s.logits.copy_(out.logits[:, -1])
        if s.alpha_last is not None:
            s.alpha_last.copy_(out.council_weights[:, -1])
        if s.plp_last is not None:
            s.plp_last.copy_(out.persona_logprobs[:, -1])
        if s.route_buf is not None:
            for buf, r in zip(s.route_buf, out.routing_indices):
                buf.index_copy_(1, self.slot, r[:, -1:])                        # routes of the token fed at slot
        self.pos += 1
        self.slot += 1
        self.col += 1

    def step(self) -> None:
        self.sample()
        self.feed()

    def window_length(self, t: int) -> int:
        """Positions attended while feeding column ``t`` (at cache slot P + t): the prompt and the
        columns up to the end of t's window, P + w·⌈(t + 1) / w⌉, at most P + T; P + T when w = 0."""
        w = self.sampling.attend_window
        if not w:
            return self.P + self.T
        return self.P + min(self.T, w * (t // w + 1))

    def attend(self, length: int) -> bool:
        """Attend over ``length`` positions from the next step on; whether that changed the step's shapes."""
        if length == self.length:
            return False
        self.length = length
        self.cache.attend(length)
        return True

    def run(self, capture: bool) -> Rollout:
        """Decode every column: 0..T-2 sample and feed, column T-1 only samples. With ``capture``
        the first step runs eagerly as the warm-up, then one graph of the step is captured and
        replayed for the others, one graph per window of ``attend_window`` columns; off the CPU the
        finished rows are counted every ``check_every`` steps (a host sync), and decoding stops once
        all are."""
        if capture:
            return self._run_captured()
        return self._loop(capture=False)

    def _run_captured(self) -> Rollout:
        """``_loop`` with a private generator: a failed capture leaves every generator it registered
        unusable ("offset increment outside graph capture"), so the caller's generator never enters
        the capture (its state is copied in before and out after), and the default CUDA generator,
        which every capture registers, gets a fresh state after a failure."""
        caller, device = self.generator, self.device
        default = torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]
        saved = default.get_state()
        self.generator = torch.Generator(device=device)
        self.generator.set_state(caller.get_state() if caller is not None else saved)
        try:
            ro = self._loop(capture=True)
        except NotCapturable:
            fresh = torch.Generator(device=device)
            fresh.set_state(saved)
            default.graphsafe_set_state(fresh)
            raise
        (caller if caller is not None else default).set_state(self.generator.get_state())
        return ro

    def _loop(self, capture: bool) -> Rollout:
        check = self.sampling.check_every if self.device.type != "cpu" else 1
        graph, steps = None, 0
        for t in range(self.T - 1):
            if self.attend(self.window_length(t)):
                graph = None                         # a new window: new shapes, a new graph (the old one's memory goes)
            if graph is not None:
                graph.replay()
            elif capture:
                graph = capture_step(self.step, self.generator, self.device)         # runs the first step too
            else:
                self.step()
            steps += 1
            if (t + 1) % check == 0 and bool(self.done.all()):
                break
        else:
            self.sample()
            steps += 1
        return assemble(self.s, self.done, self.G, steps)


_CAPTURE_STREAMS: dict[int, torch.cuda.Stream] = {}
"""One side stream per CUDA device, made on the first capture and reused by every later one (as
``torch.cuda.graph``'s ``default_capture_stream``). cuBLAS keeps a workspace (32 MiB on Hopper) for
every (handle, stream) pair it has run on, for the process's lifetime; a fresh ``torch.cuda.Stream``
per capture walks torch's pool of 32 streams, so a training run would pin up to 32 workspaces
(1 GiB) of device memory, growing with every window captured until the pool wraps."""


def capture_stream(device) -> torch.cuda.Stream:
    """The side stream that captures run on, for ``device`` (one per device, reused)."""
    device = torch.device(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    stream = _CAPTURE_STREAMS.get(index)
    if stream is None:
        stream = _CAPTURE_STREAMS[index] = torch.cuda.Stream(index)
    return stream


def capture_step(step, generator, device):
    """Run ``step`` once eagerly on the device's capture stream (:func:`capture_stream`; the warm-up
    a capture wants: lazy initialisations stay out of the graph; it is a real decode step), then
    capture one CUDA graph of it there, drawing from ``generator`` (or the default CUDA generator,
    which capture registers itself). A step that fails either way raises :class:`NotCapturable`
    naming the operation."""
    stream = capture_stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.stream(stream):
            try:
                step()
            except Exception as err:               # e.g. a policy that does not take a prepared 4-D mask
                raise NotCapturable(_where(err)) from err
            if generator is not None:
                graph.register_generator_state(generator)
            graph.capture_begin(capture_error_mode="thread_local")
            try:
                step()
            except Exception as err:               # e.g. an operation that reads a value back to the host
                with contextlib.suppress(RuntimeError):
                    graph.capture_end()
                raise NotCapturable(_where(err)) from err
            graph.capture_end()
    finally:
        torch.cuda.current_stream(device).wait_stream(stream)   # later work sees the warm-up's
    return graph


def _where(err: BaseException) -> str:
    """The error's first line and the innermost frame outside torch that raised it (which operation)."""
    frames = [f for f in traceback.extract_tb(err.__traceback__) if "/torch/" not in f.filename.replace("\\", "/")]
    head = str(err).splitlines()[0] if str(err) else type(err).__name__
    if not frames:
        return head
    f = frames[-1]
    return f"{head} (at {'/'.join(f.filename.replace(chr(92), '/').rsplit('/', 2)[-2:])}:{f.lineno}, {f.name}: {f.line})"
