"""The target recommender and the draft heads.

- ``config``: head names (kinds, variants, vLLM architectures, the draft-token cap), ``HeadConfig``;
- ``head``: ``DraftHead``, the definition (training, checkpoints); ``layers``: its decoder layer;
  ``padrec_terms``: the PAD-Rec terms; ``head_cache``: its KV cache and tree placement;
- ``decoding_head``: ``decoding_head(head, target, int8=...)``, the form decoding runs;
  ``triton_terms`` (CUDA) and ``int8_linear`` (CPU) serve it;
- ``head_checkpoint``: save and load heads as vLLM-loadable directories;
- ``target``: the target ``LlamaForCausalLM``; ``skinny_linear``: its few-row CPU linears.
"""
