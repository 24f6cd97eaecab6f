"""Draft-head training: one recipe for every head kind (same data, steps, batches and seed).

Data (self-distillation): the target's own greedy lists on training histories, so the head learns
the distribution it meets at serving time. Each sequence is ``prompt + greedy completion``; the
target's post-norm features ``f`` [T, H] are computed once.

Unrolled K-step objective. Step 1 reads the target's features: input at position p is
``(f_p, x_{p+1})`` and the output ``h1_p`` should predict token ``x_{p+2}`` and feature ``f_{p+1}``.
Step k >= 2 reads the head's own step-(k-1) features shifted by one position:
``(h{k-1}_{p-1}, x_{p+1})``, exactly what decoding feeds it at draft step k, so the step embedding
sees k = 1..K and the head learns to recover from its own drift. Loss per step = cross-entropy
against ``x_{p+2}`` (the target's greedy token) + ``feature_weight`` * smooth-L1 against
``f_{p+1}``, on completion positions only; the steps' losses are averaged with weights
``step_decay**(k-1)`` (step 1, which every round starts with, weighs most). With ``topk_distill``
= M > 0 each step also pays ``topk_weight`` * the cross-entropy against the target's own
distribution on its M most likely tokens (HASS's top-K distillation): the target's logits at p+1
are ``lm_head(f_{p+1})``, so no extra data is stored. Within a step,
attention runs over the step's own features (a HASS-style approximation of the decoding-time
cache).
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from padrec_vllm.catalog.catalog import Catalog
from padrec_vllm.catalog.tokens import EOS_ID, PAD_ID
from padrec_vllm.decoding import generate
from padrec_vllm.model.config import HEAD_VARIANTS, HeadConfig
from padrec_vllm.model.head import DraftHead
from padrec_vllm.model.head_checkpoint import save_head
from padrec_vllm.train.precision import autocast


@dataclass(frozen=True)
class HeadTrainConfig:
    name: str  # variant name (a key of model.config.HEAD_VARIANTS)
    kind: str  # one of model.config.HEAD_KINDS
    num_steps: int  # K
    train_steps: int
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 50
    feature_weight: float = 1.0
    # step k's loss weighs step_decay**(k-1), weights normalised (1 = equal); 0.5 against equal
    # weights is compared in docs/RESULTS.md
    step_decay: float = 0.5
    # HASS-style top-M distillation term (module docstring); 0 = greedy labels only
    topk_distill: int = 0
    topk_weight: float = 1.0
    use_item_emb: bool = True
    use_step_emb: bool = True
    use_gate: bool = True
    seed: int = 0


def variant_config(name: str, num_steps: int, train_steps: int, batch_size: int,
                   seed: int) -> HeadTrainConfig:
    """The training config of a named head variant (``HEAD_VARIANTS``); every variant gets the
    same budget."""
    v = HEAD_VARIANTS[name]
    return HeadTrainConfig(name=name, kind=v.kind, num_steps=num_steps, train_steps=train_steps,
                           batch_size=batch_size, seed=seed, **v.switches())


@dataclass(frozen=True)
class DistillSet:
    """Self-distillation sequences: token ids [T_i], features [T_i, H], prompt lengths."""

    tokens: list[torch.Tensor]
    features: list[torch.Tensor]
    prompt_lens: list[int]


@dataclass(frozen=True)
class HeadTrainReport:
    name: str
    steps: int
    seconds: float
    final_loss: float
    final_top1: float  # step-1 training accuracy (EMA)
    num_steps: int  # K unrolled
    step_decay: float


def distill_prompts(train: dict[int, list[int]], catalog: Catalog, history: int, users: int,
                    seed: int) -> list[list[int]]:
    """Two cut points per sampled user (the full training prefix and a random earlier one)."""
    rng = random.Random(seed)
    pool = sorted(u for u, s in train.items() if len(s) >= 2)
    chosen = sorted(rng.sample(pool, min(users, len(pool))))
    prompts = []
    for u in chosen:
        seq = train[u]
        cuts = {len(seq), rng.randrange(1, len(seq))}
        prompts += [catalog.prompt_ids(seq[:t], history) for t in sorted(cuts)]
    return prompts


@torch.no_grad()
def build_distill_set(target, prompts: list[list[int]], max_new_tokens: int, device: str,
                      batch_size: int = 64) -> DistillSet:
    """Greedy completions by the target, then its features over prompt + completion."""
    results = generate(target, prompts, max_new_tokens=max_new_tokens, eos_id=EOS_ID,
                       batch_size=batch_size, progress="self-distillation")
    seqs = [torch.tensor(p + r.tokens) for p, r in zip(prompts, results)]
    feats: list[torch.Tensor] = []
    for start in tqdm(range(0, len(seqs), batch_size), desc="target features", unit="batch"):
        chunk = seqs[start : start + batch_size]
        width = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), width), PAD_ID, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, s in enumerate(chunk):
            ids[r, : len(s)], mask[r, : len(s)] = s, 1
        out = target.model(input_ids=ids.to(device), attention_mask=mask.to(device))
        hidden = out.last_hidden_state  # [B, T, H]
        feats += [hidden[r, : len(s)].float().cpu() for r, s in enumerate(chunk)]
    return DistillSet(tokens=seqs, features=feats, prompt_lens=[len(p) for p in prompts])


def distill_batch(ds: DistillSet, idx: list[int], device: str):
    """Right-padded tokens [B, T], features [B, T, H], loss mask [B, T] (positions p with a
    completion token at p+2), padding mask [B, T]."""
    width = max(len(ds.tokens[i]) for i in idx)
    hsz = ds.features[idx[0]].shape[-1]
    ids = torch.full((len(idx), width), PAD_ID, dtype=torch.long)
    feats = torch.zeros(len(idx), width, hsz)
    loss_mask = torch.zeros(len(idx), width, dtype=torch.bool)
    pad_mask = torch.zeros(len(idx), width, dtype=torch.long)
    for r, i in enumerate(idx):
        n = len(ds.tokens[i])
        ids[r, :n], feats[r, :n], pad_mask[r, :n] = ds.tokens[i], ds.features[i], 1
        loss_mask[r, max(0, ds.prompt_lens[i] - 2) : n - 2] = True
    return ids.to(device), feats.to(device), loss_mask.to(device), pad_mask.to(device)


def unrolled_loss(head: DraftHead, target, ids, feats, loss_mask, pad_mask, num_steps: int,
                  feature_weight: float, step_decay: float = 1.0, topk: int = 0,
                  topk_weight: float = 1.0) -> tuple[torch.Tensor, float]:
    """Weighted mean over steps of CE(x_{p+2}) + w * smoothL1(f_{p+1}) (+ ``topk_weight`` *
    the top-``topk`` distillation term when ``topk`` > 0), step k weighing ``step_decay**(k-1)``
    (1.0: plain mean); returns (loss, step-1 accuracy)."""
    b, t = ids.shape
    embed, lm_head = target.get_input_embeddings(), target.lm_head
    pos = torch.arange(t, device=ids.device)[None].expand(b, t)  # [B, T]
    next_ids = torch.cat([ids[:, 1:], ids.new_full((b, 1), PAD_ID)], 1)  # [B, T]: x_{p+1}
    labels = torch.cat([ids[:, 2:], ids.new_full((b, 2), PAD_ID)], 1)  # [B, T]: x_{p+2}
    feat_target = torch.cat([feats[:, 1:], feats[:, -1:]], 1)  # [B, T, H]: f_{p+1}
    inp = feats  # [B, T, H]
    mask = loss_mask.clone()  # [B, T]
    if topk:
        with torch.no_grad():
            t_logp = lm_head(feat_target).float().log_softmax(-1)  # [B, T, V]: target at p+1
            t_top, t_idx = t_logp.topk(min(topk, t_logp.shape[-1]), dim=-1)  # [B, T, M]
            t_prob = t_top.exp()  # [B, T, M]
    total, acc = 0.0, 0.0
    for k in range(1, num_steps + 1):
        h = head(next_ids, inp, pos, step=k, embed=embed, attention_mask=pad_mask)  # [B, T, H]
        logits = lm_head(h)  # [B, T, V]
        m = mask.float()
        ce = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="none")
        ce = ce.view(b, t)  # [B, T]
        reg = F.smooth_l1_loss(h.float(), feat_target, reduction="none").mean(-1)  # [B, T]
        step_loss = ce + feature_weight * reg  # [B, T]
        if topk:
            logp = logits.float().log_softmax(-1).gather(-1, t_idx)  # [B, T, M]
            step_loss = step_loss - topk_weight * (t_prob * logp).sum(-1)
        weighted = step_decay ** (k - 1) * (step_loss * m).sum()
        total = total + weighted / m.sum().clamp(min=1)
        if k == 1:
            acc = float(((logits.argmax(-1) == labels).float() * m).sum() / m.sum().clamp(min=1))
        inp = torch.cat([feats[:, :1], h[:, :-1]], 1)  # [B, T, H]: step k+1 reads h^k_{p-1}
        mask = mask & torch.cat([mask.new_zeros(b, 1), mask[:, :-1]], 1)  # needs a drafted p-1
    return total / sum(step_decay ** (k - 1) for k in range(1, num_steps + 1)), acc


def train_head(target, catalog: Catalog, data: DistillSet, cfg: HeadTrainConfig, out_dir: Path,
               device: str = "cpu", progress: bool = True) -> HeadTrainReport:
    """Train one head on ``data`` and save it (vLLM-loadable) to ``out_dir``."""
    torch.manual_seed(cfg.seed)
    hcfg = HeadConfig.from_target(target.config, cfg.kind, num_slots=catalog.layout.num_slots,
                                  num_steps=cfg.num_steps, use_item_emb=cfg.use_item_emb,
                                  use_step_emb=cfg.use_step_emb, use_gate=cfg.use_gate)
    head = DraftHead(hcfg, catalog.layout.slot_rule()).to(device).train()
    for p in target.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=0.0, betas=(0.9, 0.95))
    rng = random.Random(cfg.seed)
    order: list[int] = []
    amp = autocast(device)  # chosen once, reused every step
    t0 = time.perf_counter()
    loss_ema, acc_ema = float("nan"), float("nan")
    bar = tqdm(range(cfg.train_steps), desc=f"train {cfg.name} head", unit="step",
               disable=not progress)
    for step in bar:
        if len(order) < cfg.batch_size:
            fresh = list(range(len(data.tokens)))
            rng.shuffle(fresh)
            order += fresh
        idx, order = order[: cfg.batch_size], order[cfg.batch_size :]
        warm = min(1.0, (step + 1) / cfg.warmup_steps)
        decay = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / max(1, cfg.train_steps)))
        for g in opt.param_groups:
            g["lr"] = cfg.lr * warm * decay
        with amp:
            loss, acc = unrolled_loss(head, target, *distill_batch(data, idx, device),
                                      cfg.num_steps, cfg.feature_weight, cfg.step_decay,
                                      cfg.topk_distill, cfg.topk_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
        opt.step()
        val = float(loss.detach())
        loss_ema = val if math.isnan(loss_ema) else 0.95 * loss_ema + 0.05 * val
        acc_ema = acc if math.isnan(acc_ema) else 0.95 * acc_ema + 0.05 * acc
        bar.set_postfix(loss=f"{loss_ema:.3f}", top1=f"{acc_ema:.3f}", refresh=False)
    head.eval()
    save_head(head.cpu(), out_dir)
    return HeadTrainReport(cfg.name, cfg.train_steps, time.perf_counter() - t0, loss_ema, acc_ema,
                           cfg.num_steps, cfg.step_decay)
