"""The text fit's closed-form start (recipe 2): a stage-1 model whose weights are *solved*, not trained.

Why (issue 23): a text encoder's caption targets share one dominant direction (the tiny CLIP-L's sit at
a mean pairwise cosine of 0.86-0.89), and CLAP's text embeddings of 1,024 captions fill its space, so the
fit must learn an association between caption embeddings and targets that is close to arbitrary. From a
random start 300-500 AdamW steps did not even learn the captions (text top-1 0.005 over 1,024); InfoNCE on
the raw targets mostly sees their shared direction, and the random model's pooled features barely depend on
the input (a ridge readout on them scored chance). A kernel machine does learn it, so the model is set to be one:

- decomposer: one token, ``U (x - mu)``: the CLAP embedding centred on the corpus mean (which removes the
  shared component of the text cloud) and projected on its top ``width`` principal directions;
- projector: one block. Its attention passes that token through (one key), its feed-forward's first layer
  is a cosine kernel over the captions: unit ``j`` fires as ``GELU(beta * (cos(x, caption_j) - theta))``,
  ``theta`` set from the bridging noise (the mean cosine of a noisy copy of a caption to the caption, times
  ``kernel_threshold``): the noise sets how far around each caption its conditioning reaches;
- readouts by ridge regression (on the captions and ``copies`` noisy copies of each): the feed-forward's
  second layer onto the targets' top principal directions, ``out_proj`` onto the targets themselves;
- SDXL's pooled head: the same kernel in its MLP, its second layer solved onto the pooled vectors.

The modules are the pack's own (no new class): only their sizes (in the file's config) and weights differ.
With more captions than ``4 * width`` units, a seeded subset of the captions are the kernel's centres.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..decomposer import DecomposerConfig
from ..model import CLAP2DiffusionModel, ModelConfig
from ..pooled_head import PooledHeadConfig
from ..projector import ProjectorConfig


def ridge(x: torch.Tensor, y: torch.Tensor, strength: float) -> torch.Tensor:
    """``x [n, f]``, ``y [n, o]`` -> ``[f, o]`` minimising ``|x W - y|^2 + lam |W|^2`` (float64), with
    ``lam = strength *`` the mean feature energy, so ``strength`` means the same at any scale."""
    x = x.double()
    gram = x.T @ x
    gram += strength * gram.diagonal().mean().clamp_min(1e-12) * torch.eye(len(gram), dtype=gram.dtype)
    return torch.linalg.solve(gram, x.T @ y.double()).float()


def _captured(module: torch.nn.Module, run: Callable[[], None], output: bool) -> torch.Tensor:
    got: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda _m, args, out: got.append(out if output else args[0]))
    try:
        run()
    finally:
        handle.remove()
    return torch.cat(got)


def _through(model: CLAP2DiffusionModel, x: torch.Tensor, module: torch.nn.Module, output: bool) -> torch.Tensor:
    """What ``module`` of the projector receives (or, ``output``, returns) for ``x``, query 0's row."""
    def run() -> None:
        for chunk in x.split(1024):
            model.projector(model.decomposer(chunk))

    return _captured(module, run, output)[:, 0]  # every query of the block holds the same state


@torch.no_grad()
def kernel_fit(
    clap_text: torch.Tensor,
    targets: torch.Tensor,
    family: str,
    noisy: list[torch.Tensor],
    *,
    pooled: torch.Tensor | None = None,
    width: int,
    beta: float,
    threshold: float,
    strength: float,
    seed: int,
) -> CLAP2DiffusionModel:
    """``clap_text [M, 512]`` (unit), ``targets [M, C]``, for SDXL ``pooled [M, P]`` -> a stage-1 model
    (module docstring). ``noisy``: the bridged copies of ``clap_text`` (each ``[M, 512]``,
    :func:`.textfit.bridged_copies`; none: no bridging). The settings are :class:`.textfit.TextFitConfig`'s
    (``width``, ``kernel_beta``, ``kernel_threshold``, ``ridge``, ``seed``)."""
    clap = F.normalize(clap_text.float(), dim=-1)
    targets = targets.float()
    m, w = clap.shape[0], min(width, clap.shape[0] - 1, clap.shape[1])
    w = max(8, w - w % 8)
    units = 4 * w
    mean = clap.mean(0)
    basis = torch.linalg.svd(clap - mean, full_matrices=False).Vh[:w]  # [w, 512]
    if basis.shape[0] < w:  # fewer directions than width (tiny corpora): pad with zeros
        basis = torch.cat([basis, torch.zeros(w - basis.shape[0], clap.shape[1])])
    centred = (clap - mean) @ basis.T
    scale = w ** 0.5 / centred.norm(dim=-1).mean().clamp_min(1e-6)  # entries O(1): the pooled head's LayerNorm

    decomposer = DecomposerConfig(num_tokens=1, token_dim=w)
    head = None if pooled is None else PooledHeadConfig(
        pooled_dim=pooled.shape[1], token_dim=w, num_tokens=1, hidden_dim=units,
        norm_target=float(pooled.float().norm(dim=-1).mean()))
    projector = ProjectorConfig(token_dim=w, width=w, num_layers=1, num_heads=8, ff_mult=4,
                                context_dim=targets.shape[1])
    model = CLAP2DiffusionModel(ModelConfig(base_family=family, stage=1, decomposer=decomposer,
                                            projector=projector, pooled=head)).eval()
    d, p = model.decomposer, model.projector
    d.token_proj.weight.copy_(basis * scale)
    d.token_proj.bias.copy_(-(basis @ mean) * scale)
    d.token_pos.zero_()
    d.level_gate[2].weight.zero_()  # level weights: the prior, the same for every sound
    d.level_gate[2].bias.zero_()
    p.in_proj.weight.copy_(torch.eye(w))
    p.in_proj.bias.zero_()
    p.level_embed.zero_()
    p.queries.zero_()
    block = p.layers[0]
    block.to_v.weight.copy_(torch.eye(w))
    block.to_v.bias.zero_()
    block.to_out.weight.copy_(torch.eye(w) * 1e-2)  # small: the kernel's answer dominates the residual
    block.to_out.bias.zero_()

    # Training inputs: each caption and noisy copies of it; theta from how far the copies moved.
    x = torch.cat([clap, *noisy])
    y = targets.repeat(len(x) // m, 1)
    unit = F.normalize(centred, dim=-1)
    if noisy:
        moved = F.normalize((torch.cat(noisy) - mean) @ basis.T, dim=-1)
        reach = float((moved * unit.repeat(len(noisy), 1)).sum(-1).mean())
    else:
        reach = 1.0
    theta = threshold * reach
    centres = unit[torch.randperm(m, generator=torch.Generator().manual_seed(seed))[:units]]
    weight = torch.zeros(units, w)
    bias = torch.full((units,), -1e3)  # units without a centre stay off
    weight[:len(centres)] = beta * centres / w ** 0.5  # the LayerNorm before it scales a unit vector to sqrt(w)
    bias[:len(centres)] = -beta * theta
    block.ff[0].weight.copy_(weight)
    block.ff[0].bias.copy_(bias)

    target_mean = targets.mean(0)
    axes = torch.linalg.svd(targets - target_mean, full_matrices=False).Vh[:w]  # [<=w, C]
    hidden = _through(model, x, block.ff[2], output=False)
    second = ridge(hidden, (y - target_mean) @ axes.T, strength)  # [units, <=w]
    block.ff[2].weight.zero_()
    block.ff[2].weight[:second.shape[1]].copy_(second.T)
    block.ff[2].bias.zero_()
    features = _through(model, x, p.out_norm, output=True)
    out = ridge(torch.cat([features, torch.ones(len(features), 1)], 1), y, strength * 1e-2)
    p.out_proj.weight.copy_(out[:-1].T)
    p.out_proj.bias.copy_(out[-1])

    if model.pooled_head is not None:
        solve_pooled_head(model, clap, pooled.float(), noisy, beta=beta, threshold=threshold, strength=strength,
                          seed=seed)
    return model


@torch.no_grad()
def solve_pooled_head(model: CLAP2DiffusionModel, clap: torch.Tensor, pooled: torch.Tensor,
                      noisy: list[torch.Tensor], *, beta: float, threshold: float, strength: float, seed: int,
                      temperature: float | None = None) -> None:
    """Set ``model.pooled_head``'s MLP in closed form, for the decomposer the model has now (in place).

    ``clap [M, 512]`` the captions' CLAP text embeddings, ``pooled [M, P]`` their pooled text vectors,
    ``noisy``: bridged copies of ``clap`` (each ``[M, 512]``; none: no bridging). The first layer is a
    cosine kernel over the captions' head features (the LayerNorm'd decomposer output the MLP reads):
    unit ``j`` fires as ``GELU(beta * (cos(f, f_j) - theta))``, ``theta`` = ``threshold`` x the mean
    cosine of a bridged copy's features to its caption's; a seeded subset of the captions are the
    centres when there are more than units. The second layer is solved by ridge onto the pooled
    vectors, on the captions and their copies.
    """
    head = model.pooled_head
    if head is None:
        raise ValueError("this model has no pooled head to solve")

    def features(x: torch.Tensor) -> torch.Tensor:  # [n, K * D + 3]: what the head's MLP reads
        out = []
        for chunk in x.split(1024):
            levels = model.decomposer(chunk, temperature)
            out.append(head.norm(torch.cat([levels.tokens.flatten(1), levels.level_weights], dim=-1)))
        return torch.cat(out).float()

    m = clap.shape[0]
    f = features(torch.cat([clap, *noisy]))
    unit = F.normalize(f, dim=-1)
    reach = float((unit[m:] * unit[:m].repeat(len(noisy), 1)).sum(-1).mean()) if noisy else 1.0
    first, second = head.mlp[0], head.mlp[2]
    order = torch.randperm(m, generator=torch.Generator().manual_seed(seed))[:first.out_features]
    weight = torch.zeros_like(first.weight, dtype=torch.float32)
    bias = torch.full((first.out_features,), -1e3)  # units without a centre stay off
    weight[:len(order)] = beta * unit[order] / f.norm(dim=-1).mean()
    bias[:len(order)] = -beta * threshold * reach
    first.weight.copy_(weight)
    first.bias.copy_(bias)
    hidden = head.mlp[1](first(f.to(first.weight.dtype))).float()
    solved = ridge(torch.cat([hidden, torch.ones(len(hidden), 1)], 1), pooled.float().repeat(len(f) // m, 1), strength)
    second.weight.copy_(solved[:-1].T)
    second.bias.copy_(solved[-1])
