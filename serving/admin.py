"""The Admin operations on a served :class:`~serving.service.FreshrecService`: LoadSnapshot,
LoadModel, ApplyDeltas (:mod:`serving.deltas`), DeleteUser and Status, with no gRPC context in
sight. Each operation that changes the served state is recorded in the audit log
(``<data_dir>/audit/admin.jsonl``, sealed when ``encrypt_at_rest``) with who asked and how it
ended; a request refused before it runs (a malformed path, model or user id) is not. Loads read
the snapshots directory and the model registry; an erasure writes the tables, logs and snapshots
(:func:`freshrec.privacy.erasure.erase_user`).

Refusals are :class:`~serving.errors.ServiceError`\\ s carrying their gRPC status. What the layers
below raise for input they cannot use (ValueError, FileNotFoundError, LookupError: a value
refused, no such snapshot, no such alias or version) comes out as INVALID_ARGUMENT, as Admin
callers have always been answered.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from pathlib import Path

from serving.deltas import apply_delta
from serving.errors import Aborted, InvalidArgument, NotFound, ServiceError
from serving.experiment import ArmState
from serving.methods import admin_pb2
from serving.service import FreshrecService

MODEL_SPEC = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


@contextmanager
def caller_input():
    """What the layers below raise for input they cannot use (ValueError: a value refused;
    FileNotFoundError: no such snapshot; LookupError: no such alias, version or key), as the
    caller's :class:`~serving.errors.InvalidArgument`."""
    try:
        yield
    except ServiceError:
        raise
    except (ValueError, FileNotFoundError, LookupError) as e:
        raise InvalidArgument(str(e)) from e


class AdminService:
    def __init__(self, service: FreshrecService) -> None:
        self.s = service

    def _audited(self, who: str, action: str, request: dict, fn):
        """Run ``fn`` and record the Admin call in the audit log: ok with (the start of) its reply,
        or error with why."""
        try:
            reply = fn()
        except Exception as e:
            self.s.audit.record(who, action, request, "error", str(e))
            raise
        self.s.audit.record(who, action, request, "ok", str(reply).replace("\n", " ")[:500])
        return reply

    def snapshot_path(self, raw: str) -> Path:
        """A LoadSnapshot path, only inside the snapshots directory: relative paths are taken from
        it; ``..``, symlinks and absolute paths that lead elsewhere are refused."""
        root = self.s.settings.snapshots_dir.resolve()
        if "\x00" in raw or len(raw) > 4096:
            raise InvalidArgument("path is not a usable path")
        try:
            p = Path(raw)
            resolved = (p if p.is_absolute() else root / p).resolve()
            inside = resolved.is_relative_to(root) and resolved != root
            has_manifest = inside and (resolved / "manifest.json").is_file()
        except (OSError, ValueError, RuntimeError) as e:  # too long, a symlink loop, bad bytes
            raise InvalidArgument(f"path {raw[:200]!r} is not a usable path "
                                  f"({type(e).__name__})") from None
        if not inside:
            raise InvalidArgument(f"path {raw[:200]!r} is outside the snapshots directory {root}: "
                                  "give a snapshot directory inside it (relative paths are taken "
                                  "from there)")
        if not has_manifest:
            raise NotFound(f"path {raw[:200]!r}: no snapshot there (no manifest.json)")
        return resolved

    def load_snapshot(self, request, who: str):
        """LoadSnapshot: the snapshot at ``request.path`` (inside the snapshots directory), else
        the one ``serving.model`` names."""
        s = self.s
        path = self.snapshot_path(request.path) if request.path else None

        def do():
            with caller_input():
                state = s.load(path)
            return admin_pb2.LoadSnapshotResponse(model_version=state.model_version,
                                                  n_items=state.items.size,
                                                  n_users=len(state.user_rows))
        return self._audited(who, "LoadSnapshot", {"path": request.path[:300]}, do)

    def load_model(self, request, who: str):
        """LoadModel: a registered version or alias (default ``serving.model``) for one arm, or
        every arm re-resolved (:meth:`~serving.service.FreshrecService.load`)."""
        s = self.s
        model = request.model.strip()
        if model and not MODEL_SPEC.fullmatch(model):
            raise InvalidArgument(f"model {model[:80]!r} is neither a version number nor an alias "
                                  "of freshrec-retrieval (letters, digits, - and _, e.g. champion "
                                  "or 3)")

        def do():
            with caller_input():
                arm = s.find_arm(request.arm)
                before = arm.state.model_version if arm is not None else ""
                state = s.load(model=model or None, arm=request.arm or None)
            return admin_pb2.LoadModelResponse(model_version=state.model_version,
                                               n_items=state.items.size,
                                               n_users=len(state.user_rows),
                                               previous_model_version=before,
                                               arm=arm.name if arm is not None else "")
        return self._audited(who, "LoadModel", {"model": model[:80], "arm": request.arm[:80]}, do)

    def apply_deltas(self, request, who: str):
        """ApplyDeltas (:func:`serving.deltas.apply_delta`) under the load lock, refused (Aborted)
        when it was computed for another state than the one loaded."""
        s = self.s
        s.require_state()
        users = (lambda u: u) if request.users_pseudonymized else s.pseudonym
        bound = s.settings.serving.max_vector_norm

        def do():
            with s._load_lock:  # no load swaps the state under this delta
                state = s.require_state()
                if request.expect_state_id and request.expect_state_id != s.state_id:
                    raise Aborted(f"the replica loaded another state (state_id {s.state_id}, "
                                  f"delta computed for {request.expect_state_id}): read Status "
                                  "and compute the delta again")
                with caller_input():
                    done = apply_delta(request, s.distinct_states(),
                                       request.model_version or state.model_version, users, bound)
                for u in done.removed_users:
                    s.forget_recent(u)
                s.cache.invalidate_all()
                s.update_gauges()
            return admin_pb2.ApplyDeltasResponse(items_upserted=done.items_upserted,
                                                 items_removed=done.items_removed,
                                                 users_upserted=done.users_upserted,
                                                 users_removed=done.users_removed,
                                                 index_size=state.items.size,
                                                 histories_upserted=done.histories_upserted)
        summary = {"upsert_items": len(request.upsert_items), "remove_items": len(request.remove_items),
                   "upsert_users": len(request.upsert_users), "remove_users": len(request.remove_users),
                   "upsert_histories": len(request.upsert_histories)}
        return self._audited(who, "ApplyDeltas", summary, do)

    def delete_user(self, request, who: str):
        """DeleteUser: erase the user everywhere
        (:meth:`~serving.service.FreshrecService.delete_user`)."""
        s = self.s
        if not request.user_id:
            raise InvalidArgument("user_id is empty")
        if len(request.user_id) > s.settings.serving.max_id_length:
            raise InvalidArgument(f"user_id is longer than {s.settings.serving.max_id_length} "
                                  "characters")

        def do():
            with caller_input():
                removed, rows = s.delete_user(s.pseudonym(request.user_id), request.user_id)
            return admin_pb2.DeleteUserResponse(vector_removed=removed, rows_deleted=rows)
        # The audit names neither the raw id nor the pseudonym (the erasure log holds that).
        return self._audited(who, "DeleteUser", {"user": "(see privacy/erasures.jsonl)"}, do)

    def status(self):
        """A StatusResponse of what this process serves (Unavailable when nothing is loaded)."""
        s = self.s
        state = s.require_state()
        return admin_pb2.StatusResponse(
            model_version=state.model_version, index_size=state.items.size,
            index_type=state.items.index_type,
            delta_versions={k: v for k, v in state.delta_versions.items() if v is not None},
            refresh_lag_seconds=s.refresh_lag(), n_users=len(state.user_rows),
            device="cuda" if s.use_gpu else "cpu",
            experiment=s.settings.serving.experiment.name if s.assigner else "",
            arms=[self._arm_status(a) for a in s.arms], state_id=s.state_id)

    @staticmethod
    def _arm_status(a: ArmState):
        ref, now = a.monitor.reference, a.monitor.summary()
        out = admin_pb2.ArmStatus(name=a.name, model=a.model, share=a.share,
                                  model_version=a.state.model_version, index_size=a.state.items.size,
                                  monitor_samples=now["samples"] if now else 0)
        if ref is not None:
            out.reference_score_mean, out.popular_share_reference = ref.mean, ref.popular_share
        if now is not None:
            out.served_score_mean, out.popular_share = now["score"]["mean"], now["popular_share"]
            if ref is not None:
                out.score_drift, out.popularity_drift = now["score_drift"], now["popularity_drift"]
        return out
