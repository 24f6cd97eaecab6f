"""The shared token format (one code range for every SID level) and slots from positions.

Claims checked:
- layout, tokenizer and catalog round trips in the shared format; old layouts load as per-level;
- slot from position equals the true slot (read off the sequence's grammar, not its positions)
  for every token of prompt + completion, for mixed history lengths, empty included;
- the list constraint gives the same legal (level, code) choices in both formats;
- the decoding form of a shared-format head equals its definition, and in the reference
  engine's decoding path every head input gets its true slot;
- lossless on a shared tiny build: speculative decoding (eagle and padrec heads, chains and
  trees) equals plain constrained greedy, token for token;
- a head trained for the other format is refused by the artifacts check.
"""

from __future__ import annotations

import json
import random
import shutil

import numpy as np
import pytest
import torch

from build_users import build_users  # noqa: E402  (tests/build_users.py)
from padrec_vllm.artifacts import ArtifactPaths
from padrec_vllm.artifacts_check import check_artifacts
from padrec_vllm.catalog.catalog import LAYOUT_FILE, Catalog
from padrec_vllm.catalog.constraint import CatalogTrie, ListSpec
from padrec_vllm.catalog.tokenizer import build_tokenizer
from padrec_vllm.catalog.tokens import (
    BOS_ID,
    EOS_ID,
    FROM_POSITION,
    PAD_ID,
    REC_ID,
    SEP_ID,
    SHARED,
    SlotRule,
    TokenLayout,
)
from padrec_vllm.decoding import generate
from padrec_vllm.decoding.tree import TreeSpec
from padrec_vllm.errors import UserError
from padrec_vllm.eval.evaluate import max_new_tokens
from padrec_vllm.model.config import HeadConfig
from padrec_vllm.model.decoding_head import decoding_head
from padrec_vllm.model.head import DraftHead
from padrec_vllm.model.head_checkpoint import load_head, save_head
from padrec_vllm.model.target import load_target
from padrec_vllm.presets import get_preset
from tiny_models import assert_close_to_rounding

SHARED_LAYOUT = TokenLayout((8, 8, 8, 3), SHARED)


def grammar_slots(seq: list[int], num_levels: int) -> list[int]:
    """The true slot of every token, from the sequence's grammar alone: an item's tokens are
    levels 0..L-1 counted from the last special or ``<sep>``; ``<sep>`` is L; ``<bos> <rec>
    <eos> <pad>`` are L + 1."""
    out, level = [], 0
    for t in seq:
        if t in (PAD_ID, BOS_ID, REC_ID, EOS_ID):
            out.append(num_levels + 1)
            level = 0
        elif t == SEP_ID:
            out.append(num_levels)
            level = 0
        else:
            out.append(level)
            level += 1
    return out


def random_catalog(layout: TokenLayout, num_items: int, seed: int) -> Catalog:
    rng = random.Random(seed)
    sids: set[tuple[int, ...]] = set()
    while len(sids) < num_items:
        sids.add(tuple(rng.randrange(s) for s in layout.codebook_sizes))
    return Catalog(layout, {i + 1: sid for i, sid in enumerate(sorted(sids))})


# --- layout, tokenizer, catalog ---------------------------------------------------------------


def test_shared_layout_has_one_code_range():
    lay = SHARED_LAYOUT
    assert lay.vocab_size == 5 + 8 and lay.num_slots == 6 and lay.tokens_per_item == 5
    assert lay.sid_to_ids((3, 3, 7, 2)) == [8, 8, 12, 7]  # the same code, the same id
    assert lay.token_strings()[5:] == [f"<code_{c}>" for c in range(8)]
    assert lay.token_strings_of((3, 0, 7, 2)) == ["<code_3>", "<code_0>", "<code_7>", "<code_2>"]
    with pytest.raises(ValueError, match="out of range"):
        lay.token_id(3, 3)  # the collision level has 3 codes
    assert lay.slot_table() == [5, 5, 5, 5, 4] + [FROM_POSITION] * 8
    rule = lay.slot_rule()
    assert (rule.kind, rule.period, rule.offset, rule.num_slots) == ("position", 5, 1, 6)
    assert TokenLayout((8, 8, 8, 3)).slot_rule().kind == "token"


def test_layout_round_trip_and_old_layouts_load_as_per_level(tmp_path):
    SHARED_LAYOUT.save(tmp_path / "shared.json")
    assert TokenLayout.load(tmp_path / "shared.json") == SHARED_LAYOUT
    old = {"codebook_sizes": [8, 8, 8, 3], "vocab_size": 32, "num_slots": 6}
    assert TokenLayout.from_dict(old) == TokenLayout((8, 8, 8, 3))
    assert TokenLayout.from_dict(old).token_format == "per-level"


def test_shared_tokenizer_round_trip():
    tok = build_tokenizer(SHARED_LAYOUT)
    ids = [BOS_ID, *SHARED_LAYOUT.sid_to_ids((1, 7, 0, 2)), REC_ID, EOS_ID]
    assert tok.encode(tok.decode(ids), add_special_tokens=False) == ids
    assert tok.encode("<code_1><code_7>", add_special_tokens=False) == ids[1:3]
    assert tok.convert_ids_to_tokens(list(range(13))) == SHARED_LAYOUT.token_strings()


def test_shared_catalog_round_trip(tmp_path):
    cat = random_catalog(SHARED_LAYOUT, 60, seed=1)
    cat.save(tmp_path)
    loaded = Catalog.load(tmp_path)
    assert loaded.layout == SHARED_LAYOUT and loaded.item_to_sid == cat.item_to_sid
    raw = json.loads((tmp_path / LAYOUT_FILE).read_text())
    assert raw["token_format"] == "shared" and raw["slot_period"] == 5
    items = [4, 9, 17]
    tokens = loaded.completion_ids(items, finished=True)
    assert loaded.parse(tokens).items == tuple(items) and loaded.parse(tokens).finished
    for item in cat.item_to_sid:  # item -> tokens -> item
        assert loaded.parse(loaded.item_token_ids(item)).items == (item,)


@pytest.mark.parametrize("history", [[], [5], [3, 8, 1], list(range(1, 12))])
def test_slot_from_position_is_the_true_slot(history):
    """Every token of prompt + completion, mixed history lengths (empty, truncated)."""
    cat = random_catalog(SHARED_LAYOUT, 30, seed=2)
    prompt = cat.prompt_ids(history, max_history=5)
    seq = prompt + cat.completion_ids([2, 29, 7], finished=True)
    rule = SHARED_LAYOUT.slot_rule()
    assert prompt[-1] == REC_ID and len(prompt) % 5 == 1  # 1 + n (L + 1) tokens
    assert rule.sequence_slots(seq) == grammar_slots(seq, 4)
    completion = seq[len(prompt):]
    assert [rule.completion_slot(j, t) for j, t in enumerate(completion)] == \
        grammar_slots(seq, 4)[len(prompt):]
    # the per-level format keeps its prompt and its by-id slots
    per_level = Catalog(TokenLayout((8, 8, 8, 3)), cat.item_to_sid)
    seq = per_level.prompt_ids(history, 5) + per_level.completion_ids([2, 29, 7], True)
    assert [per_level.layout.slot_table()[t] for t in seq] == grammar_slots(seq, 4)


def test_slot_rule_checkpoint_fields_round_trip():
    rule = SHARED_LAYOUT.slot_rule()
    assert SlotRule.from_config_fields(rule.config_fields(), 6) == rule
    per_level = TokenLayout((8, 8, 8, 3)).slot_rule()
    old = {"padrec_slot_of_token": list(per_level.table)}  # a checkpoint from before
    assert SlotRule.from_config_fields(old, 6) == per_level
    no_period = {"padrec_slot_of_token": list(rule.table), "padrec_slot_rule": "position"}
    with pytest.raises(ValueError, match="padrec_slot_period"):
        SlotRule.from_config_fields(no_period, 6)


# --- constraint -------------------------------------------------------------------------------


def _codes(layout: TokenLayout, level: int, tokens: np.ndarray) -> list:
    return sorted(t if t in (SEP_ID, EOS_ID) else (level, int(t) - layout.level_offset(level))
                  for t in tokens.tolist())


def test_constraint_gives_the_same_choices_in_both_formats():
    """The same SIDs in both formats: at every step of random lists the legal (level, code)
    choices agree, though shared ids repeat across levels."""
    shared = random_catalog(SHARED_LAYOUT, 80, seed=3)
    per_level = Catalog(TokenLayout((8, 8, 8, 3)), shared.item_to_sid)
    tries = CatalogTrie.from_catalog(shared), CatalogTrie.from_catalog(per_level)
    rng = random.Random(4)
    for _ in range(20):
        spec = ListSpec(k=rng.randrange(1, 6), exclude=tuple(rng.sample(range(1, 81), 10)))
        states = spec.start(tries[0]), spec.start(tries[1])
        level = 0
        while not states[0].is_done():
            a, b = (s.allowed() for s in states)
            assert _codes(SHARED_LAYOUT, level, a) == _codes(per_level.layout, level, b)
            pick = rng.randrange(len(a))
            choice = _codes(SHARED_LAYOUT, level, a)[pick]
            for state, cat in zip(states, (shared, per_level)):
                tok = choice if isinstance(choice, int) else cat.layout.token_id(*choice)
                state.accept(tok)
            level = 0 if isinstance(choice, int) else level + 1
        assert states[0].items == states[1].items and states[1].is_done()
        assert not set(states[0].items) & set(spec.exclude)


# --- the head ---------------------------------------------------------------------------------


def _shared_head(kind: str = "padrec", **switches) -> DraftHead:
    from tiny_models import tiny_target

    target = tiny_target()
    cfg = HeadConfig.from_target(target.config, kind, num_slots=6, num_steps=3, **switches)
    codes = target.config.vocab_size - 5  # a shared vocabulary of the tiny target's size
    head = DraftHead(cfg, TokenLayout((codes,) * 4, SHARED).slot_rule())
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in head.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return head.eval(), target


@pytest.mark.parametrize("switches", [{}, {"use_gate": False}, {"use_step_emb": False}],
                         ids=["full", "no_gate", "no_step"])
def test_shared_head_decoding_form_matches_definition(switches):
    head, target = _shared_head(**switches)
    embed = target.get_input_embeddings()
    dec = decoding_head(head, target)
    assert dec.fold.slot_rows is not None  # the item term is added by slot, not folded by token
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, head.config.vocab_size, (2, 9), generator=gen)  # [B, T]
    feats = torch.randn(2, 9, head.config.hidden_size, generator=gen)  # [B, T, H]
    pos = torch.arange(9).expand(2, 9)  # [B, T]
    h = head.config.hidden_size
    sums = 2 * h + h + 16 + 16 + h + h + 2 * h  # as in test_heads
    # the slot term matters: the same weights with by-id slots (all 0) give other outputs
    by_id = DraftHead(head.config, torch.zeros(head.config.vocab_size, dtype=torch.long))
    by_id.load_state_dict(head.state_dict())
    by_id = decoding_head(by_id.eval(), target)
    with torch.no_grad():
        for step in (1, 2):
            want = head(ids, feats, pos, step=step, embed=embed, cache=head.new_cache(2, 16))
            got = dec(ids, feats, pos, step=step, embed=embed, cache=dec.new_cache(2, 16))
            assert_close_to_rounding(got, want, sums)
            wrong = by_id(ids, feats, pos, step=step, embed=embed, cache=by_id.new_cache(2, 16))
            assert float((wrong - want).abs().max()) > 100 * float((got - want).abs().max())
            cache = dec.new_cache(1, 16)  # one token at a time: the int path
            for p in range(9):
                one = dec(ids[:1, p:p + 1], feats[:1, p:p + 1], pos[:1, p:p + 1], step=step,
                          embed=embed, cache=cache)
                assert_close_to_rounding(one[0, 0], want[0, p], sums)


def test_shared_head_checkpoint_round_trip(tmp_path):
    head, _ = _shared_head()
    save_head(head, tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw["padrec_token_format"] == "shared" and raw["padrec_slot_rule"] == "position"
    assert (raw["padrec_slot_period"], raw["padrec_slot_offset"]) == (5, 1)
    loaded = load_head(tmp_path)
    assert loaded.slot_rule == head.slot_rule and loaded.by_position


# --- the tiny shared build --------------------------------------------------------------------


@pytest.fixture(scope="module")
def shared_setup(tiny_shared_artifacts, synth_data_dir):
    b = build_users(tiny_shared_artifacts, synth_data_dir)
    paths, preset, catalog = b.paths, b.preset, b.catalog
    prompts = b.prompts[:24]
    prompts += [catalog.prompt_ids([], preset.history)]  # an empty history too
    target = load_target(paths.target, dtype=torch.float32)
    return paths, preset, catalog, prompts, target


def test_shared_build_is_shared_and_checks(shared_setup):
    paths, _, catalog, prompts, target = shared_setup
    assert catalog.layout.shared and target.config.vocab_size == catalog.layout.vocab_size
    assert paths.read_build_info()["token_format"] == "shared"
    assert check_artifacts(paths.root, ["eagle", "padrec"]).shared
    assert all(len(p) % catalog.layout.tokens_per_item == 1 for p in prompts)


@pytest.mark.parametrize("head_name", ["eagle", "padrec"])
@pytest.mark.parametrize("tree", [None, TreeSpec(nodes=6)], ids=["chain", "tree"])
def test_lossless_on_the_shared_format(shared_setup, head_name, tree):
    paths, preset, catalog, prompts, target = shared_setup
    trie = CatalogTrie.from_catalog(catalog)
    limit = max_new_tokens(catalog, preset.list_len)
    plain = generate(target, prompts, max_new_tokens=limit, eos_id=EOS_ID, batch_size=8,
                     constraints=[ListSpec(preset.list_len).start(trie) for _ in prompts])
    head = decoding_head(load_head(paths.head(head_name), dtype=torch.float32), target)
    if head_name == "padrec":
        assert head.by_position
    spec = generate(target, prompts, max_new_tokens=limit, eos_id=EOS_ID, batch_size=8,
                    head=head, tree=tree,
                    constraints=[ListSpec(preset.list_len).start(trie) for _ in prompts])
    assert [r.tokens for r in spec] == [r.tokens for r in plain]
    assert sum(a for r in spec for a, _ in r.accept_by_pos) > 0
    slots = {s for r in spec for s in r.accept_by_slot}
    assert slots <= set(range(catalog.layout.num_slots)) and 0 in slots


class _Recorder:
    """A drafter that records every call's (input ids, positions, slots) and forwards it."""

    def __init__(self, head):
        self.head, self.calls = head, []

    def __getattr__(self, name):
        return getattr(self.head, name)

    def __call__(self, input_ids, features, position_ids, **kw):
        slots = self.head._item_index(input_ids, position_ids)
        self.calls.append((input_ids.clone(), position_ids.clone(), slots.clone()))
        return self.head(input_ids, features, position_ids, **kw)


def test_reference_decoding_gives_every_head_input_its_true_slot(shared_setup):
    """One request at a time, chains under the constraint: every head input that is a token of
    the final sequence (verified or accepted) got that token's true slot, and every position of
    the sequence was fed to the head."""
    paths, preset, catalog, prompts, target = shared_setup
    trie = CatalogTrie.from_catalog(catalog)
    limit = max_new_tokens(catalog, preset.list_len)
    head = decoding_head(load_head(paths.head("padrec"), dtype=torch.float32), target)
    for prompt in prompts[:6] + prompts[-1:]:
        rec = _Recorder(head)
        out = generate(target, [prompt], max_new_tokens=limit, eos_id=EOS_ID, batch_size=1,
                       head=rec, constraints=[ListSpec(preset.list_len).start(trie)])
        seq = prompt + out[0].tokens
        truth = grammar_slots(seq, catalog.layout.num_levels)
        seen = set()
        for ids, pos, slots in rec.calls:
            for t, p, s in zip(ids.flatten().tolist(), pos.flatten().tolist(),
                               slots.flatten().tolist()):
                if p + 1 < len(seq) and seq[p + 1] == t:  # the input at p is x_{p+1}
                    assert s == truth[p + 1], (p, t)
                    seen.add(p)
        # the whole prompt (prefill feeds every position) and every slot of the completion
        # (tokens emitted by the last round never reach the head)
        assert seen >= set(range(len(prompt) - 1)), sorted(set(range(len(prompt) - 1)) - seen)
        completion_slots = {truth[p + 1] for p in seen if p + 1 >= len(prompt)}
        assert completion_slots >= set(range(catalog.layout.num_levels + 1)), completion_slots


def test_head_of_the_other_format_is_refused(shared_setup, tmp_path):
    paths, *_ = shared_setup
    copy = tmp_path / "build"
    shutil.copytree(paths.root, copy)
    cfg_file = ArtifactPaths(copy).head("padrec") / "config.json"
    raw = json.loads(cfg_file.read_text())
    raw["padrec_token_format"] = "per-level"
    cfg_file.write_text(json.dumps(raw))
    with pytest.raises(UserError, match="a head for the per-level token format"):
        check_artifacts(copy, ["padrec"])


# --- plumbing ---------------------------------------------------------------------------------


def test_cli_prepare_writes_the_shared_format(synth_data_dir, tmp_path):
    from padrec_vllm.cli import build_parser, main

    parser = build_parser()
    args = ["--dataset", "x", "--out", "o"]
    assert parser.parse_args(["build", *args]).token_format == "per-level"
    assert parser.parse_args(["build", *args, "--token-format", "shared"]).token_format == "shared"
    from synthetic import NAME

    out = tmp_path / "prep"
    main(["prepare", "--dataset", NAME, "--data-dir", str(synth_data_dir), "--preset", "tiny",
          "--out", str(out), "--embedding", "attributes", "--token-format", "shared"])
    cat = Catalog.load(out)
    assert cat.layout.shared and cat.layout.vocab_size == 5 + cat.layout.num_codes
    tok = json.loads((out / "tokenizer" / "tokenizer.json").read_text())["model"]["vocab"]
    assert tok == {s: i for i, s in enumerate(cat.layout.token_strings())}


def test_build_refuses_to_switch_format_in_place(synth_data_dir, tmp_path):
    from padrec_vllm.pipeline import build
    from synthetic import NAME

    ArtifactPaths(tmp_path).write_build_info({"dataset": NAME, "preset": "tiny", "seed": 0,
                                              "timings_s": {}})  # an older per-level build
    with pytest.raises(UserError, match="holds a per-level build"):
        build(NAME, get_preset("tiny"), tmp_path, data_dir=str(synth_data_dir),
              token_format="shared")
