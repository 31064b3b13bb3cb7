"""Deep retrieval models: a two-tower model and SASRec, in PyTorch, CPU or GPU.

* **Two-tower.** The item tower reads an item's id (index 0 for unknown items; ids are dropped to 0
  at random in training, so the tower learns to place an item from its content alone), its
  categories and its hashed title/text tokens. The user tower reads the user's ``max_len`` most
  recent items (mean of their embeddings) and the log of their history length. Trained on
  next-item pairs with an in-batch sampled softmax; each logit is corrected by the log of the item's
  sampling probability (logQ, Yi et al. 2019), so popular items are not over-penalized as negatives.
* **SASRec** (Kang & McAuley 2018): causal self-attention over the user's recent items with learned
  positions; trained at every position against the next item and shared sampled negatives (also
  logQ-corrected); the user vector is the last position's output.

Both score ``user_vector · item_vector`` and export the item vectors (npz) plus a TorchScript user
encoder (CPU, float32) that serving runs without this code. The training loop is
:mod:`recmodels.deep_fit`; the recommenders under the contract are :mod:`recmodels.deep_retrieval`.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class ItemTower(nn.Module):
    def __init__(self, n_items: int, n_cats: int, n_tokens: int, dim: int, dropout: float) -> None:
        super().__init__()
        self.ids = nn.Embedding(n_items + 1, dim, padding_idx=0)
        self.cats = nn.EmbeddingBag(n_cats + 1, dim, mode="sum", padding_idx=0)
        self.toks = nn.EmbeddingBag(n_tokens + 1, dim, mode="sum", padding_idx=0)
        self.mlp = nn.Sequential(nn.Linear(3 * dim, 2 * dim), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(2 * dim, dim))

    def forward(self, ids: torch.Tensor, cats: torch.Tensor, toks: torch.Tensor) -> torch.Tensor:
        nc = (cats > 0).sum(1, keepdim=True).clamp(min=1)
        nt = (toks > 0).sum(1, keepdim=True).clamp(min=1)
        x = torch.cat([self.ids(ids), self.cats(cats) / nc, self.toks(toks) / nt], dim=1)
        return F.normalize(self.mlp(x), dim=-1)


class UserTower(nn.Module):
    """history (B, L) of 1-based item indices, 0 = padding -> (B, dim), unit length."""

    def __init__(self, n_items: int, dim: int, dropout: float) -> None:
        super().__init__()
        self.items = nn.Embedding(n_items + 1, dim, padding_idx=0)
        self.mlp = nn.Sequential(nn.Linear(dim + 1, 2 * dim), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(2 * dim, dim))

    def forward(self, history: torch.Tensor) -> torch.Tensor:
        mask = (history > 0).float().unsqueeze(-1)
        n = mask.sum(1)
        pooled = (self.items(history) * mask).sum(1) / n.clamp(min=1.0)
        x = torch.cat([pooled, torch.log1p(n)], dim=1)
        return F.normalize(self.mlp(x), dim=-1)


class TwoTower(nn.Module):
    def __init__(self, n_items: int, n_cats: int, n_tokens: int, dim: int = 64,
                 dropout: float = 0.1, temperature: float = 0.05, id_dropout: float = 0.1) -> None:
        super().__init__()
        self.user = UserTower(n_items, dim, dropout)
        self.item = ItemTower(n_items, n_cats, n_tokens, dim, dropout)
        self.temperature, self.id_dropout = temperature, id_dropout

    def loss(self, history, pos_ids, pos_cats, pos_toks, log_q) -> torch.Tensor:
        u = self.user(history)
        ids = pos_ids
        if self.training and self.id_dropout > 0:
            ids = torch.where(torch.rand_like(ids, dtype=torch.float) < self.id_dropout,
                              torch.zeros_like(ids), ids)
        v = self.item(ids, pos_cats, pos_toks)
        logits = (u @ v.T) / self.temperature - log_q.unsqueeze(0)
        same = pos_ids.unsqueeze(0) == pos_ids.unsqueeze(1)  # an in-batch repeat of the positive
        eye = torch.eye(len(pos_ids), dtype=torch.bool, device=logits.device)
        logits = logits.masked_fill(same & ~eye, float("-inf"))
        return F.cross_entropy(logits.float(), torch.arange(len(pos_ids), device=logits.device))


class SASRec(nn.Module):
    def __init__(self, n_items: int, dim: int = 64, max_len: int = 50, blocks: int = 2,
                 heads: int = 2, dropout: float = 0.2) -> None:
        super().__init__()
        self.items = nn.Embedding(n_items + 1, dim, padding_idx=0)
        self.pos = nn.Embedding(max_len, dim)
        layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout, batch_first=True,
                                           norm_first=True, activation="gelu")
        self.encoder = nn.TransformerEncoder(layer, blocks, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)
        self.max_len, self.heads = max_len, heads
        nn.init.normal_(self.items.weight, std=dim ** -0.5)
        nn.init.normal_(self.pos.weight, std=dim ** -0.5)
        with torch.no_grad():
            self.items.weight[0].zero_()
        self.register_buffer("causal", torch.triu(torch.ones(max_len, max_len, dtype=torch.bool), 1),
                             persistent=False)

    def hidden(self, seq: torch.Tensor) -> torch.Tensor:
        """seq (B, L) right-aligned, 0 = padding -> (B, L, dim)."""
        L = seq.shape[1]
        pos = torch.arange(L, device=seq.device).unsqueeze(0)
        x = self.drop(self.items(seq) + self.pos(pos))
        # query i sees keys j <= i that are items, and always itself (no row is fully masked)
        eye = torch.eye(L, dtype=torch.bool, device=seq.device)
        blocked = self.causal[:L, :L].unsqueeze(0) | ((seq == 0).unsqueeze(1) & ~eye)
        mask = torch.zeros(blocked.shape, dtype=x.dtype, device=seq.device) \
            .masked_fill(blocked, float("-inf")).repeat_interleave(self.heads, dim=0)
        h = self.encoder(x, mask=mask)
        return self.norm(h)

    def loss(self, seq, target, negatives, log_q_pos, log_q_neg) -> torch.Tensor:
        h = self.hidden(seq)
        valid = target > 0
        h, target, lq = h[valid], target[valid], log_q_pos[valid]
        pos = (h * self.items(target)).sum(-1, keepdim=True) - lq.unsqueeze(-1)
        neg = h @ self.items(negatives).T - log_q_neg.unsqueeze(0)
        neg = neg.masked_fill(negatives.unsqueeze(0) == target.unsqueeze(1), float("-inf"))
        logits = torch.cat([pos, neg], dim=1).float()
        return F.cross_entropy(logits, torch.zeros(len(target), dtype=torch.long, device=h.device))


class SASRecEncoder(nn.Module):
    """What serving runs: recent items (B, L) -> user vector (B, dim)."""

    def __init__(self, model: SASRec) -> None:
        super().__init__()
        self.model = model

    def forward(self, history: torch.Tensor) -> torch.Tensor:
        return self.model.hidden(history)[:, -1]
