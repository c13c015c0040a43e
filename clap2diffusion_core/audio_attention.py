"""The one audio cross-attention math, shared by the diffusers processor and the ComfyUI patch.

Per cross-attention layer, with the layer's own projected query ``q`` (text attention unchanged):

    hidden = attn(q, k_text, v_text) + attn(q, k_audio, v_audio * w)        # then the layer's to_out

``k_audio, v_audio * w`` come from :meth:`AudioAdapter.layer_kv` (``w`` = gate, strength, routing
and level weights folded into the values, see :mod:`.adapters`). Training computes them per forward
(with gradients); inference computes them once per sound in :class:`AudioKV` and reuses them in
every step: audio tokens do not change while sampling, and neither do the silence tokens that
unconditional rows attend to, so a step does only the attention and one add.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .adapters import AudioAdapter
from .errors import FrameBatchError

#: ComfyUI's marker for the rows of a batch chunk: 0 positive (cond), 1 negative (uncond).
COND, UNCOND = 0, 1


def audio_attention(q: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Softmax attention of the layer's query over the audio tokens.

    ``q [B, S, H*d]`` (projected, heads not split), ``key``/``value [B, H, N, d]`` -> ``[B, S, H*d]``.
    PyTorch SDPA (scale ``d ** -0.5``, no mask), in ``q``'s dtype.
    """
    b, s, inner = q.shape
    heads = key.shape[1]
    qh = q.view(b, s, heads, inner // heads).transpose(1, 2)
    out = F.scaled_dot_product_attention(qh, key, value)
    return out.transpose(1, 2).reshape(b, s, inner)


def add_audio(
    text_hidden: torch.Tensor, q: torch.Tensor, key: torch.Tensor, value: torch.Tensor
) -> torch.Tensor:
    """``text_hidden [B, S, H*d]`` (the text attention, before ``to_out``) + the audio attention."""
    return text_hidden + audio_attention(q, key, value)


def frame_mismatch(num_rows: int, latents: int, where: str = "the latent batch") -> FrameBatchError:
    """The error of ``num_rows`` per-frame token rows sampled with ``latents`` latents."""
    return FrameBatchError(
        f"Apply Audio to Model: the audio tokens have {num_rows} rows, one per frame, but {where} has "
        f"{latents} latents. Latent i hears row i, so the counts must be equal: give the Empty Latent "
        f"Image a batch_size of {num_rows} (wire CLAP Encode Frames' 'frames' output into it), or set "
        "CLAP Encode Frames' 'frames' to the batch size. Tokens with one row (CLAP Encode) suit any batch. "
        "With context windows (core Context Windows, AnimateDiff-Evolved context options) the rows still "
        "cover the whole batch, and each window hears its own frames' rows."
    )


def frame_rows(num_rows: int, chunk: int, window: Sequence[int] | None = None) -> list[int] | None:
    """Which token row each latent of a UNet call's batch chunk hears.

    ``num_rows`` token rows (one per frame, or 1 for all), ``chunk`` latents per cond/uncond chunk of
    the call, ``window``: the indices in the whole batch of the latents in this call, when a
    context-window sampler runs a window of them (None otherwise). Returns the row per latent, or
    None when that is row i for latent i (or the one shared row). Raises :class:`FrameBatchError`
    where no row can be named: ComfyUI would silently repeat or cut the rows.
    """
    if num_rows == 1:
        return None
    if window is not None and len(window) == chunk:
        rows = [int(i) for i in window]
        if max(rows) >= num_rows:
            raise frame_mismatch(num_rows, max(rows) + 1, "the batch being sampled in context windows")
        return None if rows == list(range(num_rows)) else rows
    if chunk != num_rows:
        raise frame_mismatch(num_rows, chunk, "a UNet call (the sampler split the batch in a way this pack cannot map)")
    return None


def rows_for_chunks(
    cond: torch.Tensor,
    uncond: torch.Tensor,
    cond_or_uncond: Sequence[int],
    chunk: int,
    rows: Sequence[int] | None = None,
) -> torch.Tensor:
    """Stack per-row audio for a batch made of ``len(cond_or_uncond)`` chunks of ``chunk`` rows.

    ``cond [Bc, ...]`` (one sound, or one row per frame), ``uncond [1, ...]`` (silence);
    ``cond_or_uncond`` lists the chunks in batch order, e.g. ``[1, 0]`` or ``[0]``; ``rows``: the
    cond row of each latent (:func:`frame_rows`; None: row i, or the one row, for every latent).
    Every chunk holds the same latents in the same order (ComfyUI concatenates whole conds).
    """
    if rows is not None:
        cond = cond[list(rows)]
    if cond.shape[0] not in (1, chunk):
        raise frame_mismatch(cond.shape[0], chunk)
    parts = [(uncond if c == UNCOND else cond).expand(chunk, *cond.shape[1:]) for c in cond_or_uncond]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


class AudioKV(nn.Module):
    """Audio keys and values of one sound for every open adapter layer, computed once.

    ``layers[i]`` is the adapter layer index of slot ``i``; per slot, ``k_cond/v_cond [Ba, H, N, d]``
    for the sound (``Ba`` rows: one sound, or one per latent) and ``k_uncond/v_uncond [1, H, N, d]``
    for silence, values already scaled by gate x strength x routing x level weights.

    Held as (frozen) parameters so that a ComfyUI ModelPatcher can load and offload them with the
    UNet. :meth:`batch` assembles the per-row tensors for a batch layout once per layout, device and
    dtype (memoised), so steady-state sampling steps allocate nothing here.
    """

    def __init__(
        self,
        adapter: AudioAdapter,
        tokens: torch.Tensor,
        uncond: torch.Tensor,
        token_levels: torch.Tensor,
        *,
        strength: float = 1.0,
        level_weights: Sequence[float] | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        compute_dtype: torch.dtype = torch.float32,
    ) -> None:
        """``tokens [Ba, N, C]``, ``uncond [1, N, C]``, ``token_levels [N]``; K/V computed in
        ``compute_dtype`` (default float32; another dtype than the weights' needs casting layers, see
        ``AudioAdapter.layer_kv``) on each adapter layer's device, stored in ``dtype`` (the UNet's
        compute dtype) on ``device``."""
        super().__init__()
        self.layers: tuple[int, ...] = tuple(adapter.active_layers(strength, level_weights))
        self.num_rows = tokens.shape[0]
        self._memo: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        with torch.no_grad():
            scales = adapter.token_scales(token_levels, strength, level_weights).float()
            self.slots = nn.ModuleList()
            for index in self.layers:
                slot = nn.Module()
                for name, rows in (("cond", tokens), ("uncond", uncond)):
                    k, v = adapter.layer_kv(index, rows, scales[index], compute_dtype)
                    for prefix, t in (("k", k), ("v", v)):
                        t = t.to(device=device or t.device, dtype=dtype or t.dtype).contiguous()
                        setattr(slot, f"{prefix}_{name}", nn.Parameter(t, requires_grad=False))
                self.slots.append(slot)

    def __len__(self) -> int:
        return len(self.layers)

    def slot_of(self, layer_index: int) -> int:
        return self.layers.index(layer_index)

    def batch(
        self,
        slot: int,
        cond_or_uncond: Sequence[int],
        chunk: int,
        device: torch.device,
        dtype: torch.dtype,
        rows: Sequence[int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row ``(key, value) [len(cond_or_uncond) * chunk, H, N, d]`` for one slot; ``rows``:
        the token row of each latent (:func:`frame_rows`), for a context window of the frames."""
        memo_key = (slot, tuple(cond_or_uncond), chunk, device, dtype)
        hit = self._memo.get(memo_key) if rows is None else None
        if hit is not None:
            return hit
        s = self.slots[slot]
        kv = tuple(
            rows_for_chunks(
                getattr(s, f"{p}_cond").to(device, dtype),
                getattr(s, f"{p}_uncond").to(device, dtype),
                cond_or_uncond,
                chunk,
                rows,
            ).contiguous()
            for p in ("k", "v")
        )
        if rows is None:  # windows change from call to call: gathered each time, not kept
            self._memo[memo_key] = kv  # type: ignore[assignment]
        return kv  # type: ignore[return-value]

    def clear_memo(self) -> None:
        """Drop assembled batches (they are rebuilt on the next step); call when weights move."""
        self._memo.clear()

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001 (nn.Module's own signature)
        # .to()/.cuda()/.half() of the module: assembled batches refer to the old tensors.
        self._memo.clear()
        return super()._apply(fn, recurse)
