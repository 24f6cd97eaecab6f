"""The list constraint as vLLM's structured-output grammar (``vllm_plugin.structured``), without
an engine: the grammar follows ``ListConstraint`` exactly, its bitmask is the legal set, the
front-end hook refuses malformed payloads with vLLM's own validation error, and the vLLM code it
relies on is pinned (an engine run is in test_vllm_bench.py and test_server_vllm.py)."""

from __future__ import annotations

import inspect
import json
import random

import pytest
import torch

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

from padrec_vllm.catalog.constraint import ListSpec, allowed_mask  # noqa: E402
from padrec_vllm.catalog.tokens import TokenLayout  # noqa: E402
from padrec_vllm.vllm_plugin import structured  # noqa: E402
from test_constraint import random_catalog  # noqa: E402

LAYOUT = TokenLayout((4, 3, 2))


@pytest.fixture(scope="module")
def catalog_dir(tmp_path_factory):
    cat = random_catalog(5, 18, LAYOUT)
    out = tmp_path_factory.mktemp("catalog")
    cat.save(out)
    return out


def unpack(row: torch.Tensor, vocab: int) -> list[int]:
    """Token ids whose bit is set in one int32 bitmask row."""
    bits = [(int(w) >> b) & 1 for w in row.tolist() for b in range(32)]
    return [t for t in range(vocab) if bits[t]]


def test_payload_round_trip_and_errors(catalog_dir):
    spec = ListSpec(3, (100, 107))
    text = structured.grammar_payload(catalog_dir, spec)
    assert text.startswith(structured.MARKER)
    assert structured.parse_payload(text) == (catalog_dir.resolve(), spec)
    for bad, needle in [("{", "not JSON"), ('{"k": 2}', "catalog"),
                        ('{"catalog": "x", "k": 0}', "k >= 1"),
                        ('{"catalog": "x", "k": 2, "exclude": "a"}', "exclude")]:
        with pytest.raises(ValueError, match=needle):
            structured.parse_payload(structured.MARKER + bad)


def test_grammar_follows_the_constraint(catalog_dir):
    """Random walks of legal tokens with rejected drafts and rollbacks: the grammar's answers
    and bitmask rows equal a ListConstraint driven the same way."""
    trie = structured.catalog_trie(catalog_dir.resolve())
    assert structured.catalog_trie(catalog_dir.resolve()) is trie  # built once per process
    vocab = LAYOUT.vocab_size + 5  # vLLM's vocabulary may be padded past the layout's
    backend = structured.ListBackend(None, tokenizer=None, vocab_size=vocab)
    rng = random.Random(0)
    for trial in range(20):
        spec = ListSpec(rng.randint(1, 6), tuple(rng.sample(trie.item_ids.tolist(), 3)))
        from vllm.v1.structured_output.backend_types import StructuredOutputOptions

        grammar = backend.compile_grammar(
            StructuredOutputOptions.GRAMMAR, structured.grammar_payload(catalog_dir, spec)
        )
        mirror = spec.start(trie)
        bitmask = backend.allocate_token_bitmask(2)
        while not grammar.is_terminated():
            grammar.fill_bitmask(bitmask, 1)
            legal = mirror.allowed().tolist()
            assert unpack(bitmask[1], vocab) == legal
            assert allowed_mask([mirror], vocab)[0].nonzero().flatten().tolist() == legal
            # a draft of two legal tokens and one illegal: validate keeps the legal prefix
            cp, draft = mirror.checkpoint(), []
            for _ in range(2):
                if mirror.is_done():
                    break
                draft.append(rng.choice(mirror.allowed().tolist()))
                mirror.accept(draft[-1])
            mirror.rollback(cp)
            assert grammar.validate_tokens(draft + [-7]) == draft
            assert not grammar.accept_tokens("r", draft + [-7])  # all or nothing
            assert grammar.accept_tokens("r", draft)
            grammar.rollback(len(draft))
            tok = rng.choice(legal)
            assert grammar.accept_tokens("r", [tok])
            mirror.accept(tok)
        assert mirror.is_done() and len(mirror.items) == min(spec.k, len(trie.item_ids) - 3)
        grammar.reset()
        assert not grammar.is_terminated()


def test_frontend_hook_refuses_bad_payloads(catalog_dir):
    from vllm.exceptions import VLLMValidationError
    from vllm.sampling_params import SamplingParams, StructuredOutputsParams

    import padrec_vllm.vllm_plugin as plugin

    plugin.register()
    config = type("StructuredOutputsConfig", (), {"backend": "auto"})()

    def validate(grammar: str) -> StructuredOutputsParams:
        params = SamplingParams(structured_outputs=StructuredOutputsParams(grammar=grammar))
        params._validate_structured_outputs(None, config, tokenizer=object())
        return params.structured_outputs

    ok = validate(structured.grammar_payload(catalog_dir, ListSpec(2)))
    assert ok._backend == structured.BACKEND
    with pytest.raises(VLLMValidationError, match="k >= 1"):
        validate(structured.MARKER + json.dumps({"catalog": str(catalog_dir), "k": 0}))
    with pytest.raises(VLLMValidationError, match="no catalog directory"):
        validate(structured.grammar_payload(catalog_dir / "missing", ListSpec(2)))


def test_vllm_structured_output_code_is_as_pinned():
    """The scheduler's use of a grammar that the hooks rely on (vLLM 0.32.0 source)."""
    from vllm.v1.structured_output import StructuredOutputManager

    import padrec_vllm.vllm_plugin as plugin

    plugin.register()
    init = inspect.getsource(StructuredOutputManager.grammar_init.__wrapped__)
    assert "request.structured_output_request.grammar = grammar" in init
    masks = inspect.getsource(StructuredOutputManager.grammar_bitmask)
    assert "self.backend.allocate_token_bitmask(" in masks
    assert "grammar.rollback(state_advancements)" in masks
    validate = inspect.getsource(StructuredOutputManager.validate_tokens)
    assert "grammar.validate_tokens(" in validate


# --- the drafter under the constraint (``vllm_plugin.draft_constraint``) -----------------------


def test_row_state_follows_verified_tokens(catalog_dir):
    from padrec_vllm.vllm_plugin import draft_constraint as dc
    from vllm.sampling_params import StructuredOutputsParams

    trie = structured.catalog_trie(catalog_dir.resolve())
    spec = ListSpec(3)
    params = StructuredOutputsParams(grammar=structured.grammar_payload(catalog_dir, spec))
    walk = spec.start(trie)
    tokens = []
    for _ in range(2 * (LAYOUT.num_levels + 1)):
        tokens.append(int(walk.allowed()[0]))
        walk.accept(tokens[-1])
    cache: dict = {}
    state = dc.row_state(cache, "r", params, tokens[:3])
    assert cache["r"] == (state, 3)
    assert dc.row_state(cache, "r", params, tokens) is state  # extended, not rebuilt
    assert state.allowed().tolist() == walk.allowed().tolist() and state.items == walk.items
    assert dc.row_state(cache, "r", params, tokens[:2]) is not state  # shorter: rebuilt
    assert dc.row_state(cache, "r", params, tokens + [tokens[0]] * 9) is None  # illegal
    assert "r" not in cache
    assert dc._verified_tokens([5, 6], [7, -1, -1]) == [5, 6, 7]
    assert dc._verified_tokens([5, -1], [7]) is None  # async-scheduling placeholder


def test_drafter_picks_the_best_legal_token(catalog_dir):
    """The hooked ``_greedy_sample`` on a stand-in proposer whose head prefers illegal tokens:
    rows with a state draft legal tokens and advance; a row without one drafts as vLLM does."""
    from types import SimpleNamespace

    from padrec_vllm.vllm_plugin import draft_constraint as dc

    trie = structured.catalog_trie(catalog_dir.resolve())
    vocab = LAYOUT.vocab_size
    prefer = torch.arange(vocab, dtype=torch.float32)  # highest ids win: specials, last level
    calls = []

    def original(self, hidden_states):
        calls.append(hidden_states.shape[0])
        return self.model.compute_logits(hidden_states).argmax(dim=-1)

    proposer = SimpleNamespace(
        model=SimpleNamespace(compute_logits=lambda h: prefer.expand(h.shape[0], vocab).clone())
    )
    sample = dc._sample_hook(original)
    state = ListSpec(2).start(trie)
    setattr(proposer, dc.ROWS_ATTR, [state, None])
    hidden = torch.zeros(2, 4)
    for _ in range(LAYOUT.num_levels + 1):
        legal = state.allowed().tolist()
        drafts = sample(proposer, hidden).tolist()
        assert drafts[0] == max(legal) and drafts[1] == vocab - 1
    assert len(state.items) == 1 and not calls  # the masked path never fell back
    setattr(proposer, dc.ROWS_ATTR, [state])  # one state for two rows: vLLM's code
    assert sample(proposer, hidden).tolist() == [vocab - 1, vocab - 1] and calls == [2]


def test_vllm_drafting_code_is_as_pinned():
    """Where the propose hook relies on vLLM 0.32.0: the padded drafter batch proposes from the
    sampled-token tensor before bookkeeping adds those tokens to ``output_token_ids``, and
    greedy drafts come from ``_greedy_sample``."""
    from vllm.v1.spec_decode.llm_base_proposer import SpecDecodeBaseProposer
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    import padrec_vllm.vllm_plugin as plugin

    plugin.register()
    src = inspect.getsource(GPUModelRunner.sample_tokens)
    tensor = src.index("sampled_token_ids = sampler_output.sampled_token_ids")
    call = src.index("propose_draft_token_ids(sampled_token_ids)", tensor)
    assert call < src.index("self._bookkeeping_sync(")
    assert "draft_after_bookkeeping = True" in src
    sample = inspect.getsource(SpecDecodeBaseProposer._sample_draft_tokens)
    assert "return self._greedy_sample(hidden_states), None" in sample
