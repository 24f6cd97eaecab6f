"""padrec-vllm: PAD-Rec position-aware speculative decoding for generative list-wise
recommendation."""

__version__ = "0.1.0"
