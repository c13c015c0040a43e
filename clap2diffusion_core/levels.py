"""The three levels a sound is decomposed into, and the prior over them."""

from __future__ import annotations

LEVELS: tuple[str, str, str] = ("foreground", "background", "ambience")
NUM_LEVELS = len(LEVELS)

#: How a sound's tokens are expected to split across the levels (5:3:2), as in CLAP2Diffusion.
LEVEL_PRIOR: tuple[float, float, float] = (0.5, 0.3, 0.2)


def split_by_prior(
    total: int, prior: tuple[float, ...] = LEVEL_PRIOR
) -> tuple[int, ...]:
    """Split ``total`` slots across levels in proportion to ``prior`` (largest remainder).

    >>> split_by_prior(77)
    (39, 23, 15)
    """
    raw = [p * total / sum(prior) for p in prior]
    counts = [int(r) for r in raw]
    by_remainder = sorted(
        range(len(raw)), key=lambda i: raw[i] - counts[i], reverse=True
    )
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return tuple(counts)
