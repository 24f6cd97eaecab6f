"""Semantic IDs, token layout, tokenizer and catalog parsing."""

from __future__ import annotations

import json

import numpy as np
import pytest

from padrec_vllm.catalog.catalog import Catalog
from padrec_vllm.catalog.prepare import build_catalog
from padrec_vllm.catalog.rq import QuantiserConfig, add_collision_level, residual_kmeans
from padrec_vllm.catalog.tokenizer import build_tokenizer
from padrec_vllm.catalog.tokens import BOS_ID, EOS_ID, REC_ID, SEP_ID, TokenLayout
from padrec_vllm.data.s3rec import load_dataset
from synthetic import NAME

QCFG = QuantiserConfig(levels=3, codebook_size=8, iters=20, seed=0)


def test_layout_slots_are_a_function_of_the_id():
    layout = TokenLayout((8, 8, 8, 3))
    table = layout.slot_table()
    assert len(table) == layout.vocab_size == 5 + 27
    assert table[SEP_ID] == layout.sep_slot == 4
    assert {table[i] for i in (0, 1, 2, 3)} == {layout.special_slot}
    for tid in range(layout.vocab_size):
        slot, code = layout.decode_id(tid)
        assert table[tid] == slot
        if code >= 0:
            assert layout.token_id(slot, code) == tid
    strings = layout.token_strings()
    assert strings[layout.token_id(0, 7)] == "<a_7>" and strings[layout.token_id(3, 2)] == "<d_2>"


def test_collision_level_makes_codes_unique():
    codes = np.array([[1, 2, 3], [1, 2, 3], [0, 0, 0], [1, 2, 3]])
    full = add_collision_level(codes)
    assert full[:, -1].tolist() == [0, 1, 0, 2]
    assert len({tuple(r) for r in full.tolist()}) == 4


def test_sids_unique_and_deterministic(synth_data_dir):
    ds = load_dataset(NAME, synth_data_dir)
    cat1, rep1 = build_catalog(ds, QCFG, "attributes")
    cat2, _ = build_catalog(ds, QCFG, "attributes")
    assert cat1.item_to_sid == cat2.item_to_sid
    sids = list(cat1.item_to_sid.values())
    assert len(set(sids)) == len(sids) == ds.num_items
    assert all(len(s) == cat1.layout.num_levels == 4 for s in sids)
    assert (
        rep1.num_items == ds.num_items
        and rep1.max_collision_depth == cat1.layout.codebook_sizes[-1]
    )


def test_text_embeddings_give_unique_sids(synth_data_dir):
    ds = load_dataset(NAME, synth_data_dir)
    cat, rep = build_catalog(ds, QCFG, "auto")
    assert rep.embedding == "text"
    assert len(set(cat.item_to_sid.values())) == ds.num_items


def test_auto_method_falls_back_without_titles(tmp_path):
    from padrec_vllm.catalog.embed import choose_method
    from synthetic import write_synthetic

    no_meta = load_dataset(NAME, write_synthetic(tmp_path, with_meta=False))
    assert choose_method(no_meta) == "attributes"  # attribute names exist but no titles
    bare = type(no_meta)(
        name="x", sequences=no_meta.sequences, num_items=no_meta.num_items, item_attributes={}
    )
    assert choose_method(bare) == "cooccurrence"


def test_residual_kmeans_levels_reduce_error():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(200, 16)).astype(np.float32)
    codes = residual_kmeans(emb, QuantiserConfig(levels=2, codebook_size=8, seed=1))
    assert codes.shape == (200, 2) and codes.min() >= 0 and codes.max() < 8


def test_tokenizer_round_trip():
    layout = TokenLayout((8, 8, 8, 3))
    tok = build_tokenizer(layout)
    ids = [
        BOS_ID,
        layout.token_id(0, 1),
        layout.token_id(1, 7),
        layout.token_id(2, 0),
        layout.token_id(3, 2),
        SEP_ID,
        REC_ID,
        EOS_ID,
    ]
    text = tok.decode(ids)
    assert tok.encode(text, add_special_tokens=False) == ids
    assert tok.encode("<a_1><b_7>", add_special_tokens=False) == ids[1:3]
    assert tok.convert_ids_to_tokens(list(range(layout.vocab_size))) == layout.token_strings()


def test_catalog_parse_counts_invalid_items(synth_data_dir, tmp_path):
    ds = load_dataset(NAME, synth_data_dir)
    cat, _ = build_catalog(ds, QCFG, "attributes")
    cat.save(tmp_path)
    loaded = Catalog.load(tmp_path)
    assert loaded.item_to_sid == cat.item_to_sid
    rows = [json.loads(l) for l in (tmp_path / "catalog.jsonl").read_text().splitlines()]
    assert rows[0]["tokens"] == cat.layout.token_strings_of(cat.item_to_sid[rows[0]["item_id"]])
    used = set(cat.item_to_sid.values())
    bad = next(
        (a, b, c, 0)
        for a in range(8)
        for b in range(8)
        for c in range(8)
        if (a, b, c, 0) not in used
    )
    ids = (
        cat.item_token_ids(3)
        + [SEP_ID]
        + cat.layout.sid_to_ids(bad)
        + [SEP_ID]
        + cat.item_token_ids(5)
        + [SEP_ID, EOS_ID, 7]
    )
    parsed = loaded.parse(ids)
    assert parsed.items == (3, None, 5) and parsed.finished and parsed.num_invalid == 1
    assert loaded.parse(cat.item_token_ids(3)[:2]).items == (None,)  # truncated item is invalid
    prompt = loaded.prompt_ids([1, 2, 3], max_history=2)
    assert prompt[0] == BOS_ID and prompt[-1] == REC_ID and len(prompt) == 2 + 2 * 5


@pytest.mark.slow
@pytest.mark.parametrize("name", ["Beauty", "Sports_and_Outdoors", "Toys_and_Games", "Yelp"])
def test_prepare_real_datasets(name):
    ds = load_dataset(name)
    cat, rep = build_catalog(ds, QuantiserConfig(), "auto")
    assert len(set(cat.item_to_sid.values())) == ds.num_items
    table = cat.layout.slot_table()
    assert all(
        table[t] == lvl
        for s in cat.item_to_sid.values()
        for lvl, t in enumerate(cat.layout.sid_to_ids(s))
    )
