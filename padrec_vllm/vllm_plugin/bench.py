"""``padrec bench --engine vllm``: the bench methods on vLLM's own engine.

Same JSON as the reference engine's bench (``padrec_vllm.bench.report``). Methods: ``ar`` (no
speculation), ``ngram`` (vLLM's prompt lookup, ``NGRAM``), and any trained head under
``heads/<name>`` (``eagle``, ``padrec``) through ``speculative_config={"method": "eagle", ...}``.
Constrained by default, as the reference bench: each request carries its list constraint in its
structured-output parameters (``structured.grammar_payload``); vLLM masks the target at every
verified position and cuts drafts at the first illegal one. vLLM verifies forced tokens like any
other (no ``forced`` method here).

How it runs: one engine per method, built in turn in this process and shut down before the next
(so methods are not interleaved round-robin as in the reference bench: machine noise is not
spread evenly). Each engine gets one excluded warm-up batch, then the users ``batch_size`` at a
time, one ``LLM.generate`` call per batch (``max_num_seqs = batch_size``); a request's
``latency_ms`` is the wall time of its batch, as in the reference bench.

Where the figures come from: tokens from the outputs; rounds and acceptance from vLLM's
per-request speculative metrics (``per_request_spec_decode_metrics="detailed"``: accepted and
proposed counts for every verify round of a request), replayed into the one accounting
(``decoding.accounting.result_from_rounds``). ``head_forward_ms`` is None: vLLM does not time its
draft model apart.
"""

from __future__ import annotations

import os
from dataclasses import replace
import time
from pathlib import Path

from tqdm.auto import tqdm

from padrec_vllm.artifacts import ArtifactPaths
from padrec_vllm.bench import BenchConfig, MethodRun, bench_result, bench_setup
from padrec_vllm.catalog.constraint import ListSpec
from padrec_vllm.catalog.tokens import EOS_ID, SlotRule
from padrec_vllm.decoding import result_from_rounds
from padrec_vllm.vllm_plugin.diagnostics import watched_start

NGRAM = {"prompt_lookup_min": 2, "prompt_lookup_max": 4}  # an item is a few tokens long


def speculative_config(name: str, paths: ArtifactPaths, k: int) -> dict | None:
    if name == "ar":
        return None
    if name == "ngram":
        return {"method": "ngram", "num_speculative_tokens": k, **NGRAM}
    return {"method": "eagle", "model": str(paths.head(name)), "num_speculative_tokens": k}


def run_method(
    target: Path,
    spec: dict | None,
    prompts: list[list[int]],
    *,
    batch_size: int,
    limit: int,
    k: int,
    slots: SlotRule | None,
    enforce_eager: bool,
    specs: list[ListSpec] | None = None,
    catalog_dir: Path | None = None,
) -> MethodRun:
    """One engine: warm-up batch (excluded), then every prompt, ``batch_size`` per call; under
    ``specs[i]`` (lists of the catalog in ``catalog_dir``) when given."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import StructuredOutputsParams

    from padrec_vllm.vllm_plugin.structured import grammar_payload

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # vLLM's CPU default takes most RAM
    extra = {"per_request_spec_decode_metrics": "detailed"} if spec is not None else {}
    with watched_start() as cause:
        try:
            llm = LLM(
                model=str(target),
                speculative_config=spec,
                dtype="float32",
                seed=0,
                max_num_seqs=batch_size,
                enforce_eager=enforce_eager,
                **extra,
            )
        except Exception as exc:  # the engine core's own error (vllm_plugin.diagnostics)
            raise RuntimeError(f"vLLM failed to start on {target}: {cause() or exc}") from exc
    try:
        def params(i: int) -> SamplingParams:
            structured = None
            if specs is not None:
                structured = StructuredOutputsParams(grammar=grammar_payload(catalog_dir, specs[i]))
            return SamplingParams(temperature=0, max_tokens=limit, stop_token_ids=[EOS_ID],
                                  structured_outputs=structured)

        def call(start: int, stop: int):
            batch = [TokensPrompt(prompt_token_ids=p) for p in prompts[start:stop]]
            return llm.generate(batch, [params(i) for i in range(start, stop)], use_tqdm=False)

        call(0, batch_size)  # warm-up
        results, latency, wall = [], [], 0.0
        label = (
            "ar"
            if spec is None
            else Path(spec["model"]).name
            if "model" in spec
            else spec["method"]
        )
        for start in tqdm(
            range(0, len(prompts), batch_size), desc=f"vllm bench {label}", unit="batch"
        ):
            chunk = prompts[start : start + batch_size]
            t0 = time.perf_counter()
            outs = call(start, start + len(chunk))
            secs = time.perf_counter() - t0
            wall += secs
            latency += [1000 * secs] * len(chunk)
            for o in outs:
                c = o.outputs[0]
                m = c.spec_decode_metrics if spec is not None else None
                accepted = list(getattr(m, "per_step_accepted", None) or [])
                proposed = list(getattr(m, "per_step_drafted", None) or [])
                results.append(
                    result_from_rounds(
                        list(c.token_ids), accepted, proposed, k if spec is not None else 0, slots
                    )
                )
        return MethodRun(results, wall, latency)
    finally:
        llm.llm_engine.engine_core.shutdown()


def run_vllm_bench(cfg: BenchConfig, *, enforce_eager: bool = False) -> dict:
    """``padrec bench --engine vllm``; ``enforce_eager`` skips torch.compile / CUDA graphs
    (tests)."""
    cfg = replace(cfg, engine="vllm")  # the setup's checks are the vLLM engine's
    setup = bench_setup(cfg, builtin=("ar", "ngram"))
    from padrec_vllm.vllm_plugin import register

    register()  # the padrec head's architecture, in this process too
    slots = setup.catalog.layout.slot_rule()
    k = setup.num_draft_tokens
    names = list(dict.fromkeys(["ar", *cfg.methods]))
    runs = {
        name: run_method(
            setup.paths.target,
            speculative_config(name, setup.paths, k),
            setup.prompts,
            batch_size=cfg.batch_size,
            limit=setup.limit,
            k=k,
            slots=slots,
            enforce_eager=enforce_eager,
            specs=setup.specs(),
            catalog_dir=setup.paths.root,
        )
        for name in names
    }
    # vLLM does not time its drafter apart: no head_forward_ms
    return bench_result(cfg, setup, runs, head_forward_ms={}, engine="vllm")
