"""The artifacts check: every file a run will read, opened and matched before any model loads.

``check_artifacts(root, heads)`` is what ``padrec serve`` (``server/checks.py``), ``padrec
bench`` and ``padrec eval`` run first, whatever the engine. It reads no tensor data (a
safetensors file is checked by its header: the 8-byte length, the JSON table, the data size it
promises), so it takes well under a second on the demo builds. The first problem found raises a
one-line ``UserError`` that names the file and the mismatch.

What is checked (docs/ARTIFACTS.md, "The artifacts check"):

- ``build.json``, ``token_layout.json`` (its vocabulary size, slot count and slot table agree
  with its codebook sizes) and ``catalog.jsonl`` (every line parses; every SID has one code per
  level, each in its level's range; item ids and SIDs unique) parse;
- ``target/``: ``config.json`` (vocabulary of the token layout, its special-token ids), the
  weights (``model.safetensors`` or the shards of ``model.safetensors.index.json``; every tensor
  of a ``LlamaForCausalLM`` of that config there, in its shape, and the data the header promises
  present) and the tokenizer vLLM reads (``tokenizer.json``, ``tokenizer_config.json``; its
  vocabulary is the token layout's, token for token);
- each head in ``heads``: ``config.json`` is a padrec-vllm head of the kind its name says, in
  the target's space (hidden size, vocabulary, special-token ids), with the layout's number of
  slots, token format (``padrec_token_format``: a head trained for the other format is
  refused), slot rule and slot table; ``model.safetensors`` holds exactly the tensors of that config
  (``model.head_checkpoint.weight_shapes``), data complete.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from types import SimpleNamespace

from padrec_vllm.artifacts import ArtifactPaths
from padrec_vllm.catalog.catalog import CATALOG_FILE, LAYOUT_FILE
from padrec_vllm.catalog.tokens import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    PER_LEVEL,
    SPECIAL_TOKENS,
    TokenLayout,
)
from padrec_vllm.errors import UserError
from padrec_vllm.model.config import ARCHITECTURES, HEAD_KINDS, HEAD_VARIANTS, HeadConfig
from padrec_vllm.model.head_checkpoint import WEIGHTS_FILE, weight_shapes

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
SHARD_INDEX = "model.safetensors.index.json"
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit
DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "I16": 2, "F16": 2,
    "BF16": 2, "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8,
}
SPECIAL_IDS = {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID}

Shapes = dict[str, tuple[int, ...]]


def check_artifacts(root: str | Path, heads: Iterable[str] = ()) -> TokenLayout:
    """Check the artifacts directory ``root`` and the draft heads ``heads`` (names under
    ``heads/``) as the module docstring says; the token layout when all is well, else a
    one-line UserError naming the file and the mismatch."""
    paths = ArtifactPaths(Path(root))
    paths.read_build_info()
    layout = check_layout(paths.root / LAYOUT_FILE)
    check_catalog(paths.root / CATALOG_FILE, layout)
    target = check_target(paths, layout)
    for name in dict.fromkeys(heads):
        check_head(paths, name, layout, target)
    return layout


# --------------------------------------------------------------------------- catalog and layout


def check_layout(path: Path) -> TokenLayout:
    """``token_layout.json`` parsed, its derived fields consistent with its codebook sizes."""
    raw = _json(path, f"missing artifact file: {path} (run `padrec prepare` first)")
    try:
        layout = TokenLayout.from_dict(raw)
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{path}: not a token layout ({_why(exc)})") from None
    if raw.get("special_tokens", list(SPECIAL_TOKENS)) != list(SPECIAL_TOKENS):
        raise UserError(f"{path}: special_tokens {raw['special_tokens']}, expected "
                        f"{list(SPECIAL_TOKENS)}")
    for key, want in (("vocab_size", layout.vocab_size), ("num_slots", layout.num_slots)):
        if key in raw and raw[key] != want:
            raise UserError(f"{path}: {key} is {raw[key]}, its codebook sizes "
                            f"{list(layout.codebook_sizes)} give {want}")
    if "slot_of_token" in raw:
        _same_slots(path, raw["slot_of_token"], layout, "its codebook sizes give")
    return layout


def check_catalog(path: Path, layout: TokenLayout) -> None:
    """Every line of ``catalog.jsonl`` an item with a valid, unique SID of ``layout``."""
    if not path.is_file():
        raise UserError(f"missing artifact file: {path} (run `padrec prepare` first)")
    items: set[int] = set()
    sids: dict[tuple[int, ...], int] = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            try:
                row = json.loads(line)
                item, sid = int(row["item_id"]), tuple(int(c) for c in row["sid"])
                layout.sid_to_ids(sid)
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                raise UserError(f"{path} line {n}: {_why(exc)}") from None
            if item in items:
                raise UserError(f"{path} line {n}: item {item} listed twice")
            if sid in sids:
                raise UserError(f"{path} line {n}: item {item} has the SID {list(sid)} of item "
                                f"{sids[sid]}")
            items.add(item)
            sids[sid] = item
    if not items:
        raise UserError(f"{path}: no items")


# --------------------------------------------------------------------------- target


def check_target(paths: ArtifactPaths, layout: TokenLayout) -> dict:
    """The target's ``config.json`` (returned), weights and tokenizer, against ``layout``."""
    config_file = paths.target_config_file
    config = paths.target_config()
    vocab = _int_field(config_file, config, "vocab_size")
    if vocab != layout.vocab_size:
        raise UserError(f"{config_file}: vocab_size is {vocab}, the token layout "
                        f"({paths.root / LAYOUT_FILE}) has {layout.vocab_size}")
    _special_ids(config_file, config)
    _check_weights(paths.target, _target_shapes(config_file, config), exact=False)
    check_tokenizer(paths.target, layout)
    return config


def _target_shapes(path: Path, c: dict) -> Shapes:
    """Every tensor of a ``LlamaForCausalLM`` with config ``c`` and its shape."""
    v, h, inter, layers, heads = (
        _int_field(path, c, k) for k in ("vocab_size", "hidden_size", "intermediate_size",
                                         "num_hidden_layers", "num_attention_heads")
    )
    hd = c.get("head_dim") or h // heads
    q, kv = heads * hd, (c.get("num_key_value_heads") or heads) * hd
    shapes: Shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    if not c.get("tie_word_embeddings", False):
        shapes["lm_head.weight"] = (v, h)
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
            p + "mlp.down_proj.weight": (h, inter),
        }
    return shapes


def check_tokenizer(folder: Path, layout: TokenLayout) -> None:
    """The tokenizer files in ``folder`` parse; its vocabulary is ``layout``'s, id for id."""
    for name in TOKENIZER_FILES:
        _json(folder / name, f"missing tokenizer file: {folder / name} (run `padrec build`)")
    path = folder / TOKENIZER_FILES[0]
    vocab = _json(path, "").get("model", {}).get("vocab")
    if not isinstance(vocab, dict):
        raise UserError(f"{path}: no model.vocab (not a SID tokenizer)")
    want = {tok: i for i, tok in enumerate(layout.token_strings())}
    if len(vocab) != len(want):
        raise UserError(f"{path}: {len(vocab)} tokens, the token layout has {len(want)}")
    for tok, i in want.items():
        if vocab.get(tok) != i:
            raise UserError(f"{path}: token {tok} has id {vocab.get(tok)}, the token layout "
                            f"gives {i}")


# --------------------------------------------------------------------------- heads


def check_head(paths: ArtifactPaths, name: str, layout: TokenLayout, target: dict) -> None:
    """Head ``name``: a padrec-vllm head of its kind, in ``target``'s space, with ``layout``'s
    slots, and its weights those of its config."""
    folder = paths.head(name)
    path = folder / "config.json"
    raw = paths.head_config(name)
    kind = raw.get("padrec_kind")
    if kind not in HEAD_KINDS:
        raise UserError(f"{path}: padrec_kind is {kind!r}, not one of {', '.join(HEAD_KINDS)} "
                        "(not a padrec-vllm head checkpoint)")
    variant = HEAD_VARIANTS.get(name)
    if variant is not None and variant.kind != kind:
        raise UserError(f"{path}: a {kind} head under the name {name} (a {variant.kind} head)")
    if raw.get("architectures") != [ARCHITECTURES[kind]]:
        raise UserError(f"{path}: architectures is {raw.get('architectures')}, a {kind} head "
                        f"has {[ARCHITECTURES[kind]]}")
    target_file = paths.target_config_file
    for key in ("hidden_size", "vocab_size"):
        if _int_field(path, raw, key) != target[key]:
            raise UserError(f"{path}: {key} is {raw[key]}, the target's is {target[key]} "
                            f"({target_file})")
    _special_ids(path, raw)
    slots = _int_field(path, raw, "padrec_num_slots")
    if slots != layout.num_slots:
        raise UserError(f"{path}: padrec_num_slots is {slots}, the token layout "
                        f"({paths.root / LAYOUT_FILE}) has {layout.num_slots}")
    _same_format(path, raw, layout, paths.root / LAYOUT_FILE)
    if "padrec_slot_of_token" in raw:
        _same_slots(path, raw["padrec_slot_of_token"], layout,
                    f"the token layout ({paths.root / LAYOUT_FILE}) gives")
    elif kind == "padrec":
        raise UserError(f"{path}: no padrec_slot_of_token (a padrec head needs its slot table)")
    try:
        config = HeadConfig.from_target(
            SimpleNamespace(**raw), kind, num_slots=slots, num_steps=raw["padrec_num_steps"],
            **{k: bool(raw.get(f"padrec_{k}", True))
               for k in ("use_item_emb", "use_step_emb", "use_gate")},
        )
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{path}: not a usable head config ({_why(exc)})") from None
    _check_weights(folder, weight_shapes(config), exact=True, single=WEIGHTS_FILE)


# --------------------------------------------------------------------------- safetensors


def safetensors_header(path: Path) -> Shapes:
    """The tensors of the safetensors file ``path`` and their shapes, from its header alone;
    UserError when the header does not parse or the file is shorter (or longer) than the data
    the header promises."""
    if not path.is_file():
        raise UserError(f"missing weights file: {path} (run `padrec build`)")
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        n = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        if not 0 < n <= min(size - 8, MAX_HEADER_BYTES):
            raise UserError(f"{path}: truncated or not a safetensors file (file of {size} bytes, "
                            f"header length {n})")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UserError(f"{path}: corrupt safetensors header ({_why(exc)})") from None
    if not isinstance(header, dict):
        raise UserError(f"{path}: corrupt safetensors header (not a JSON object)")
    shapes: Shapes = {}
    end = 0
    for name, t in header.items():
        if name == "__metadata__":
            continue
        try:
            shape = tuple(int(d) for d in t["shape"])
            begin, stop = (int(o) for o in t["data_offsets"])
            itemsize = DTYPE_BYTES.get(t["dtype"])
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"{path}: corrupt safetensors header at {name} ({_why(exc)})") from None
        if itemsize is not None and stop - begin != math.prod(shape) * itemsize:
            raise UserError(f"{path}: corrupt safetensors header: {name} {t['dtype']}{list(shape)} "
                            f"spans {stop - begin} bytes")
        shapes[name] = shape
        end = max(end, stop)
    data = size - 8 - n
    if end != data:
        what = "truncated" if end > data else "trailing bytes"
        raise UserError(f"{path}: {what}: the header promises {end} bytes of tensor data, the "
                        f"file holds {data}")
    return shapes


def _check_weights(folder: Path, want: Shapes, *, exact: bool, single: str | None = None) -> None:
    """The safetensors weights in ``folder`` (``single`` file, else ``model.safetensors`` or the
    shards of its index) hold every tensor of ``want`` in its shape (and nothing else when
    ``exact``)."""
    index = folder / SHARD_INDEX
    if single is None and index.is_file():
        weight_map = _json(index, "").get("weight_map")
        if not isinstance(weight_map, dict):
            raise UserError(f"{index}: no weight_map")
        files = sorted(set(weight_map.values()))
    else:
        files = [single or WEIGHTS_FILE]
    got: dict[str, tuple[tuple[int, ...], Path]] = {}
    for name in files:
        got |= {t: (s, folder / name) for t, s in safetensors_header(folder / name).items()}
    for tensor, shape in want.items():
        if tensor not in got:
            where = folder / files[0] if len(files) == 1 else index
            raise UserError(f"{where}: no tensor {tensor} (its config needs {list(shape)})")
        if got[tensor][0] != shape:
            raise UserError(f"{got[tensor][1]}: {tensor} is {list(got[tensor][0])}, its config "
                            f"({folder / 'config.json'}) needs {list(shape)}")
    extra = sorted(set(got) - set(want))
    if exact and extra:
        raise UserError(f"{got[extra[0]][1]}: unexpected tensor {extra[0]} "
                        f"({len(extra)} not in its config)")


# --------------------------------------------------------------------------- helpers


def _json(path: Path, missing: str):
    if not path.is_file():
        raise UserError(missing or f"missing file: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"corrupt {path}: {_why(exc)}") from None


def _int_field(path: Path, config: dict, key: str) -> int:
    value = config.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise UserError(f"{path}: {key} is {value!r}, expected a positive integer")
    return value


def _special_ids(path: Path, config: dict) -> None:
    """The config's bos / eos / pad token ids, when set, are the token layout's."""
    for key, want in SPECIAL_IDS.items():
        got = config.get(key)
        if got is not None and got != want:
            raise UserError(f"{path}: {key} is {got}, the token format has {want}")


def _same_format(path: Path, raw: dict, layout: TokenLayout, layout_file: Path) -> None:
    """The head's token format and slot rule (``padrec_token_format``, ``padrec_slot_rule``,
    period and offset; absent = per-level, token rule) are the token layout's."""
    fmt = raw.get("padrec_token_format", PER_LEVEL)
    if fmt != layout.token_format:
        raise UserError(f"{path}: a head for the {fmt} token format, the target's tokenizer and "
                        f"token layout ({layout_file}) are {layout.token_format}; train the head "
                        f"on this build")
    rule = layout.slot_rule()
    fields = rule.config_fields()
    for key in ("padrec_slot_rule", "padrec_slot_period", "padrec_slot_offset"):
        got, want = raw.get(key, "token" if key == "padrec_slot_rule" else None), fields.get(key)
        if "padrec_slot_of_token" in raw and got != want:
            raise UserError(f"{path}: {key} is {got!r}, the {fmt} token layout ({layout_file}) "
                            f"gives {want!r}")


def _same_slots(path: Path, table, layout: TokenLayout, what: str) -> None:
    want = layout.slot_table()
    if not isinstance(table, list):
        raise UserError(f"{path}: the slot table is not a list")
    if len(table) != len(want):
        raise UserError(f"{path}: slot table of {len(table)} tokens, {what} {len(want)}")
    for token, (got, slot) in enumerate(zip(table, want)):
        if got != slot:
            raise UserError(f"{path}: slot table gives token {token} slot {got}, {what} {slot}")


def _why(exc: Exception) -> str:
    """One line: the exception's message, or its type when it has none."""
    if isinstance(exc, KeyError):
        return f"missing field {exc}"
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
