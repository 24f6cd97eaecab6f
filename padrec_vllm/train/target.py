"""Training loop for the target recommender (plain PyTorch, AdamW, cosine schedule).

Deterministic for a seed on a given device. Resumable: every ``ckpt_every`` steps the model,
optimiser and step go to ``<out>/train_state.pt``; a rerun with the same output directory
continues from there. The finished model is saved as a Hugging Face checkpoint in ``<out>``.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from padrec_vllm.train.precision import autocast
from padrec_vllm.train.examples import Example, collate, length_bucketed_batches
from padrec_vllm.presets import TargetPreset

STATE_FILE = "train_state.pt"


@dataclass(frozen=True)
class TrainReport:
    steps: int
    tokens: int
    seconds: float
    final_loss: float
    device: str

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


def _lr_at(step: int, preset: TargetPreset) -> float:
    if step < preset.warmup_steps:
        return preset.lr * (step + 1) / preset.warmup_steps
    progress = (step - preset.warmup_steps) / max(1, preset.max_steps - preset.warmup_steps)
    return preset.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def _batches(examples: list[Example], preset: TargetPreset, seed: int):
    """Endless stream of length-bucketed batches, reshuffled each epoch."""
    rng = random.Random(seed)
    while True:
        yield from length_bucketed_batches(examples, preset.batch_size, rng)


def train_target(
    model,
    examples: list[Example],
    preset: TargetPreset,
    out_dir: Path,
    device: str = "cpu",
    ckpt_every: int = 200,
    save_dtype: torch.dtype | None = None,
    progress: bool = True,
    time_budget_s: float | None = None,
) -> TrainReport:
    """Train ``model`` in place for ``preset.max_steps`` steps and save it to ``out_dir``.

    With ``time_budget_s``, training stops early once that much wall time has passed (the
    cosine schedule still assumes ``max_steps``); the report says how many steps ran.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(preset.seed)
    model.to(device).train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": preset.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=preset.lr,
        betas=(0.9, 0.98),
    )
    start, tokens, elapsed = 0, 0, 0.0
    state_path = out_dir / STATE_FILE
    if state_path.exists():
        state = torch.load(state_path, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start, tokens, elapsed = state["step"], state["tokens"], state["elapsed"]
    stream = _batches(examples, preset, preset.seed)
    for _ in range(start):  # replay the data order so a resumed run sees the same batches
        next(stream)
    amp = autocast(device)  # chosen once, reused every step
    t0 = time.perf_counter() - elapsed
    loss_ema = float("nan")
    bar = tqdm(
        range(start, preset.max_steps),
        desc="train target",
        unit="step",
        disable=not progress,
        initial=start,
        total=preset.max_steps,
    )
    done = start
    for step in bar:
        if time_budget_s is not None and time.perf_counter() - t0 > time_budget_s:
            break
        batch = {k: v.to(device) for k, v in collate(next(stream)).items()}
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, preset)
        with amp:
            loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        done = step + 1
        tokens += int(batch["attention_mask"].sum())
        val = float(loss.detach())
        loss_ema = val if math.isnan(loss_ema) else 0.95 * loss_ema + 0.05 * val
        bar.set_postfix(loss=f"{loss_ema:.3f}", refresh=False)
        if (step + 1) % ckpt_every == 0 and step + 1 < preset.max_steps:
            torch.save(
                {
                    "model": model.state_dict(),
                    "opt": opt.state_dict(),
                    "step": step + 1,
                    "tokens": tokens,
                    "elapsed": time.perf_counter() - t0,
                },
                state_path,
            )
    seconds = time.perf_counter() - t0
    model.eval()
    to_save = model if save_dtype is None else model.to(save_dtype)
    to_save.save_pretrained(str(out_dir), max_shard_size="15MB")
    state_path.unlink(missing_ok=True)
    return TrainReport(
        steps=done, tokens=tokens, seconds=seconds, final_loss=loss_ema, device=device
    )
