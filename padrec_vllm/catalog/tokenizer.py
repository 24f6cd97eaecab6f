"""A Hugging Face fast tokenizer over the SID vocabulary (``tokenizer.json`` + config).

Text form: token strings, optionally separated by whitespace, e.g. ``"<bos> <a_3> <b_17> ..."``.
Every id round-trips: ``encode(decode(ids)) == ids``. ``<pad> <bos> <eos>`` are special tokens;
``<sep>`` and ``<rec>`` are ordinary ones, so they survive ``skip_special_tokens``.
"""

from __future__ import annotations

from pathlib import Path

from padrec_vllm.catalog.tokens import TokenLayout

TOKENIZER_DIR = "tokenizer"


def build_tokenizer(layout: TokenLayout):
    """-> ``transformers.PreTrainedTokenizerFast`` for ``layout``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(layout.token_strings())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Split(Regex(r"<[^<>]*>"), behavior="isolated"),
    ])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins tokens with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
        unk_token="<pad>", model_max_length=4096,
    )


def save_tokenizer(layout: TokenLayout, out_dir: Path):
    tokenizer = build_tokenizer(layout)
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer
