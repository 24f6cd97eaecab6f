"""Developer benchmarks and helpers, run from a checkout (``python -m benchmarks.<name>``); not
part of the wheel or the image (pyproject.toml packages only ``padrec_vllm`` and ``server``)."""
