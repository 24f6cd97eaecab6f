"""The start-up check: what would stop the server from ever becoming ready, found before any
model is loaded (``padrec serve`` runs it first; the app's lifespan runs it again). The files
are checked by the library's artifacts check (``padrec_vllm.artifacts_check``), the same for
every engine: one line naming the file and the mismatch."""

from __future__ import annotations

from padrec_vllm.artifacts import ArtifactPaths
from padrec_vllm.artifacts_check import check_artifacts
from padrec_vllm.errors import UserError
from server.recommender import Recommender
from server.settings import Settings


def check(settings: Settings) -> Recommender:
    """The recommender of ``settings.artifacts``; UserError when the artifacts directory, the
    head (with speculation on) or the history limit cannot work."""
    paths = ArtifactPaths(settings.artifacts)
    paths.read_build_info()
    if settings.speculative and not paths.has_head(settings.head):
        raise UserError(
            f"no {settings.head} head in {paths.head(settings.head)} (train it with "
            "`padrec build`, choose another with PADREC_HEAD, or set PADREC_SPECULATIVE=false)"
        )
    check_artifacts(paths.root, heads=[settings.head] if settings.speculative else [])
    rec = Recommender.load(
        settings.artifacts,
        max_history=settings.max_history,
        extra_items=settings.extra_items,
        constrained=settings.constrained,
        data_dir=settings.data_dir,
    )
    layout = rec.catalog.layout
    longest = len(rec.catalog.prompt_ids([], 0)) + rec.max_history * layout.tokens_per_item
    if longest + layout.tokens_per_item + 1 > rec.max_model_len:
        raise UserError(
            f"max_history={rec.max_history} makes prompts of {longest} tokens; the model "
            f"takes {rec.max_model_len} in all (lower PADREC_MAX_HISTORY)"
        )
    return rec
