"""``padrec build``: prepare -> train target -> evaluate (-> draft heads), into one artifacts dir.

Each stage is skipped when its output already exists, so a rerun resumes where the last stopped
(the target training itself resumes from its last checkpoint).
"""

from __future__ import annotations

import json
import shutil
import time

import torch
from dataclasses import asdict, replace
from pathlib import Path

from padrec_vllm.artifacts import ArtifactPaths
from padrec_vllm.catalog.catalog import CATALOG_FILE, Catalog
from padrec_vllm.catalog.prepare import prepare
from padrec_vllm.catalog.rq import QuantiserConfig
from padrec_vllm.catalog.tokens import PER_LEVEL
from padrec_vllm.train.examples import list_examples
from padrec_vllm.data.s3rec import Dataset, leave_one_out, load_dataset
from padrec_vllm.errors import UserError
from padrec_vllm.eval.evaluate import evaluate_target, max_new_tokens, sample_test_users
from padrec_vllm.model.target import load_target, new_target
from padrec_vllm.presets import TargetPreset
from padrec_vllm.train.heads import build_distill_set, distill_prompts, train_head, variant_config
from padrec_vllm.train.target import train_target

DEFAULT_HEADS = ("eagle", "padrec")


def log(msg: str) -> None:
    print(f"[padrec] {msg}", flush=True)


def run_prepare(
    dataset: Dataset, paths: ArtifactPaths, preset: TargetPreset, embedding: str,
    token_format: str = PER_LEVEL,
) -> None:
    if (paths.root / CATALOG_FILE).exists():
        log(f"catalog exists in {paths.root}, skipping prepare")
        return
    report = prepare(
        dataset,
        paths.root,
        QuantiserConfig(codebook_size=preset.codebook_size, seed=preset.seed),
        embedding,
        token_format,
    )
    for line in report.lines():
        log(line)


def _gen_batch(device: str) -> int:
    """Decoding batch for evaluation and self-distillation: large on a GPU, modest on CPU."""
    return 512 if device.startswith("cuda") else 64


def write_popularity(dataset: Dataset, paths: ArtifactPaths) -> None:
    """``popularity.json``: ``{"item_id": count}`` over the training split, most popular first."""
    from collections import Counter

    counts = Counter(i for seq in leave_one_out(dataset.sequences).train.values() for i in seq)
    paths.popularity.write_text(json.dumps({str(i): c for i, c in counts.most_common()}) + "\n")


def run_train_target(
    dataset: Dataset,
    paths: ArtifactPaths,
    preset: TargetPreset,
    device: str,
    time_budget_s: float | None = None,
) -> dict | None:
    if (paths.target / "config.json").exists():
        log(f"target exists in {paths.target}, skipping training")
        return None
    preset = replace(preset, max_steps=preset.steps_for(dataset.name))
    catalog = Catalog.load(paths.root)
    split = leave_one_out(dataset.sequences)
    examples = list_examples(
        split.train,
        catalog,
        preset.history,
        preset.list_len,
        max_users=preset.max_train_users,
        seed=preset.seed,
    )
    log(
        f"{len(examples)} training lists, {sum(map(len, examples))} tokens per epoch; "
        f"{preset.max_steps} steps of {preset.batch_size}"
    )
    model = new_target(preset, catalog.layout, preset.seed)
    report = train_target(
        model,
        examples,
        preset,
        paths.target,
        device=device,
        time_budget_s=time_budget_s,
        save_dtype=torch.bfloat16 if device.startswith("cuda") else None,
    )
    shutil.copytree(paths.tokenizer, paths.target, dirs_exist_ok=True)
    log(
        f"trained in {report.seconds:.0f} s ({report.tokens_per_s:.0f} tokens/s), "
        f"final loss {report.final_loss:.3f}"
    )
    return asdict(report) | {"examples": len(examples)}


def run_eval(
    dataset: Dataset,
    paths: ArtifactPaths,
    preset: TargetPreset,
    device: str,
    users: int | None = None,
    batch_size: int | None = None,
    constrained: bool = True,
    exclude_history: bool = False,
) -> dict:
    """The evaluation of ``eval.json`` (``eval.evaluate.evaluate_target``): constrained lists by
    default, the preset's users and seed unless ``users`` is given."""
    catalog = Catalog.load(paths.root)
    split = leave_one_out(dataset.sequences)
    eval_users = sample_test_users(
        split, catalog, preset.history, users or preset.eval_users, preset.seed
    )
    target = load_target(paths.target, device=device)
    t0 = time.perf_counter()
    result = evaluate_target(
        target,
        catalog,
        split,
        eval_users,
        preset.list_len,
        batch_size=batch_size or _gen_batch(device),
        constrained=constrained,
        exclude_history=exclude_history,
    )
    result |= {"dataset": dataset.name, "preset": preset.name, "seconds": time.perf_counter() - t0}
    return result


def run_train_heads(
    dataset: Dataset,
    paths: ArtifactPaths,
    preset: TargetPreset,
    device: str,
    variants: tuple[str, ...] = DEFAULT_HEADS,
) -> dict:
    """Self-distil once, then train every missing head variant on the same data and budget."""
    todo = [v for v in variants if not (paths.head(v) / "config.json").exists()]
    if not todo:
        log(f"heads {', '.join(variants)} exist, skipping head training")
        return {}
    catalog = Catalog.load(paths.root)
    split = leave_one_out(dataset.sequences)
    target = load_target(paths.target, device=device)
    prompts = distill_prompts(split.train, catalog, preset.history, preset.head_users, preset.seed)
    log(f"self-distillation: target greedy lists for {len(prompts)} training histories")
    t0 = time.perf_counter()
    data = build_distill_set(
        target, prompts, max_new_tokens(catalog, preset.list_len), device, _gen_batch(device)
    )
    reports = {"distill": {"sequences": len(prompts), "seconds": time.perf_counter() - t0}}
    for name in todo:
        cfg = variant_config(
            name, preset.num_draft_tokens, preset.head_steps, preset.head_batch_size, preset.seed
        )
        rep = train_head(target, catalog, data, cfg, paths.head(name), device)
        log(
            f"{name} head: {rep.steps} steps in {rep.seconds:.0f} s, loss {rep.final_loss:.3f}, "
            f"step-1 top-1 {rep.final_top1:.3f}"
        )
        reports[name] = asdict(rep)
    return reports


def format_eval(result: dict) -> list[str]:
    rows = [f"{'':14s} {'Recall@10':>9s} {'NDCG@10':>8s} {'invalid':>8s} {'dup':>6s}"]
    for name in ("target", "most_popular"):
        m = result[name]
        rows.append(
            f"{name:14s} {m['recall_at_10']:9.4f} {m['ndcg_at_10']:8.4f} "
            f"{m['invalid_item_rate']:8.4f} {m['duplicate_rate']:6.4f}"
        )
    if not result.get("constrained", False):  # eval.json from before the constraint: unconstrained
        lists = "unconstrained lists"
    else:
        excluded = ", history excluded" if result.get("exclude_history") else ""
        lists = "constrained lists" + excluded
    head = f"{result['dataset']} ({result['preset']}), {result['users']} test users, {lists}:"
    return [head] + rows


def build(
    dataset_name: str,
    preset: TargetPreset,
    out: Path,
    data_dir: str | None = None,
    device: str = "cpu",
    embedding: str = "auto",
    train_budget_s: float | None = None,
    evaluate: bool = True,
    token_format: str = PER_LEVEL,
) -> dict | None:
    """Run every stage; returns the evaluation dict (also in ``eval.json``). ``token_format``
    (``catalog.tokens.TOKEN_FORMATS``) is the SID token format of the catalog."""
    paths = ArtifactPaths(Path(out))
    dataset = load_dataset(dataset_name, data_dir)
    if paths.build_info.exists():
        info = paths.read_build_info()
        if (info.get("dataset"), info.get("preset")) != (dataset_name, preset.name):
            raise UserError(
                f"{paths.root} holds a build of {info.get('dataset')}/{info.get('preset')}; "
                f"use another --out for {dataset_name}/{preset.name}"
            )
        if info.get("token_format", PER_LEVEL) != token_format:
            raise UserError(
                f"{paths.root} holds a {info.get('token_format', PER_LEVEL)} build; use another "
                f"--out for --token-format {token_format}"
            )
    else:
        info = {
            "dataset": dataset_name,
            "preset": preset.name,
            "seed": preset.seed,
            "token_format": token_format,
            "timings_s": {},
        }
    paths.write_build_info(info)
    t0 = time.perf_counter()
    run_prepare(dataset, paths, preset, embedding, token_format)
    info["timings_s"].setdefault("prepare", time.perf_counter() - t0)
    if not paths.popularity.exists():
        write_popularity(dataset, paths)
    t0 = time.perf_counter()
    train = run_train_target(dataset, paths, preset, device, train_budget_s)
    if train is not None:
        info["train_target"] = train
        info["timings_s"]["train_target"] = time.perf_counter() - t0
    paths.write_build_info(info)
    result = None
    if paths.eval_file.exists():
        result = json.loads(paths.eval_file.read_text())
    elif evaluate:
        result = run_eval(dataset, paths, preset, device)
        paths.eval_file.write_text(json.dumps(result, indent=2) + "\n")
    for line in format_eval(result) if result else ["evaluation skipped (run `padrec eval`)"]:
        log(line)
    t0 = time.perf_counter()
    heads = run_train_heads(dataset, paths, preset, device)
    if heads:
        info.setdefault("train_heads", {}).update(heads)
        info["timings_s"]["train_heads"] = time.perf_counter() - t0
        paths.write_build_info(info)
    return result
