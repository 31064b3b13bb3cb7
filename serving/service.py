"""The serving domain: what the Recommender and Admin calls do, with no gRPC context in sight.

:class:`FreshrecService` holds the served arms and their states (loaded from snapshots,
:mod:`serving.state`), the per-user response cache, the recent events of each user (in memory),
and answers Recommend, SimilarItems and RecordEvents with the pure logic of :mod:`serving.logic`,
user ids pseudonymized with the same HMAC as ingest. It reads the snapshots and the model
registry (loads); it writes the accepted events to the write-ahead log (fsynced before
``RecordEvents`` returns, then moved to the landing zone: :mod:`serving.wal`), the served slates to
the impression log (:mod:`serving.impressions`) and, for an erasure, the tables, logs and
snapshots (:func:`freshrec.privacy.erasure.erase_user`); it opens the audit log
(``<data_dir>/audit/admin.jsonl``) that the Admin operations (:mod:`serving.admin`) write.

Requests and replies are the API's protobuf messages; a refusal is a
:class:`~serving.errors.ServiceError` that carries its gRPC status code, which the servicers
(:mod:`serving.grpc_api`) answer with. The gRPC process around it (listening, guard, health,
metrics endpoint, lifecycle) is :class:`serving.server.FreshrecServer`, a subclass.
"""

from __future__ import annotations

import functools
import gc
import itertools
import json
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

from freshrec.contracts import registry
from freshrec.contracts.events import WHITESPACE, rules_for, value_text
from freshrec.contracts.experiments import Assigner, ExperimentError
from freshrec.privacy.erasure import erase_user
from freshrec.privacy.pseudonyms import pseudonymizer
from freshrec.privacy.volume import check_volume_encryption
from freshrec.settings import Settings
from freshrec.storage.crypto import cipher_for, private_umask
from freshrec.tracking import mlflow_for
from serving import logic
from serving.audit import AuditLog
from serving.cache import UserCache
from serving.errors import DeadlineExceeded, InvalidArgument, NotFound, Unavailable
from serving.experiment import (ArmMonitor, ArmState, OnlineCollector, distinct_states,
                                online_report_path, version_of)
from serving.gpu import serving_gpu
from serving.impressions import ImpressionLog
from serving.methods import rec_pb2
from serving.metrics import Metrics, set_gauges, set_monitor
from serving.rerank import load_reranker
from serving.state import ServingState, load_state
from serving.wal import EventLog

log = logging.getLogger(__name__)
PSEUDONYM_CACHE = 100_000  # raw user ids whose pseudonym a server keeps (LRU)
NO_FILTERS = logic.Filters()
TimeRemaining = Callable[[], "float | None"]  # seconds left before the caller's deadline, or None


def _filters(msg) -> logic.Filters:
    return logic.Filters(include_categories=frozenset(msg.include_categories),
                         exclude_items=frozenset(msg.exclude_items),
                         exclude_seen=msg.exclude_seen if msg.HasField("exclude_seen") else True)


def _scored(result: logic.Result):
    return [rec_pb2.ScoredItem(item_id=s.item_id, score=s.score, source=s.source,
                               explanation=s.explanation, propensity=1.0) for s in result.items]


class FreshrecService:
    """The served arms and what the calls do with them; see the module's docstring."""

    def __init__(self, settings: Settings, use_gpu: bool | None = None) -> None:
        private_umask()  # logs, snapshots, landed files: the owner's only (0600 / 0700)
        check_volume_encryption(settings, "serve")  # refuses, naming the setting
        self.settings = settings
        if use_gpu is None:
            use_gpu = serving_gpu(settings.device)
        self.use_gpu = use_gpu
        self.arms: tuple[ArmState, ...] = ()  # swapped whole; arms[0] is the control
        self._state: ServingState | None = None
        self.metrics = Metrics()
        exp = settings.serving.experiment
        self.assigner = Assigner(exp) if exp.enabled else None
        self.sample_tick = itertools.count()
        self.sample_every = settings.serving.monitor.sample_every
        self.metrics.registry.register(OnlineCollector(online_report_path(settings.data_dir)))
        self.cache = UserCache(settings.serving.cache_size, settings.serving.cache_ttl_seconds)
        self.audit = AuditLog(settings.data_dir / "audit" / "admin.jsonl", cipher_for(settings))
        self.wal = EventLog(settings)
        self.impressions: ImpressionLog | None = None
        if settings.serving.log_impressions:
            self.impressions = ImpressionLog(settings)
        # user -> their newest events, least recently active first (an LRU under max_recent_users)
        self.recent: OrderedDict[str, deque] = OrderedDict()
        self.recent_lock = threading.Lock()
        # Loads, deltas and deletions change the served state: one at a time, so a delta never
        # lands on a state that a concurrent load is replacing, and erasures do not race.
        self._load_lock = threading.RLock()
        self.state_id = 0  # bumped by every load; ApplyDeltas may name the one it was computed for
        # raw id -> pseudonym, the HMAC (chain) computed once per id while it stays among the
        # PSEUDONYM_CACHE most recent; cleared whole by every erasure (forget_recent)
        self._pseudonym = functools.lru_cache(maxsize=PSEUDONYM_CACHE)(pseudonymizer(settings))
        self.reranker = load_reranker(settings)

    def pseudonym(self, raw: str) -> str:
        return self._pseudonym(raw)

    @property
    def state(self) -> ServingState | None:
        """The control arm's state (the only one without an experiment)."""
        return self._state

    @state.setter
    def state(self, state: ServingState | None) -> None:
        """Assigned directly (benchmarks): that state becomes the one unnamed arm."""
        self._state = state
        if state is not None and (not self.arms or self.arms[0].state is not state):
            self.arms = (self._arm("", state.model_version, 1.0, version_of(state.model_version),
                                   state, {}),)

    def arm_for(self, user: str) -> ArmState:
        """The arm serving ``user``: by the experiment's salted hash, else the only one."""
        arms = self.arms
        if self.assigner is None or len(arms) == 1:
            return arms[0]
        return arms[self.assigner.index(user)]

    def find_arm(self, name: str | None) -> ArmState | None:
        """The arm named (empty: the control); InvalidArgument names the known arms."""
        arms = self.arms
        if not name:
            return arms[0] if arms else None
        for a in arms:
            if a.name == name:
                return a
        known = ", ".join(a.name for a in arms if a.name) or "none (no serving.experiment)"
        raise InvalidArgument(f"no arm {name!r}; arms: {known}")

    def distinct_states(self) -> list[ServingState]:
        return distinct_states(self.arms)

    def require_state(self) -> ServingState:
        state = self.state
        if state is None:
            raise Unavailable("no index loaded yet; call Admin.LoadSnapshot or wait for start-up "
                              "to finish")
        return state

    @staticmethod
    def check_deadline(time_remaining: TimeRemaining | None) -> None:
        remaining = time_remaining() if time_remaining is not None else None
        if remaining is not None and remaining <= 0:
            raise DeadlineExceeded("deadline passed before the answer")

    # ---- Recommender --------------------------------------------------------------------------
    def _check_k(self, k: int) -> None:
        max_k = self.settings.serving.max_k
        if not 1 <= k <= max_k:
            raise InvalidArgument(f"k must be within [1, {max_k}], got {k}")

    def _check_id(self, value: str, field: str) -> None:
        limit = self.settings.serving.max_id_length
        if not value:
            raise InvalidArgument(f"{field} is empty")
        if len(value) > limit:
            raise InvalidArgument(f"{field} is {len(value)} characters long; at most {limit}")

    def _check_filters(self, f) -> None:
        limit = self.settings.serving.max_id_length
        if len(f.exclude_items) > 10_000 or len(f.include_categories) > 1_000:
            raise InvalidArgument("too many filter values (at most 10000 exclude_items and 1000 "
                                  "include_categories)")
        if any(len(x) > limit for x in [*f.exclude_items, *f.include_categories]):
            raise InvalidArgument(f"a filter value is longer than {limit} characters")

    def recommend(self, request, time_remaining: TimeRemaining | None = None):
        """A RecommendResponse for a RecommendRequest: validated, from the cache or computed (the
        user's own recent events count now), re-ranked where a policy is loaded, logged as an
        impression."""
        self._check_id(request.user_id, "user_id")
        self._check_k(request.k)
        has_filters = request.HasField("filters")
        if has_filters:
            self._check_filters(request.filters)
        if request.context:
            problem = self.context_problem(request.context)
            if problem:
                raise InvalidArgument(f"context {problem}")
        if len(request.request_id) > self.settings.serving.max_id_length:
            raise InvalidArgument("request_id is longer than "
                                  f"{self.settings.serving.max_id_length} characters")
        self.require_state()
        user = self.pseudonym(request.user_id)
        arm = self.arm_for(user)
        state = arm.state
        arm.served.inc()
        filters = _filters(request.filters) if has_filters else NO_FILTERS
        ctx = dict(request.context) if request.context else {}
        explain = request.want_explanations
        cache = self.cache
        key = token = None
        if cache.size:
            key = (user, request.k, filters, tuple(sorted(ctx.items())), state.model_version,
                   explain)
            token = cache.token(user)
            cached = cache.get(key)
            if cached is not None:
                self.metrics.cache_hits.inc()
                reply = rec_pb2.RecommendResponse()
                reply.CopyFrom(cached[0])
                return self._served(request, reply, user, cached[1], cached[2], None)
            self.metrics.cache_misses.inc()
        self.check_deadline(time_remaining)
        # Request-time freshness: the user's own new events count now, whatever the model kind.
        recent = self.recent_events(user)
        rr = self.reranker
        n = max(request.k, rr.candidates) if rr else request.k
        result = logic.recommend(state, user, n, filters, ctx, recent,
                                 self.settings.serving.overfetch, explain=explain)
        if rr is not None and not result.cold_start:
            # explores: not cached, every served item carries its propensity (and is logged)
            history = [i for i, _ in reversed(recent)] + sorted(state.seen.get(user, ()))
            picked = rr.rerank(state, user, history, result.items, request.k)
            reply = rec_pb2.RecommendResponse(
                items=[rec_pb2.ScoredItem(item_id=s.item_id, score=s.score, source=f"{s.source}+{rr.name}",
                                          explanation=s.explanation, propensity=p) for s, p in picked],
                model_version=result.model_version, cold_start=False, arm=arm.name)
            return self._served(request, reply, user, [s.item_id for s, _ in picked],
                                [float(s.score) for s, _ in picked], [float(p) for _, p in picked],
                                candidates=result.items)
        items = result.items[:request.k]
        ids, scores = [x.item_id for x in items], [x.score for x in items]
        if not result.cold_start and next(self.sample_tick) % self.sample_every == 0:
            arm.monitor.add(ids, scores)
        # fields left at their defaults are not passed: protobuf sets each one it is given
        reply = rec_pb2.RecommendResponse(model_version=result.model_version)
        if result.cold_start:
            reply.cold_start = True
        if arm.name:
            reply.arm = arm.name
        add = reply.items.add
        for x in items:
            if x.explanation:
                add(item_id=x.item_id, score=x.score, source=x.source, explanation=x.explanation,
                    propensity=1.0)
            else:
                add(item_id=x.item_id, score=x.score, source=x.source, propensity=1.0)
        if key is not None:
            cache.put(key, (reply, ids, scores), token)
        return self._served(request, reply, user, ids, scores, None)

    def _served(self, request, reply, user: str, items: list[str], scores: list[float],
                propensities: list[float] | None, candidates: list | None = None):
        """Name the slate (the request's request_id or a new one) and log it as an impression
        (propensity 1.0 per item when the ranker was deterministic; a re-ranked slate also logs
        the candidates it was chosen from, which off-policy learning needs)."""
        imp = self.impressions
        if imp is None:
            reply.request_id = request.request_id
            return reply
        rid = request.request_id or imp.new_request_id()
        reply.request_id = rid
        if items:
            imp.record(rid, user, reply.model_version, reply.arm or None, items,
                       scores, propensities or [1.0] * len(items),
                       None if candidates is None else [c.item_id for c in candidates],
                       None if candidates is None else [float(c.score) for c in candidates])
        return reply

    def similar_items(self, request, time_remaining: TimeRemaining | None = None):
        """A SimilarItemsResponse; NotFound when the item is not in the served catalog."""
        self._check_id(request.item_id, "item_id")
        self._check_k(request.k)
        self._check_filters(request.filters)
        state = self.require_state()
        self.check_deadline(time_remaining)
        try:
            result = logic.similar_items(state, request.item_id, request.k,
                                         _filters(request.filters),
                                         self.settings.serving.overfetch)
        except logic.NotFound as e:
            raise NotFound(str(e)) from None
        return rec_pb2.SimilarItemsResponse(items=_scored(result), model_version=result.model_version)

    def record_events(self, request, time_remaining: TimeRemaining | None = None):
        """Validate each event (a refused one is a rejection, not an error), append the accepted
        ones to the write-ahead log (durable before the reply) and fold them in now."""
        limit = self.settings.serving.max_events_per_call
        if not request.events:
            raise InvalidArgument("events is empty: send at least one")
        if len(request.events) > limit:
            raise InvalidArgument(f"{len(request.events)} events in one call; at most {limit}")
        accepted, rejections = [], []
        for n, ev in enumerate(request.events):
            reason = self.validate_event(ev)
            if reason:
                rejections.append(rec_pb2.Rejection(index=n, reason=reason))
            else:
                accepted.append(self.event_record(ev))
        self.check_deadline(time_remaining)
        self.wal.append(accepted)  # durable (fsynced) before the reply
        self.note_events(accepted)
        if self.reranker is not None:
            for r in accepted:
                self.reranker.feedback(r["user_id"], r["item_id"], r["event_type"])
        return rec_pb2.RecordEventsResponse(accepted=len(accepted), rejections=rejections)

    # ---- events -------------------------------------------------------------------------------
    def validate_event(self, ev) -> str | None:
        """None, or why the event is refused: the event rules (freshrec/contracts/events.py, the
        same the clean job applies, on the pseudonymized user id it will see) plus the request
        limits of serving (raw id length, context size)."""
        rules, limit = rules_for(self.settings), self.settings.serving.max_id_length
        value = ev.value if ev.HasField("value") else None
        user = self.pseudonym(ev.user_id) if ev.user_id.strip(WHITESPACE) else ""
        reason = rules.check(user, ev.item_id, ev.event_type,
                             ev.ts or datetime.now(timezone.utc).isoformat(), value, ev.event_id)
        if reason:
            return rules.explain(reason, event_type=ev.event_type, value=value, ts=ev.ts)
        if max(len(ev.user_id), len(ev.item_id), len(ev.event_id)) > limit:
            return f"an id is longer than {limit} characters (serving.max_id_length)"
        problem = self.context_problem(ev.context)
        return f"context {problem}" if problem else None

    def context_problem(self, ctx) -> str | None:
        """None, or why a context map (request or event) is too large."""
        cfg = self.settings.serving
        if len(ctx) > cfg.max_context_entries:
            return (f"has {len(ctx)} entries; at most {cfg.max_context_entries} "
                    "(serving.max_context_entries)")
        size = sum(len(k.encode()) + len(v.encode()) for k, v in ctx.items())
        if size > cfg.max_context_bytes:
            return (f"holds {size} bytes of keys and values; at most {cfg.max_context_bytes} "
                    "(serving.max_context_bytes)")
        return None

    def event_record(self, ev) -> dict:
        """The raw (text) row of an accepted event, as the write-ahead log lands it for clean."""
        ts = ev.ts or datetime.now(timezone.utc).isoformat()
        return {"event_id": ev.event_id.strip(WHITESPACE) or None,
                "user_id": self.pseudonym(ev.user_id), "item_id": ev.item_id.strip(WHITESPACE),
                "event_type": ev.event_type.strip(WHITESPACE),
                "value": value_text(ev.value) if ev.HasField("value") else None, "ts": ts,
                "context": json.dumps(dict(ev.context)) if ev.context else None}

    def note_events(self, records: list[dict]) -> None:
        if not records:
            return
        n = self.settings.serving.recent_events_per_user
        cap = self.settings.serving.max_recent_users
        rules = rules_for(self.settings)  # the weight clean will write to silver events.weight
        now = time.time()
        evicted = 0
        with self.recent_lock:
            for r in records:
                w = rules.weight(r["event_type"], r["value"])
                q = self.recent.get(r["user_id"])
                if q is None:
                    q = self.recent[r["user_id"]] = deque(maxlen=n)
                else:
                    self.recent.move_to_end(r["user_id"])
                q.append((r["item_id"], w, now))
            while len(self.recent) > cap:  # the least recently active go first
                self.recent.popitem(last=False)
                evicted += 1
            held = len(self.recent)
        self.metrics.recent_users.set(held)
        if evicted:
            self.metrics.recent_evictions.inc(evicted)
        for user in {r["user_id"] for r in records}:
            self.cache.invalidate_user(user)
        self.metrics.events.inc(len(records))

    def recent_events(self, user: str) -> list[tuple[str, float]]:
        if user not in self.recent:  # most calls: no lock (a dict lookup is atomic)
            return []
        with self.recent_lock:
            return [(i, w) for i, w, _ in self.recent.get(user, ())]

    # ---- erasure ------------------------------------------------------------------------------
    def delete_user(self, user: str, raw_id: str | None = None) -> tuple[bool, int]:
        """Erase ``user`` (a pseudonym) from this replica's memory and everywhere on disk
        (:func:`freshrec.privacy.erasure.erase_user`: tables and every earlier version, landing, logs,
        snapshots, MLflow artifacts); other replicas drop them at the refresher's next round.
        Returns (whether this replica held them, rows removed from the Delta tables)."""
        with self._load_lock:  # one erasure at a time in this process (the file lock: across)
            removed = self.forget_user(user)
            if self.impressions is not None:
                self.impressions.flush()  # this process's buffered slates reach the log first
            report = erase_user(self.settings, user, raw_id)
            removed = self.forget_user(user) or removed  # events recorded meanwhile
        return removed, sum(report["tables"].values())  # rows_deleted: the Delta tables' rows

    def forget_user(self, user: str) -> bool:
        """Drop a user's vector, history and recent events from this replica, every arm's state
        (not the tables)."""
        removed = False
        for st in self.distinct_states():
            removed = st.forget_user(user) or removed
        return self.forget_recent(user) or removed

    def forget_recent(self, user: str) -> bool:
        """Drop a user's recent (not yet refreshed) events, cached replies and cached pseudonyms
        (the pseudonym cache is cleared whole: it is keyed by raw ids, which erasure never sees)."""
        self._pseudonym.cache_clear()
        with self.recent_lock:
            removed = self.recent.pop(user, None) is not None
        self.cache.invalidate_user(user)
        return removed

    # ---- gauges -------------------------------------------------------------------------------
    def refresh_lag(self) -> float:
        state = self.state
        if state is None or state.newest_event_ts is None:
            return 0.0
        return max(0.0, time.time() - state.newest_event_ts)

    def update_gauges(self) -> None:
        state = self.state
        if state is None:
            return
        set_gauges(self.metrics, state, self.arms, self.refresh_lag())

    def update_monitor(self) -> dict[str, dict | None]:
        """Recompute the drift gauges from each arm's sampled window; returns them per arm."""
        return set_monitor(self.metrics, self.arms)

    # ---- loading ------------------------------------------------------------------------------
    def _arm(self, name: str, spec: str, share: float, version: int | None,
             state: ServingState, reuse: dict[int, ArmMonitor]) -> ArmState:
        cfg = self.settings.serving
        monitor = reuse.get(id(state))
        if monitor is None:
            monitor = reuse[id(state)] = ArmMonitor(state, cfg.monitor, cfg.overfetch)
        a = ArmState(name, spec, share, version, state, monitor)
        a.served = self.metrics.served.labels(a.label, state.model_version)
        return a

    def check_experiment(self) -> dict[str, int]:
        """Resolve every arm's model in the registry: {arm: version}; ExperimentError names the
        first arm whose alias or version does not exist."""
        out = {}
        mlflow_for(self.settings)
        for a in self.assigner.arms:
            try:
                out[a.name] = registry.resolve(a.model).version
            except LookupError as e:
                raise ExperimentError(f"experiment {self.assigner.name!r} arm {a.name!r}: "
                                      f"model {a.model!r} does not exist ({e})") from None
        return out

    def _load_arms(self, snapshot: Path | None, model: str | int | None,
                   arm: str | None, fallback: bool = False) -> tuple[ArmState, ...]:
        """The new arms tuple: every arm (first load, or LoadModel with neither model nor arm:
        aliases re-resolved), or one arm (``arm``, default the control) replaced by ``model`` /
        ``snapshot``. States are shared between arms serving the same version."""
        old = self.arms
        monitors = {id(a.state): a.monitor for a in old}
        if self.assigner is None:
            self.find_arm(arm)  # no arm but the unnamed one: InvalidArgument for any name
            state = load_state(self.settings, snapshot, use_gpu=self.use_gpu, model=model,
                               fallback=fallback)
            spec = str(snapshot or model or self.settings.serving.model)
            return (self._arm("", spec, 1.0, version_of(state.model_version), state, monitors),)
        if not old or (snapshot is None and model is None and arm is None):
            versions = self.check_experiment()
            by_version = {a.version: a.state for a in old if a.version is not None}
            arms = []
            for a in self.assigner.arms:
                v = versions[a.name]
                state = by_version.get(v)
                if state is None:
                    state = by_version[v] = load_state(self.settings, use_gpu=self.use_gpu,
                                                       model=v, fallback=fallback)
                arms.append(self._arm(a.name, a.model, a.share, v, state, monitors))
            return tuple(arms)
        target = self.find_arm(arm)
        version = None
        if snapshot is None:
            mlflow_for(self.settings)
            spec = model if model is not None else next(
                a.model for a in self.assigner.arms if a.name == target.name)
            version = registry.resolve(spec).version
        state = next((a.state for a in old if version is not None and a.version == version), None)
        if state is None:
            state = load_state(self.settings, snapshot, use_gpu=self.use_gpu, model=version)
        spec = str(snapshot) if snapshot is not None else str(spec)
        return tuple(self._arm(a.name, spec, a.share, version, state, monitors)
                     if a is target else a for a in old)

    def load(self, snapshot: Path | None = None, model: str | int | None = None,
             arm: str | None = None, fallback: bool = False) -> ServingState:
        """Load a snapshot (a path, or the snapshot of registered ``model``: alias or version,
        default ``serving.model``) and swap it in atomically: requests see the old or the new
        model. A failed load raises and leaves the old model serving.

        With ``serving.experiment``: the first load loads every arm; later loads replace the
        model of ``arm`` (default: the control arm), or, with neither ``model`` nor ``arm`` nor
        ``snapshot``, reload every arm from the settings (aliases re-resolved). Returns the state
        of the arm loaded (the control's when all were). ``fallback`` (start-up): an unusable
        snapshot is skipped for an older one (:func:`serving.state.load_state`)."""
        with self._load_lock:
            arms = self._load_arms(snapshot, model, arm, fallback)
            self.arms = arms
            self.state = state = arms[0].state
            self.state_id += 1  # deltas computed for the old state are refused from now on
            if arm:
                state = self.find_arm(arm).state
            gc.collect()
            gc.freeze()  # the loaded state is long-lived: keep the cyclic GC from re-scanning it
            stamps = [st.newest_event_ts for st in distinct_states(arms)]
            newest = None if None in stamps else min(stamps)
            if newest is not None:  # events every served snapshot already holds
                with self.recent_lock:
                    for user in list(self.recent):
                        kept = deque((e for e in self.recent[user] if e[2] > newest),
                                     maxlen=self.recent[user].maxlen)
                        if kept:
                            self.recent[user] = kept
                        else:
                            del self.recent[user]
            self.cache.invalidate_all()
            self.update_gauges()
            self.update_monitor()
        self.serving_started()
        log.info("serving %s", ", ".join(f"{a.label}: {a.state.model_version}" for a in arms))
        return state

    def swap(self, state: ServingState) -> None:
        """Serve ``state`` as the one unnamed arm from now on (tests, benchmarks): under the load
        lock, so no delta or erasure is half applied across the swap; a new ``state_id`` refuses
        deltas computed for the old state."""
        with self._load_lock:
            self.state = state
            self.state_id += 1
            gc.collect()
            gc.freeze()
            self.cache.invalidate_all()
            self.update_gauges()
        self.serving_started()

    def serving_started(self) -> None:
        """Called after every load and swap, outside the load lock: a state is served from now
        on (the server marks its health SERVING)."""
