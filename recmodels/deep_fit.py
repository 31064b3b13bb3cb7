"""The one training loop of the deep models (two-tower, SASRec): seeds, device, mixed precision,
progress, per-epoch curves, early stopping on validation NDCG@10, NaN guard, and the device-neutral
encoder files of the exported artifact.

Used by the recommenders of :mod:`recmodels.deep_retrieval` (``fit(Interactions)``) and by the
training lane (``freshrec train``, which adds the dataset, the test metrics, MLflow and the gate).
The input is a :class:`recmodels.sequences.SequenceData`; with no validation users the loop runs
every epoch and keeps the last one.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from recmodels.evaluation import top_k
from freshrec.progress import advance
from recmodels.deep import SASRec, SASRecEncoder, TwoTower
from recmodels.sequences import TOKEN_BUCKETS, SequenceData, _flat, pad_histories

log = logging.getLogger(__name__)
DEEP_MODELS = ("two_tower", "sasrec")
USER_ENCODER = "user_encoder.pt"
ITEM_ENCODER = "item_encoder.pt"


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
    module: torch.nn.Module | None = None  # the whole trained model (CPU, float32, eval mode)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def build_model(kind: str, data: SequenceData, cfg) -> torch.nn.Module:
    if kind == "two_tower":
        return TwoTower(data.n_items, data.n_cats, TOKEN_BUCKETS, cfg.dim, 0.1, cfg.temperature)
    if kind == "sasrec":
        return SASRec(data.n_items, cfg.dim, cfg.max_len, cfg.sasrec_blocks, cfg.sasrec_heads,
                      cfg.dropout)
    raise ValueError(f"unknown deep model {kind!r}; known: {list(DEEP_MODELS)}")


def user_encoder(kind: str, model: torch.nn.Module) -> torch.nn.Module:
    """What serving runs: recent items (B, max_len) -> user vector (B, dim)."""
    return model.user if kind == "two_tower" else SASRecEncoder(model)


class Encoders:
    """User and item vectors of a trained model, in batches, on its device."""

    def __init__(self, kind: str, model, data: SequenceData, cfg, device) -> None:
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
        return user_encoder(self.kind, self.model)

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
    top = top_k(scores, min(k, scores.shape[1]))
    hit = top == (data.val_items - 1)[:, None]
    return float((hit / np.log2(np.arange(2, top.shape[1] + 2))).sum(1).mean())


class Batcher:
    """Builds training batches with tensor ops on the training device: the fitting sequences live
    there as one flat tensor plus offsets, so a GPU is not held up by host-side padding and copies
    (one index transfer per epoch)."""

    def __init__(self, data: SequenceData, cfg, kind: str, device) -> None:
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


def fit(kind: str, data: SequenceData, cfg, device: str, on_epoch=None,
        progress: bool = True) -> TrainResult:
    """Fit ``kind`` on ``data`` with the settings ``cfg`` (a :class:`freshrec.settings.
    TrainingSettings`); ``on_epoch(epoch, metrics)`` is called after every epoch (MLflow curves).
    Returns the best epoch's model (the last one without validation users) on the CPU in eval mode,
    its item vectors (two-tower items without training events: from their content alone) and the
    vectors of every user over their whole sequence (computed on ``device``). Raises
    :class:`NanLoss` when the loss stops being finite."""
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
    validate = len(data.val_users) > 0
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
                advance(log, f"{kind} epoch {epoch}", step, len(batches),
                        "%s epoch %d: %d/%d batches, loss %.4f", kind, epoch, step, len(batches),
                        float(total) / steps)
        total, n_seen = float(total), int(n_seen)
        if not math.isfinite(total):
            raise NanLoss(f"{kind}: loss is {total / max(steps, 1)} at epoch {epoch} (lr={cfg.lr}); "
                          "lower the learning rate or check the input")
        if amp:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        train_s += dt
        samples += n_seen
        row = {"epoch": epoch, "train_loss": total / max(steps, 1),
               "samples_per_second": n_seen / dt if dt else 0.0, "epoch_seconds": dt}
        if validate:
            row["val_ndcg_at_10"] = validation_ndcg(enc)
        history.append(row)
        if progress:
            val = f", val NDCG@10 {row['val_ndcg_at_10']:.4f}" if validate else ""
            advance(log, f"{kind} epochs", epoch, cfg.epochs, "%s epoch %d: loss %.4f%s, %s samples/s",
                    kind, epoch, row["train_loss"], val, f"{row['samples_per_second']:,.0f}")
        if on_epoch:
            on_epoch(epoch, row)
        if not validate:
            best, best_epoch = float("nan"), epoch
        elif row["val_ndcg_at_10"] > best + 1e-6:
            best, best_epoch, bad = row["val_ndcg_at_10"], epoch, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            bad += 1
            if bad >= cfg.patience:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    items = enc.items()
    cold = data.item_counts[1:] == 0
    if kind == "two_tower" and cold.any():  # never trained on: the id embedding is noise
        items[cold] = enc.items(known_ids=False)[cold]
    users = enc.users(data.sequences, np.arange(data.n_users))
    model = model.to("cpu").float().eval()
    return TrainResult(kind, str(dev), len(history), best_epoch, best, history, {},
                       samples / train_s if train_s else 0.0, train_s, items, users,
                       user_encoder(kind, model), {"model": kind, **cfg.model_dump()}, model)


# -- the encoder files of the artifact --------------------------------------------------------------
def encoder_scorer(kind: str, max_len: int) -> dict:
    """The ``encoder`` scorer settings of :mod:`recmodels.servable` for ``kind``."""
    scorer = {"type": "encoder", "encoder": USER_ENCODER, "max_len": int(max_len)}
    if kind == "two_tower":
        scorer["item_encoder"] = ITEM_ENCODER
    return scorer


@torch.no_grad()
def trace_user_encoder(kind: str, module: torch.nn.Module, max_len: int, n_items: int):
    """The TorchScript user encoder (CPU, float32, eval mode) that serving runs: int64 (batch,
    max_len) of 1-based catalog positions, right-aligned, 0 = padding -> float32 (batch, dim)."""
    module = module.to("cpu").float().eval()
    example = torch.zeros((2, max_len), dtype=torch.long)
    k = max(1, min(3, n_items, max_len))
    example[:, -k:] = torch.arange(1, k + 1)
    return torch.jit.trace(user_encoder(kind, module), example, check_trace=False)


@torch.no_grad()
def save_encoders(directory: Path, kind: str, module: torch.nn.Module, max_len: int,
                  cat_ids: np.ndarray, tok_ids: np.ndarray, scripted=None) -> None:
    """Write ``user_encoder.pt`` (``scripted`` when given, else traced from ``module``) and, for the
    two-tower, ``item_encoder.pt``: (ids int64 (n,), categories int64 (n, MAX_CATS), hashed tokens
    int64 (n, MAX_TOKENS)) -> float32 (n, dim), id 0 for items unseen in training."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    n_items = cat_ids.shape[0] - 1
    if scripted is None:
        scripted = trace_user_encoder(kind, module, max_len, n_items)
    scripted.save(str(directory / USER_ENCODER))
    if kind == "two_tower":  # new items: their vector from id 0 + categories + tokens
        module = module.to("cpu").float().eval()
        m = min(2, n_items + 1)
        ex = (torch.arange(m), torch.as_tensor(cat_ids[:m]), torch.as_tensor(tok_ids[:m]))
        torch.jit.trace(module.item, ex, check_trace=False).save(str(directory / ITEM_ENCODER))
