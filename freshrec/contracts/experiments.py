"""A/B experiment assignment: which arm a user is in.

A user's pseudonym is hashed with the experiment's salt (keyed BLAKE2b, 64 bits) into a point of
[0, 1); the arms split [0, 1) in their settings order by their shares, and the user belongs to the
arm whose slice holds the point. Nothing is stored: the same pseudonym, salt and arms give the same
arm on every request, replica and restart. Changing the salt reshuffles every user; changing a
share moves only the users on the moved boundary. The server, the report and the online gate all
use this module, so they agree on what an arm is.
"""

from __future__ import annotations

import hashlib
from bisect import bisect_right
from dataclasses import dataclass

from freshrec.settings import ExperimentSettings

SPAN = 1 << 64


class ExperimentError(RuntimeError):
    """An experiment cannot run as configured; the message names the arm and the fix."""


@dataclass(frozen=True)
class Arm:
    name: str
    model: str  # an alias or a version, as the settings name it
    share: float


class Assigner:
    """user pseudonym -> arm index, by the salted hash (see the module doc)."""

    def __init__(self, experiment: ExperimentSettings) -> None:
        if not experiment.arms:
            raise ExperimentError("serving.experiment has no arms")
        self.name = experiment.name
        self.arms = [Arm(a.name, a.model, a.share) for a in experiment.arms]
        salt = (experiment.salt or experiment.name).encode()
        if len(salt) > 64:  # BLAKE2b keys are at most 64 bytes
            salt = hashlib.sha256(salt).digest()
        self._hasher = hashlib.blake2b(digest_size=8, key=salt)
        edges, acc = [], 0.0
        for a in self.arms[:-1]:
            acc += a.share
            edges.append(int(acc * SPAN))
        self._edges = edges  # the last arm takes the rest of [0, 1) (shares sum to 1 +- 1e-6)

    def point(self, user: str) -> int:
        """The user's point in [0, 2**64)."""
        h = self._hasher.copy()
        h.update(user.encode())
        return int.from_bytes(h.digest(), "big")

    def index(self, user: str) -> int:
        return bisect_right(self._edges, self.point(user))

    def arm(self, user: str) -> Arm:
        return self.arms[self.index(user)]
