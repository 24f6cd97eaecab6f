"""The catalog list constraint inside vLLM 0.32's structured-output path: one narrow hook.

vLLM combines structured output with speculative decoding: the scheduler cuts each request's
drafts at the first token the request's grammar rejects (``validate_tokens``), masks the target
at every draft position and at the bonus position (``fill_bitmask`` between ``accept_tokens`` and
``rollback``), and advances the grammar by the tokens that were kept. Custom V1 logits processors
are refused when speculation is on, so this is the route. vLLM's drafter knows nothing of the
grammar; ``draft_constraint.py`` masks it with the same constraint.

A request asks for a list by sending ``StructuredOutputsParams(grammar=grammar_payload(root,
spec))``: ``MARKER`` then JSON ``{"catalog": <artifacts dir>, "k": .., "exclude": [..]}``. Two
vLLM symbols are wrapped (``install``; both in ``SYMBOLS``, checked like ``step.py``'s):

- ``SamplingParams._validate_structured_outputs`` (front end): a marked grammar is parsed here
  (a malformed one raises vLLM's own validation error, a 400 in vLLM's server) and its backend set
  to ``BACKEND``, so neither xgrammar nor guidance tries to read it as EBNF;
- ``StructuredOutputManager.grammar_init`` (engine core): a marked request gets a ``ListGrammar``
  at once (the catalog's trie is built once per catalog directory and cached); any other request
  goes to vLLM's code unchanged. When no backend exists yet, ``ListBackend`` becomes the manager's
  backend: it allocates vLLM's bitmask (int32 [rows, ceil(V / 32)], -1 = all allowed) and hands
  any unmarked grammar to vLLM's xgrammar backend.

``ListGrammar`` is ``catalog.constraint.ListConstraint`` behind vLLM's ``StructuredOutputGrammar``
interface: ``accept_tokens`` advances (all or nothing), ``validate_tokens`` gives the longest
legal prefix without advancing, ``rollback(n)`` undoes the last n tokens, ``fill_bitmask`` writes
the legal tokens of the current state as bits, ``is_terminated`` once ``<eos>`` is accepted.
"""

from __future__ import annotations

import functools
import json
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from vllm.v1.structured_output.backend_types import (
    StructuredOutputBackend,
    StructuredOutputGrammar,
    StructuredOutputOptions,
)

from padrec_vllm.catalog.catalog import Catalog
from padrec_vllm.catalog.constraint import CatalogTrie, ListSpec
from padrec_vllm.vllm_plugin.patching import PatchError, install_hook

MARKER = "padrec-list:"
BACKEND = "padrec-list"
FRONTEND_VALIDATE = ("vllm.sampling_params", "SamplingParams", "_validate_structured_outputs")
GRAMMAR_INIT = ("vllm.v1.structured_output", "StructuredOutputManager", "grammar_init")
SYMBOLS = (FRONTEND_VALIDATE, GRAMMAR_INIT)


def grammar_payload(catalog_dir: Path, spec: ListSpec) -> str:
    """The ``StructuredOutputsParams.grammar`` string that asks for ``spec``'s list."""
    return MARKER + json.dumps({"catalog": str(Path(catalog_dir).resolve()), **spec.to_json()})


def parse_payload(text: str) -> tuple[Path, ListSpec]:
    """(catalog dir, spec) of a marked grammar string; ValueError naming what is wrong."""
    try:
        data = json.loads(text[len(MARKER):])
    except json.JSONDecodeError as exc:
        raise ValueError(f"padrec list grammar is not JSON: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("catalog"), str):
        raise ValueError("padrec list grammar needs a 'catalog' directory")
    return Path(data["catalog"]), ListSpec.from_json(data)


def is_list_grammar(params) -> bool:
    """True when vLLM ``StructuredOutputsParams`` carry a padrec list payload."""
    grammar = getattr(params, "grammar", None)
    return isinstance(grammar, str) and grammar.startswith(MARKER)


_tries: dict[Path, CatalogTrie] = {}
_tries_lock = threading.Lock()


def catalog_trie(catalog_dir: Path) -> CatalogTrie:
    """The trie of the catalog in ``catalog_dir``, built once per process."""
    with _tries_lock:
        if catalog_dir not in _tries:
            _tries[catalog_dir] = CatalogTrie.from_catalog(Catalog.load(catalog_dir))
        return _tries[catalog_dir]


class ListGrammar(StructuredOutputGrammar):
    """One request's list constraint as a vLLM grammar (module docstring)."""

    def __init__(self, trie: CatalogTrie, spec: ListSpec):
        self.trie, self.spec = trie, spec
        self.state = spec.start(trie)

    def accept_tokens(self, request_id: str, tokens: list[int]) -> bool:
        cp = self.state.checkpoint()
        try:
            for tok in tokens:
                self.state.accept(tok)
        except ValueError:
            self.state.rollback(cp)
            return False
        return True

    def validate_tokens(self, tokens: list[int]) -> list[int]:
        cp, kept = self.state.checkpoint(), []
        try:
            for tok in tokens:
                self.state.accept(tok)
                kept.append(tok)
        except ValueError:
            pass
        self.state.rollback(cp)
        return kept

    def rollback(self, num_tokens: int) -> None:
        self.state.rollback(self.state.checkpoint() - num_tokens)

    def fill_bitmask(self, bitmask: torch.Tensor, batch_index: int) -> None:
        ids = self.state.allowed()  # int64 [n]
        row = np.zeros(bitmask.shape[1], np.uint32)  # [words]
        np.bitwise_or.at(row, ids >> 5, np.left_shift(np.uint32(1), (ids & 31).astype(np.uint32)))
        bitmask[batch_index].copy_(torch.from_numpy(row.view(np.int32)))

    def is_terminated(self) -> bool:
        return self.state.is_done()

    def reset(self) -> None:
        self.state = self.spec.start(self.trie)


class ListBackend(StructuredOutputBackend):
    """vLLM's structured-output backend when the first request is a padrec list (docstring)."""

    _fallback: StructuredOutputBackend | None = None

    def compile_grammar(
        self,
        request_type: StructuredOutputOptions,
        grammar_spec: str,
        stop_token_ids: set[int] | None = None,
    ) -> StructuredOutputGrammar:
        if request_type == StructuredOutputOptions.GRAMMAR and grammar_spec.startswith(MARKER):
            catalog_dir, spec = parse_payload(grammar_spec)
            return ListGrammar(catalog_trie(catalog_dir), spec)
        if self._fallback is None:
            from vllm.v1.structured_output.backend_xgrammar import XgrammarBackend

            self._fallback = XgrammarBackend(
                self.vllm_config, tokenizer=self.tokenizer, vocab_size=self.vocab_size
            )
        return self._fallback.compile_grammar(request_type, grammar_spec, stop_token_ids)

    def allocate_token_bitmask(self, max_num_seqs: int) -> torch.Tensor:
        return torch.full((max_num_seqs, (self.vocab_size + 31) // 32), -1, dtype=torch.int32)

    def destroy(self) -> None:
        if self._fallback is not None:
            self._fallback.destroy()


def _validate_hook(original: Callable) -> Callable:
    @functools.wraps(original)
    def _validate_structured_outputs(self, model_config, structured_outputs_config, tokenizer):
        params = self.structured_outputs
        if structured_outputs_config is None or not is_list_grammar(params):
            return original(self, model_config, structured_outputs_config, tokenizer)
        from vllm.exceptions import VLLMValidationError

        try:
            catalog_dir, _ = parse_payload(params.grammar)
        except ValueError as exc:
            raise VLLMValidationError(str(exc)) from exc
        if not catalog_dir.is_dir():
            raise VLLMValidationError(f"padrec list grammar: no catalog directory {catalog_dir}")
        params._backend, params._backend_was_auto = BACKEND, True

    return _validate_structured_outputs


def _grammar_init_hook(original: Callable) -> Callable:
    @functools.wraps(original)
    def grammar_init(self, request):
        structured = request.structured_output_request
        if structured is None or not is_list_grammar(structured.params):
            return original(self, request)
        if self.backend is None:
            self.backend = ListBackend(
                self.vllm_config,
                tokenizer=self.tokenizer,
                vocab_size=self.vllm_config.model_config.get_vocab_size(),
            )
        try:
            catalog_dir, spec = parse_payload(structured.params.grammar)
            structured.grammar = ListGrammar(catalog_trie(catalog_dir), spec)
        except Exception as exc:  # noqa: BLE001 - vLLM fails this request only, as for xgrammar
            from concurrent.futures import Future

            failed: Future = Future()
            failed.set_exception(exc)
            structured.grammar = failed

    return grammar_init


def install() -> None:
    """Wrap both symbols (idempotent). Raises PatchError naming any missing or changed one."""
    install_hook(FRONTEND_VALIDATE, _validate_hook,
                 ("self", "model_config", "structured_outputs_config", "tokenizer"))
    install_hook(GRAMMAR_INIT, _grammar_init_hook, ("self", "request"))


__all__ = ["BACKEND", "MARKER", "PatchError", "SYMBOLS", "grammar_payload", "install"]
