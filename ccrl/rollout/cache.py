"""The KV cache of a rollout and the left-padded prompt layout it assumes.

:class:`RolloutCache` allocates room for prompt + ``max_new_tokens`` once, after the prefill, and
decoding writes each step's keys and values in place; ``transformers``' ``DynamicCache``
concatenates instead, copying the whole cache at every step. Its rows can be repeated G times
after one prefill per prompt (a GRPO group shares its prompt's keys and values), dropped when
they finish (the eager decoder's compaction), and switched to a static mode in which every write
goes to a device-side slot, so that a decode step has fixed shapes and can be captured in a CUDA
graph (``ccrl.rollout.decode_graph``). In static mode attention runs over the first ``length``
positions of the buffer (:meth:`RolloutCache.attend`; all of it by default): a decoder that moves
the length up in windows reads the keys and values written so far, not the whole buffer, at every
step.

Under autocast (mixed precision with float32 weights) a Llama's keys leave its rotary embedding in
float32 (the cos / sin tables are float32), and attention casts the cached keys and values to the
autocast dtype on every call: at every decode step the whole float32 key cache was read and a
bf16 copy written before attention read that. With ``store_autocast`` (the engine sets it when
every attention of the policy runs through autocast-cast operations:
``ccrl.rollout.attention.casts_keys_under_autocast``) the cache stores keys and values in the
autocast dtype when they are written under autocast: the values attention computes with are the
same bits (``Tensor.to``, the rounding autocast applies), the key cache takes half the memory,
and no step casts it again.

Prompts are left-padded (:func:`left_pad`): every row's next token then goes to the same cache
position P + t, so one decode step writes one column for the whole batch; the padding is masked
and the positions (``position_ids``) count real tokens only.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from ccrl.rollout.precision import autocast_dtype


def left_pad(seqs: list[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists into (ids, mask) of shape (B, max_len)."""
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, n - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, n - len(s):] = 1
    return ids.to(device), mask.to(device)


class _GrowingLayer(DynamicLayer):
    """A ``DynamicLayer`` whose keys and values live in a buffer with room for ``extra`` more
    tokens after the prefill: a decode step writes its key/value in place and returns views of
    the filled prefix, where ``DynamicLayer`` concatenates, copying the whole cache every step
    (quadratic in the completion length)."""

    def __init__(self, extra: int, store_autocast: bool = False):
        super().__init__()
        self.extra = extra
        self.store_autocast = store_autocast
        self._k = self._v = None
        self._n = 0
        self._slot: torch.Tensor | None = None       # static mode: (1,) where the next key/value goes
        self._length = 0                              # static mode: positions attended (attend)

    def update(self, key_states, value_states, *args, **kwargs):
        if self.store_autocast:
            dtype = autocast_dtype(key_states.device)
            if dtype is not None and key_states.is_floating_point():
                key_states, value_states = key_states.to(dtype), value_states.to(dtype)
        if self._slot is not None:
            return self._update_static(key_states, value_states)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        t = key_states.shape[-2]
        if self._k is None:
            b, h, _, d = key_states.shape
            self._k = key_states.new_empty((b, h, t + self.extra, d))
            self._v = value_states.new_empty((b, h, t + self.extra, value_states.shape[-1]))
        elif self._n + t > self._k.shape[-2]:
            self._reallocate(None, self._n + t + self.extra)
        self._k[:, :, self._n: self._n + t] = key_states
        self._v[:, :, self._n: self._n + t] = value_states
        self._n += t
        self._views()
        return self.keys, self.values

    def _reallocate(self, rows: torch.Tensor | None, capacity: int) -> None:
        """New buffers of ``capacity`` positions holding the filled prefix of ``rows`` (all when None)."""
        src_k, src_v = self._k[:, :, : self._n], self._v[:, :, : self._n]
        if rows is not None:
            src_k, src_v = src_k[rows], src_v[rows]
        self._k = src_k.new_empty((*src_k.shape[:2], capacity, src_k.shape[-1]))
        self._v = src_v.new_empty((*src_v.shape[:2], capacity, src_v.shape[-1]))
        self._k[:, :, : self._n] = src_k
        self._v[:, :, : self._n] = src_v

    def _views(self):
        self.keys = self._k[:, :, : self._n]
        self.values = self._v[:, :, : self._n]

    def make_static(self, slot: torch.Tensor) -> None:
        """Static mode: ``update`` writes at ``slot`` (a (1,) device tensor that the caller advances)
        and returns the whole buffer, so a decode step changes no shape and no Python state and can
        be captured in a CUDA graph. The caller masks the slots not written yet; they are zeroed
        here, since a masked key still enters attention with weight 0 and 0 · NaN is NaN."""
        if self._k is None:
            return
        self._k[:, :, self._n:].zero_()
        self._v[:, :, self._n:].zero_()
        self._slot = slot
        self.attend(None)

    def attend(self, length: int | None) -> None:
        """Static mode: attention from now on runs over the first ``length`` positions of the buffer
        (None: all of them). The caller keeps every position written so far inside ``length``."""
        if self._k is None:
            return
        if length is not None and not 0 < length <= self._k.shape[-2]:
            raise ValueError(f"RolloutCache.attend: length {length} outside 1..{self._k.shape[-2]} (the buffer)")
        self._length = self._k.shape[-2] if length is None else length
        self.keys, self.values = self._k[:, :, :length], self._v[:, :, :length]

    def _update_static(self, key_states, value_states):
        t = key_states.shape[-2]
        idx = self._slot if t == 1 else self._slot + torch.arange(t, device=self._slot.device)
        self._k.index_copy_(2, idx, key_states)
        self._v.index_copy_(2, idx, value_states)
        # no host-side count: graph replays could not move it, and a forward compiled by torch.compile
        # would be recompiled for every new value of it; the slot tensor is the position. The views
        # are taken here, not the ``keys`` / ``values`` attributes returned: those are views of the
        # buffers made outside the step, which torch.compile would take as separate inputs aliasing
        # the buffers it mutates, and then copy each whole buffer twice per step instead of writing
        # one column in place.
        n = self._length
        return self._k[:, :, :n], self._v[:, :, :n]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if self._slot is not None:
            return self._length, 0
        return super().get_mask_sizes(query_length)

    def get_seq_length(self) -> int:
        """Tokens written (in static mode: before it began; the caller's slot counts from there)."""
        return self._n

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self._n:
            n = self._n
            b, h, cap, _ = self._k.shape
            new_k = self._k.new_empty((b * repeats, h, cap, self._k.shape[-1]))
            new_v = self._v.new_empty((b * repeats, h, cap, self._v.shape[-1]))
            # one broadcast copy of the filled prefix into each row's G slots
            new_k.view(b, repeats, h, cap, -1)[:, :, :, :n] = self._k[:, None, :, :n]
            new_v.view(b, repeats, h, cap, -1)[:, :, :, :n] = self._v[:, None, :, :n]
            self._k, self._v = new_k, new_v
            self._views()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self._n:
            self._reallocate(indices, self._k.shape[-2])
            self._views()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop: pass a negative number of tokens to remove")
        self._n = max(0, self._n + tokens_to_remove)
        if self._k is not None:
            self._views()

    def reset(self) -> None:
        self._k = self._v = None
        self._n = 0
        super().reset()


class RolloutCache(DynamicCache):
    """A ``DynamicCache`` of :class:`_GrowingLayer` s: room for the prompt plus ``extra`` tokens is
    allocated once, decoding appends in place. ``store_autocast``: keys and values written under
    autocast are stored in its dtype (module docstring)."""

    def __init__(self, extra: int, store_autocast: bool = False):
        Cache.__init__(self, layer_class_to_replicate=lambda: _GrowingLayer(extra, store_autocast))

    def make_static(self, slot: torch.Tensor) -> None:
        """Every layer in static mode, writing at ``slot`` (see :meth:`_GrowingLayer.make_static`)."""
        for layer in self.layers:
            layer.make_static(slot)

    def attend(self, length: int | None) -> None:
        """Every layer attends over its first ``length`` positions (see :meth:`_GrowingLayer.attend`)."""
        for layer in self.layers:
            layer.attend(length)
