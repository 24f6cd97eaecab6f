"""Constrained drafting inside vLLM 0.32: the EAGLE drafter proposes the best *legal* token.

vLLM masks the target with a request's grammar but drafts without it and cuts each round's drafts
at the first illegal one (``structured.py``). For a list request that costs acceptance: a head
trained on free lists proposes repeats and dead prefixes, and a round whose first draft is
illegal verifies no draft at all. This module masks the drafter with the same list constraint,
as the reference engine's constrained chains do. Drafts are only proposals, so output never
changes: the target still verifies every one under the grammar.

Two hooks, both through ``patching.install_hook`` (``SYMBOLS``), acting only on requests whose
structured-output grammar is a padrec list (``structured.is_list_grammar``):

- ``GPUModelRunner.propose_draft_token_ids`` (the CPU runner inherits it): with the padded
  drafter batch (vLLM's default) it runs before the step's bookkeeping with the sampled tokens as
  a tensor, so a request's verified tokens are ``output_token_ids`` plus this step's sampled
  tokens (``-1`` = rejected); with ``disable_padded_drafter_batch`` it runs after bookkeeping with
  a list, and ``output_token_ids`` already holds them. The hook
  brings each row's worker-side ``ListConstraint`` up to those tokens (kept per request id, only
  new tokens accepted; rebuilt when they disagree), hands the row states to the drafter, and
  rolls every state back to the verified tokens after the drafter returns.
- ``EagleProposer._greedy_sample(hidden_states)``: when row states are set and there is one per
  row, the head's logits are masked with each row's legal tokens, the argmax taken, and each
  row's state advanced by its draft, so the next draft step is masked after it.

A row without a state (other requests, placeholders from async scheduling, a token the state
cannot take) drafts as vLLM does. Any other drafter, and heterogeneous-vocabulary or local-argmax
drafting, run vLLM's code unchanged. ``PADREC_VLLM_DRAFT_CONSTRAINT=0`` leaves both hooks out
(vLLM's own drafting under the grammar, for comparison).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import torch

from padrec_vllm.catalog.constraint import ListConstraint, apply_mask, legal_mask
from padrec_vllm.vllm_plugin.patching import install_hook
from padrec_vllm.vllm_plugin.structured import catalog_trie, is_list_grammar, parse_payload

RUNNER_PROPOSE = (
    "vllm.v1.worker.gpu_model_runner", "GPUModelRunner", "propose_draft_token_ids"
)
DRAFT_SAMPLE = ("vllm.v1.spec_decode.eagle", "EagleProposer", "_greedy_sample")
SYMBOLS = (RUNNER_PROPOSE, DRAFT_SAMPLE)
SWITCH_ENV = "PADREC_VLLM_DRAFT_CONSTRAINT"  # "0": do not install the hooks
ROWS_ATTR = "_padrec_draft_states"  # on the drafter: one ListConstraint or None per row
CACHE_ATTR = "_padrec_verified_states"  # on the runner: req_id -> (state, tokens taken)


def _verified_tokens(output_ids: list[int], sampled: list[int] | None) -> list[int] | None:
    """A request's verified tokens at drafting time (``sampled``: this step's tokens when
    bookkeeping has not added them yet); None when a placeholder (-1) is among them."""
    tokens = list(output_ids) + [t for t in (sampled or ()) if t >= 0]
    return None if any(t < 0 for t in output_ids) else tokens


def row_state(cache: dict, req_id: str, params, tokens: list[int]) -> ListConstraint | None:
    """The request's constraint after ``tokens`` (from ``cache`` when it is a prefix of them)."""
    entry = cache.get(req_id)
    try:
        if entry is None or entry[1] > len(tokens):
            catalog_dir, spec = parse_payload(params.grammar)
            entry = (spec.start(catalog_trie(catalog_dir)), 0)
        state, taken = entry
        for tok in tokens[taken:]:
            state.accept(tok)
    except ValueError:  # tokens the state cannot take: this row drafts unmasked
        cache.pop(req_id, None)
        return None
    cache[req_id] = (state, len(tokens))
    return state


def _propose_hook(original: Callable) -> Callable:
    @functools.wraps(original)
    def propose_draft_token_ids(self, scheduler_output, sampled_token_ids, *args, **kwargs):
        drafter = getattr(self, "drafter", None)
        req_ids = list(getattr(self.input_batch, "req_ids", ()))
        structured = [
            getattr(getattr(self.requests.get(r), "sampling_params", None),
                    "structured_outputs", None)
            for r in req_ids
        ]
        if drafter is None or not any(is_list_grammar(s) for s in structured):
            return original(self, scheduler_output, sampled_token_ids, *args, **kwargs)
        cache = self.__dict__.setdefault(CACHE_ATTR, {})
        for gone in set(cache) - set(req_ids):
            del cache[gone]
        # a tensor: before bookkeeping (padded drafter batch); a list: after it
        before = isinstance(sampled_token_ids, torch.Tensor)
        sampled = sampled_token_ids.tolist() if before else None
        rows: list[ListConstraint | None] = []
        for i, (req_id, params) in enumerate(zip(req_ids, structured)):
            tokens = None
            if is_list_grammar(params) and (not before or i < len(sampled)):
                new = sampled[i] if before else None
                tokens = _verified_tokens(self.requests[req_id].output_token_ids, new)
            state = row_state(cache, req_id, params, tokens) if tokens is not None else None
            rows.append(None if state is None or state.is_done() else state)
        marks = [s.checkpoint() if s is not None else 0 for s in rows]
        setattr(drafter, ROWS_ATTR, rows)
        try:
            return original(self, scheduler_output, sampled_token_ids, *args, **kwargs)
        finally:
            setattr(drafter, ROWS_ATTR, None)
            for state, mark in zip(rows, marks):
                if state is not None:
                    state.rollback(mark)

    return propose_draft_token_ids


def _sample_hook(original: Callable) -> Callable:
    @functools.wraps(original)
    def _greedy_sample(self, hidden_states: torch.Tensor) -> torch.Tensor:
        rows = getattr(self, ROWS_ATTR, None)
        plain = (getattr(self, "use_local_argmax_reduction", False)
                 or getattr(self, "use_heterogeneous_vocab", False))
        if not rows or plain or hidden_states.shape[0] != len(rows):
            return original(self, hidden_states)
        logits = self.model.compute_logits(hidden_states)  # [B, V]
        live = [i for i, s in enumerate(rows) if s is not None and not s.is_done()]
        if live:
            legal = [s.allowed() if s is not None and not s.is_done() else None for s in rows]
            logits = apply_mask(logits, legal_mask(legal, logits.shape[-1], logits.device))
        drafts = logits.argmax(dim=-1)  # [B]
        for i, tok in zip(live, drafts[live].tolist()):
            rows[i].accept(tok)
        return drafts

    return _greedy_sample


def install() -> None:
    """Wrap both symbols (idempotent) unless ``SWITCH_ENV`` is "0"; PatchError names a missing
    or changed one."""
    if os.environ.get(SWITCH_ENV, "1") == "0":
        return
    install_hook(RUNNER_PROPOSE, _propose_hook, ("self", "scheduler_output", "sampled_token_ids"))
    install_hook(DRAFT_SAMPLE, _sample_hook, ("self", "hidden_states"))
