"""`freshrec report --online`'s per-replica monitoring lines, against a real server on loopback."""

from __future__ import annotations

from pydantic import SecretStr

from freshrec.cli.report import monitoring
from tests.test_serving_guard import ADMIN, start


def test_monitoring_reaches_a_replica_with_the_admin_tokens_value(tmp_path):
    server, addr = start(tmp_path)
    try:
        settings = server.settings.model_copy(update={"refresher": server.settings.refresher
                                                      .model_copy(update={"token": SecretStr(ADMIN)})})
        lines = monitoring(settings, [addr])
        assert lines[1:] and all("no answer" not in ln for ln in lines[1:]), lines
        assert lines[1].startswith(f"  {addr} arm ") and "test als" in lines[1]
        # a wrong token is named as refused, not as a crash
        wrong = settings.model_copy(update={"refresher": settings.refresher
                                            .model_copy(update={"token": SecretStr("not-a-token")})})
        assert monitoring(wrong, [addr])[1:] == [f"  {addr}: no answer (UNAUTHENTICATED)"]
    finally:
        server.stop(grace=0)
