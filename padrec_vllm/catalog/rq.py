"""Residual k-means quantisation with a collision level (TIGER's scheme).

``residual_kmeans`` maps each embedding to ``levels`` codes: level 0 clusters the embeddings,
level l clusters the residuals left after subtracting the level-(l-1) centroids.
``add_collision_level`` appends one more code so that every item's full code is unique: items
sharing the same residual codes get 0, 1, 2, ... in item order. Deterministic for a given seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm


@dataclass(frozen=True)
class QuantiserConfig:
    levels: int = 3
    codebook_size: int = 256
    iters: int = 30
    seed: int = 0


def _kmeans_pp_init(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """k-means++ seeding. x: [N, D] -> centroids [k, D]."""
    n = x.shape[0]
    centroids = [x[torch.randint(n, (1,), generator=gen)].squeeze(0)]
    d2 = ((x - centroids[0]) ** 2).sum(-1)  # [N]
    for _ in range(1, k):
        probs = d2 / d2.sum() if d2.sum() > 0 else torch.full_like(d2, 1.0 / n)
        idx = torch.multinomial(probs, 1, generator=gen)
        centroids.append(x[idx].squeeze(0))
        d2 = torch.minimum(d2, ((x - centroids[-1]) ** 2).sum(-1))
    return torch.stack(centroids)  # [k, D]


def kmeans(
    x: torch.Tensor, k: int, iters: int, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means. x: [N, D] float32 -> (codes [N] long, centroids [k, D]).

    ``k`` is capped at N. Empty clusters are re-seeded with the points farthest from their centroid.
    """
    k = min(k, x.shape[0])
    c = _kmeans_pp_init(x, k, gen)  # [k, D]
    for _ in range(iters):
        dist = torch.cdist(x, c)  # [N, k]
        codes = dist.argmin(-1)  # [N]
        sums = torch.zeros_like(c).index_add_(0, codes, x)  # [k, D]
        counts = torch.bincount(codes, minlength=k).to(x.dtype)  # [k]
        empty = counts == 0
        new_c = sums / counts.clamp(min=1)[:, None]
        if empty.any():
            far = dist.gather(1, codes[:, None]).squeeze(1).argsort(descending=True)
            new_c[empty] = x[far[: int(empty.sum())]]
        if torch.allclose(new_c, c):
            c = new_c
            break
        c = new_c
    codes = torch.cdist(x, c).argmin(-1)
    return codes, c


def residual_kmeans(emb: np.ndarray, cfg: QuantiserConfig) -> np.ndarray:
    """emb: [N, D] -> codes [N, levels] int64."""
    gen = torch.Generator().manual_seed(cfg.seed)
    residual = torch.from_numpy(np.ascontiguousarray(emb, dtype=np.float32))  # [N, D]
    codes = []
    for _ in tqdm(range(cfg.levels), desc="residual k-means", unit="level"):
        level_codes, centroids = kmeans(residual, cfg.codebook_size, cfg.iters, gen)
        codes.append(level_codes)
        residual = residual - centroids[level_codes]  # [N, D]
    return torch.stack(codes, dim=1).numpy()  # [N, levels]


def add_collision_level(codes: np.ndarray) -> np.ndarray:
    """codes: [N, L] -> [N, L + 1]; the last column makes every row unique (0 for first holder)."""
    seen: dict[tuple[int, ...], int] = {}
    extra = np.zeros(len(codes), dtype=np.int64)
    for i, row in enumerate(map(tuple, codes.tolist())):
        extra[i] = seen.get(row, 0)
        seen[row] = extra[i] + 1
    return np.concatenate([codes, extra[:, None]], axis=1)
