"""The training loop the deep models share: seeds, device, mixed precision, progress, per-epoch
curves, early stopping on validation NDCG@10, NaN guard, test metrics and device-neutral export."""

from __future__ import annotations

import json
import logging
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from freshrec.evaluation import top_k
from freshrec.settings import TrainingSettings
from training.data import TOKEN_BUCKETS, TrainData, _flat, pad_histories
from training.deep import SASRec, SASRecEncoder, TwoTower

log = logging.getLogger(__name__)
DEEP_MODELS = ("two_tower", "sasrec")


class NanLoss(FloatingPointError):
    """The loss became NaN or infinite: the run stops and is marked failed with this reason."""


@dataclass
class TrainResult:
    model: str
    device: str
    epochs_run: int
    best_epoch: int
    best_val_ndcg: float
    history: list[dict] = field(default_factory=list)
    test: dict[str, float] = field(default_factory=dict)
    samples_per_second: float = 0.0
    train_seconds: float = 0.0
    item_vectors: np.ndarray | None = None
    user_vectors: np.ndarray | None = None
    encoder: torch.nn.Module | None = None
    params: dict = field(default_factory=dict)
    module: torch.nn.Module | None = None  # the whole trained model (CPU, float32)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def build_model(kind: str, data: TrainData, cfg: TrainingSettings) -> torch.nn.Module:
    if kind == "two_tower":
        return TwoTower(data.n_items, data.n_cats, TOKEN_BUCKETS, cfg.dim, 0.1, cfg.temperature)
    if kind == "sasrec":
        return SASRec(data.n_items, cfg.dim, cfg.max_len, cfg.sasrec_blocks, cfg.sasrec_heads,
                      cfg.dropout)
    raise ValueError(f"unknown deep model {kind!r}; known: {list(DEEP_MODELS)}")


class Encoders:
    """User and item vectors of a trained model, in batches, on its device."""

    def __init__(self, kind: str, model, data: TrainData, cfg: TrainingSettings, device) -> None:
        self.kind, self.model, self.data, self.cfg, self.device = kind, model, data, cfg, device
        self.cats = torch.as_tensor(data.cat_ids, device=device)
        self.toks = torch.as_tensor(data.tok_ids, device=device)

    @torch.no_grad()
    def items(self, known_ids: bool = True) -> np.ndarray:
        """(n_items, dim) vectors of items 1..n; ``known_ids=False``: from content alone."""
        self.model.eval()
        if self.kind == "sasrec":
            return self.model.items.weight[1:].float().cpu().numpy()
        out = []
        n = self.data.n_items
        for s in range(1, n + 1, 8192):
            idx = torch.arange(s, min(s + 8192, n + 1), device=self.device)
            ids = idx if known_ids else torch.zeros_like(idx)
            out.append(self.model.item(ids, self.cats[idx], self.toks[idx]).float().cpu())
        return torch.cat(out).numpy()

    def user_encoder(self) -> torch.nn.Module:
        return self.model.user if self.kind == "two_tower" else SASRecEncoder(self.model)

    @torch.no_grad()
    def users(self, seqs, users: np.ndarray) -> np.ndarray:
        self.model.eval()
        enc = self.user_encoder()
        out = []
        for s in range(0, len(users), 4096):
            h = pad_histories(seqs, users[s:s + 4096], None, self.cfg.max_len)
            out.append(enc(torch.as_tensor(h, device=self.device)).float().cpu())
        return torch.cat(out).numpy() if out else np.zeros((0, self.cfg.dim), np.float32)


def validation_ndcg(enc: Encoders, k: int = 10) -> float:
    data = enc.data
    seqs = data.train_sequences()
    iv = enc.items()
    uv = enc.users(seqs, data.val_users)
    scores = uv @ iv.T
    for j, u in enumerate(data.val_users):
        seen = seqs[u] - 1
        scores[j, seen[seen != data.val_items[j] - 1]] = -np.inf
    top = top_k(scores, k)
    hit = top == (data.val_items - 1)[:, None]
    return float((hit / np.log2(np.arange(2, k + 2))).sum(1).mean())


class Batcher:
    """Builds training batches with tensor ops on the training device: the fitting sequences live
    there as one flat tensor plus offsets, so a GPU is not held up by host-side padding and copies
    (one index transfer per epoch)."""

    def __init__(self, data: TrainData, cfg: TrainingSettings, kind: str, device) -> None:
        seqs = data.train_sequences()
        flat, offsets = _flat(seqs)
        self.kind, self.cfg, self.dev = kind, cfg, device
        self.flat = torch.as_tensor(np.concatenate([[0], flat]), device=device)  # [0] = padding
        self.offsets = torch.as_tensor(offsets + 1, device=device)
        self.lens = np.diff(offsets)
        self.ar = torch.arange(cfg.max_len + 1, device=device)
        if kind == "two_tower":
            self.users, self.pos = data.pairs(cfg.max_len)
        else:
            self.users = np.flatnonzero(self.lens >= 2)
        if len(self.users) == 0:
            raise ValueError(f"{data.name}: no user has two training events; nothing to learn")

    def _window(self, u: torch.Tensor, end: torch.Tensor, length: int) -> torch.Tensor:
        """(B, length) items before ``end`` of users ``u``, right-aligned, 0-padded."""
        cols = self.ar[:length].unsqueeze(0)
        n = torch.clamp(end, max=length).unsqueeze(1)
        idx = self.offsets[u].unsqueeze(1) + end.unsqueeze(1) - length + cols
        valid = cols >= (length - n)
        return torch.where(valid, self.flat[torch.where(valid, idx, torch.zeros_like(idx))],
                           torch.zeros_like(idx))

    def epoch(self, rng: np.random.Generator):
        cfg, L = self.cfg, self.cfg.max_len
        if self.kind == "two_tower":
            take = rng.choice(len(self.users), min(cfg.samples_per_epoch, len(self.users)), replace=False)
            u = torch.as_tensor(self.users[take], device=self.dev)
            p = torch.as_tensor(self.pos[take], device=self.dev)
            for s in range(0, len(take), cfg.batch_size):
                ub, pb = u[s:s + cfg.batch_size], p[s:s + cfg.batch_size]
                if len(ub) < 2:
                    continue
                yield self._window(ub, pb, L), self.flat[self.offsets[ub] + pb], len(ub)
        else:  # sasrec: one window of max_len + 1 per user, ending at a random position
            per_epoch = max(1, min(len(self.users) * 4, cfg.samples_per_epoch // max(1, L // 4)))
            pick = rng.choice(self.users, per_epoch, replace=True)
            lens = self.lens[pick]
            ends = np.where(rng.random(per_epoch) < 0.5, rng.integers(2, lens + 1), lens)
            u = torch.as_tensor(pick, device=self.dev)
            e = torch.as_tensor(ends, device=self.dev)
            bs = max(2, cfg.batch_size // 4)
            for s in range(0, per_epoch, bs):
                win = self._window(u[s:s + bs], e[s:s + bs], L + 1)
                yield win[:, :-1], win[:, 1:], win[:, 1:] > 0


def train(kind: str, data: TrainData, cfg: TrainingSettings, device: str,
          on_epoch=None, progress: bool = True, max_test_users: int = 0) -> TrainResult:
    """Fit ``kind`` on ``data``; ``on_epoch(epoch, metrics)`` is called after every epoch (MLflow
    curves). Raises :class:`NanLoss` when the loss stops being finite."""
    seed_everything(cfg.seed)
    dev = torch.device(device)
    model = build_model(kind, data, cfg).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    amp = dev.type == "cuda"
    amp_dtype = torch.bfloat16 if amp and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=amp and amp_dtype == torch.float16)
    q = data.item_counts / max(data.item_counts.sum(), 1.0)
    log_q = torch.as_tensor(np.log(np.maximum(q, 1e-12)), dtype=torch.float32, device=dev)
    cats = torch.as_tensor(data.cat_ids, device=dev)
    toks = torch.as_tensor(data.tok_ids, device=dev)
    neg_p = np.sqrt(data.item_counts[1:] + 1.0)  # negatives: popularity^0.5, logQ-corrected
    neg_p /= neg_p.sum()
    neg_t = torch.as_tensor(neg_p, dtype=torch.float32, device=dev)
    log_neg = torch.as_tensor(np.log(np.concatenate([[1.0], neg_p])), dtype=torch.float32, device=dev)
    enc = Encoders(kind, model, data, cfg, dev)
    batcher = Batcher(data, cfg, kind, dev)
    rng = np.random.default_rng(cfg.seed)
    best, best_epoch, best_state, bad = -1.0, 0, None, 0
    history, samples, train_s = [], 0, 0.0
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        t0 = time.perf_counter()
        total, steps, n_seen = 0.0, 0, 0
        batches = list(batcher.epoch(rng))
        for step, (xb, yb, n) in enumerate(batches, 1):
            with torch.autocast(device_type=dev.type, dtype=amp_dtype, enabled=amp):
                if kind == "two_tower":
                    loss = model.loss(xb, yb, cats[yb], toks[yb], log_q[yb])
                else:
                    negs = torch.multinomial(neg_t, cfg.negatives, replacement=True) + 1
                    loss = model.loss(xb, yb, negs, log_neg[yb], log_neg[negs])
            if (step == 1 or step % 50 == 0) and not torch.isfinite(loss):
                raise NanLoss(f"{kind}: loss is {loss.item()} at epoch {epoch}, step {step} "
                              f"(lr={cfg.lr}); lower the learning rate or check the input")
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            scaler.step(opt)
            scaler.update()
            total += loss.detach()  # summed on the device: no sync per step
            steps += 1
            n_seen += n if isinstance(n, int) else n.sum()
            if progress and step % max(1, len(batches) // 5) == 0:
                print(f"\r  {kind} epoch {epoch}: {step}/{len(batches)} batches, "
                      f"loss {float(total) / steps:.4f}", end="", file=sys.stderr, flush=True)
        total, n_seen = float(total), int(n_seen)
        if not math.isfinite(total):
            raise NanLoss(f"{kind}: loss is {total / max(steps, 1)} at epoch {epoch} (lr={cfg.lr}); "
                          "lower the learning rate or check the input")
        if amp:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        train_s += dt
        samples += n_seen
        val = validation_ndcg(enc)
        row = {"epoch": epoch, "train_loss": total / max(steps, 1), "val_ndcg_at_10": val,
               "samples_per_second": n_seen / dt if dt else 0.0, "epoch_seconds": dt}
        history.append(row)
        if progress:
            print(f"\r  {kind} epoch {epoch}: loss {row['train_loss']:.4f}, val NDCG@10 {val:.4f}, "
                  f"{row['samples_per_second']:,.0f} samples/s", file=sys.stderr, flush=True)
        if on_epoch:
            on_epoch(epoch, row)
        if val > best + 1e-6:
            best, best_epoch, bad = val, epoch, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            bad += 1
            if bad >= cfg.patience:
                break
    model.load_state_dict(best_state)
    model.eval()
    items = enc.items()
    users = enc.users(data.sequences, np.arange(data.n_users))
    test = data.evaluate(lambda rows: users[rows] @ items.T, max_users=max_test_users)
    model = model.to("cpu").float().eval()
    encoder = Encoders(kind, model, data, cfg, torch.device("cpu")).user_encoder()
    return TrainResult(kind, str(dev), len(history), best_epoch, best, history, test,
                       samples / train_s if train_s else 0.0, train_s, items, users, encoder,
                       {"model": kind, **cfg.model_dump()}, model)


def export(result: TrainResult, data: TrainData, out: Path, max_len: int) -> Path:
    """item vectors + ids (npz), a TorchScript user encoder (CPU) and a manifest (json)."""
    out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out / "arrays.npz", item_ids=data.split.item_ids.astype(str),
                        item_vectors=result.item_vectors.astype(np.float32))
    example = torch.zeros((2, max_len), dtype=torch.long)
    example[:, -3:] = torch.tensor([1, 2, 3])
    scripted = torch.jit.trace(result.encoder, example, check_trace=False)
    scripted.save(str(out / "user_encoder.pt"))
    if result.model == "two_tower":  # new items: their vector from id 0 + categories + tokens
        ex = (torch.tensor([0, 1]), torch.as_tensor(data.cat_ids[:2]), torch.as_tensor(data.tok_ids[:2]))
        torch.jit.trace(result.module.item, ex, check_trace=False).save(str(out / "item_encoder.pt"))
    (out / "model.json").write_text(json.dumps({
        "name": result.model, "kind": "deep_retrieval", "max_len": max_len,
        "input": "user_encoder.pt: int64 (batch, max_len) of 1-based indices into item_ids, "
                 "right-aligned, 0 = padding -> float32 (batch, dim); score = user . item_vectors",
        "item_encoder": "item_encoder.pt (two_tower): (ids int64 (n,), categories int64 (n, "
                        f"{data.cat_ids.shape[1]}), hashed tokens int64 (n, {data.tok_ids.shape[1]})) "
                        "-> float32 (n, dim); id 0 for items unseen in training",
        "best_epoch": result.best_epoch, "val_ndcg_at_10": result.best_val_ndcg,
        "params": result.params}, indent=2, default=str))
    return out


def finite(x: float) -> bool:
    return x is not None and math.isfinite(x)
