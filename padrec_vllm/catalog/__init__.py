"""Semantic-ID catalog: item embeddings, residual quantisation, token layout, tokenizer,
constraint."""
