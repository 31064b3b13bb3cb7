"""The embedded default dataset: synthetic events and items with a known structure.

Writes two files a user could have downloaded, ``events.parquet`` (text columns, as raw files come)
and ``items.parquet``, which the importers then take like any other file. The generator is seeded
and vectorized (1M events in a few seconds). Structure, so every method has something to find:

* Zipf item popularity; items belong to latent taste clusters, users to one or two clusters, and
  sessions stay inside one cluster, so collaborative filtering clearly beats popularity;
* time order: sessions spread over ``days`` days, events inside a session a minute or so apart;
* categories and title/text words are drawn from each cluster's own vocabulary, so content
  features carry signal;
* a small share of malformed rows (bad ids, timestamps, event types, values) and duplicated
  ``event_id`` rows, so the dead-letter and dedupe paths run on the default data.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from freshrec.settings import SynthSettings

EVENT_MIX = {"view": 0.70, "click": 0.17, "add_to_cart": 0.05, "purchase": 0.04, "rating": 0.04}
MALFORMED_KINDS = ("missing_user", "bad_ts", "unknown_type", "value_out_of_range", "long_item_id")
_WORDS_PER_CLUSTER = 25
_GENERIC_WORDS = ["great", "new", "classic", "best", "special", "edition", "pack", "deluxe", "mini",
                  "pro", "original", "limited", "plus", "series", "collection", "set"]


@dataclass(frozen=True)
class SynthResult:
    events_path: Path
    items_path: Path
    n_events: int
    n_malformed: int
    n_duplicates: int
    item_cluster: np.ndarray
    user_clusters: np.ndarray


def _zipf_weights(n: int, s: float, rng: np.random.Generator) -> np.ndarray:
    w = 1.0 / np.arange(1, n + 1) ** s
    return rng.permutation(w)


def _cluster_vocab(c: int) -> list[str]:
    # Pronounceable, distinct words per cluster: cluster c's words share the syllable of c.
    syll = ["ka", "lo", "mi", "ne", "ru", "ta", "vo", "zi", "be", "do", "fu", "gi", "ho", "ju", "pe",
            "qu", "sa", "ti", "wu", "xe", "ya", "co", "di", "fa", "lu", "mo", "ni", "po", "ri", "se"]
    base = syll[c % len(syll)] + syll[(c * 7 + 3) % len(syll)]
    return [f"{base}{syll[j % len(syll)]}{j // len(syll) or ''}" for j in range(_WORDS_PER_CLUSTER)]


def make_items(cfg: SynthSettings, rng: np.random.Generator) -> tuple[pa.Table, np.ndarray]:
    n, c = cfg.n_items, cfg.n_clusters
    item_cluster = rng.integers(0, c, size=n)
    second_cat = np.where(rng.random(n) < 0.3, rng.integers(0, c, size=n), -1)
    vocab = [_cluster_vocab(k) for k in range(c)]
    titles, cats, texts, attrs = [], [], [], []
    for i in range(n):
        k = int(item_cluster[i])
        words = rng.choice(vocab[k], size=4, replace=False).tolist()
        generic = rng.choice(_GENERIC_WORDS, size=2, replace=False).tolist()
        titles.append(f"{words[0].capitalize()} {generic[0]} {words[1]} #{i}")
        cat = [f"genre_{k:02d}"] + ([f"genre_{second_cat[i]:02d}"] if second_cat[i] >= 0 else [])
        cats.append(cat)
        noise = rng.choice(vocab[int(rng.integers(0, c))], size=2).tolist()
        texts.append(" ".join(words + generic + noise))
        attrs.append(json.dumps({"price": round(float(rng.gamma(2.0, 12.0)), 2)}))
    table = pa.table({
        "item_id": [f"i{i}" for i in range(n)],
        "title": titles,
        "categories": pa.array(cats, pa.list_(pa.string())),
        "text": texts,
        "attributes": attrs,
    })
    return table, item_cluster


def make_events(cfg: SynthSettings, item_cluster: np.ndarray, end: datetime,
                rng: np.random.Generator) -> tuple[dict[str, np.ndarray], np.ndarray]:
    n_users, n_items, c = cfg.n_users, cfg.n_items, cfg.n_clusters
    pop = _zipf_weights(n_items, 0.9, rng)
    # Items of each cluster, with cumulative popularity, for sampling inside a cluster.
    order = np.argsort(item_cluster, kind="stable")
    bounds = np.searchsorted(item_cluster[order], np.arange(c + 1))
    cum = [np.cumsum(pop[order[bounds[k]:bounds[k + 1]]]) for k in range(c)]

    user_clusters = np.stack([rng.integers(0, c, n_users), rng.integers(0, c, n_users)], axis=1)
    activity = rng.lognormal(mean=0.0, sigma=1.0, size=n_users)
    counts = np.maximum(1, np.round(activity / activity.sum() * cfg.n_events)).astype(np.int64)
    users = np.repeat(np.arange(n_users), counts)
    n = len(users)
    rank_in_user = np.arange(n) - np.repeat(np.cumsum(counts) - counts, counts)

    # Sessions of about 5 events; each session stays in one of the user's clusters, or (20%) in a
    # random one, which is what popularity alone would explain.
    session = rank_in_user // 5
    session_key = users.astype(np.int64) * 100_000 + session
    uniq_sessions, sess_idx = np.unique(session_key, return_inverse=True)
    sess_user = uniq_sessions // 100_000
    pick_second = rng.random(len(uniq_sessions)) < 0.35
    sess_cluster = user_clusters[sess_user, pick_second.astype(int)]
    off_taste = rng.random(len(uniq_sessions)) < 0.2
    sess_cluster = np.where(off_taste, rng.integers(0, c, len(uniq_sessions)), sess_cluster)
    span_s = cfg.days * 86400
    sess_start = rng.uniform(0, span_s - 3600, size=len(uniq_sessions))

    ev_cluster = sess_cluster[sess_idx]
    items = np.empty(n, dtype=np.int64)
    for k in range(c):
        mask = ev_cluster == k
        m = int(mask.sum())
        if m == 0 or len(cum[k]) == 0:
            items[mask] = rng.integers(0, n_items, m)
            continue
        r = rng.uniform(0, cum[k][-1], m)
        items[mask] = order[bounds[k] + np.searchsorted(cum[k], r)]

    offset = (rank_in_user % 5) * rng.exponential(60.0, n)
    secs = sess_start[sess_idx] + offset
    start = end - timedelta(seconds=span_s)
    ts = np.datetime64(start.replace(tzinfo=None), "s") + (secs * 1e6).astype("timedelta64[us]")

    types = np.array(list(EVENT_MIX))
    ev_type = types[rng.choice(len(types), size=n, p=np.array(list(EVENT_MIX.values())))]
    liked = item_cluster[items] == user_clusters[users, 0]
    rating = np.clip(np.round(rng.normal(np.where(liked, 4.2, 3.0), 0.8)), 1, 5)
    value = np.where(ev_type == "rating", rating, np.where(ev_type == "purchase", 1.0, np.nan))
    return {"user": users, "item": items, "ts": ts, "type": ev_type, "value": value}, user_clusters


def ground_truth(cfg: SynthSettings) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The hidden structure behind :func:`write_synth` with the same settings (same seed, same
    draws): each item's cluster, each item's popularity weight, each user's two taste clusters.
    The training lane's simulator is built from it."""
    rng = np.random.default_rng(cfg.seed)
    _, item_cluster = make_items(cfg, rng)
    pop = _zipf_weights(cfg.n_items, 0.9, rng)
    user_clusters = np.stack([rng.integers(0, cfg.n_clusters, cfg.n_users),
                              rng.integers(0, cfg.n_clusters, cfg.n_users)], axis=1)
    return item_cluster, pop, user_clusters


def write_synth(cfg: SynthSettings, out_dir: Path, end: datetime | None = None) -> SynthResult:
    """Generate the dataset into ``out_dir`` (events.parquet, items.parquet); returns a summary."""
    rng = np.random.default_rng(cfg.seed)
    end = end or datetime.now(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
    out_dir.mkdir(parents=True, exist_ok=True)
    items, item_cluster = make_items(cfg, rng)
    ev, user_clusters = make_events(cfg, item_cluster, end, rng)
    n = len(ev["user"])

    event_id = np.char.add("e", np.arange(n).astype(str))
    user_id = np.char.add("u", ev["user"].astype(str)).astype(object)
    item_id = np.char.add("i", ev["item"].astype(str)).astype(object)
    ts = np.datetime_as_string(ev["ts"], unit="s").astype(object) + "+00:00"
    value = np.where(np.isnan(ev["value"]), None, np.char.mod("%.1f", ev["value"])).astype(object)
    etype = ev["type"].astype(object)

    n_bad = int(round(n * cfg.malformed_fraction))
    bad = rng.choice(n, size=n_bad, replace=False)
    kinds = np.array(MALFORMED_KINDS)[rng.integers(0, len(MALFORMED_KINDS), n_bad)]
    for row, kind in zip(bad, kinds):
        if kind == "missing_user":
            user_id[row] = ""
        elif kind == "bad_ts":
            ts[row] = "yesterday-ish"
        elif kind == "unknown_type":
            etype[row] = "hover"
        elif kind == "value_out_of_range":
            etype[row], value[row] = "rating", "42"
        else:
            item_id[row] = "i" * 300

    order = np.argsort(ev["ts"], kind="stable")
    n_dup = int(round(n * cfg.duplicate_fraction))
    dup = rng.choice(n, size=n_dup, replace=False)
    order = np.concatenate([order, dup])
    events = pa.table({
        "event_id": pa.array(event_id[order].astype(object), pa.string()),
        "user_id": pa.array(user_id[order], pa.string()),
        "item_id": pa.array(item_id[order], pa.string()),
        "event_type": pa.array(etype[order], pa.string()),
        "value": pa.array(value[order], pa.string()),
        "ts": pa.array(ts[order], pa.string()),
    })
    events_path, items_path = out_dir / "events.parquet", out_dir / "items.parquet"
    pq.write_table(events, events_path)
    pq.write_table(items, items_path)
    return SynthResult(events_path, items_path, events.num_rows, n_bad, n_dup,
                       item_cluster, user_clusters)
