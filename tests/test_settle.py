"""The fate of a batch attempt, as a table: (status, generation sent, generation now) -> fate."""

from __future__ import annotations

import pytest

from supervisor.dispatch.settle import Fate, attempt_fate

ACK, FAIL, RELEASE = Fate.ACK, Fate.FAIL, Fate.RELEASE


@pytest.mark.parametrize(
    ("status", "generation", "generation_now", "fate"),
    [
        (200, 0, 0, ACK),  # done
        (200, 0, 1, ACK),  # answered before the restart: still done
        (500, 0, 0, FAIL),  # counted; the feed retries or dead-letters
        (404, 3, 3, FAIL),
        (204, 0, 0, FAIL),  # only 200 acks
        (None, 0, 0, FAIL),  # no response: network error or timeout
        (500, 0, 1, RELEASE),  # the container restarted under the batch: not counted
        (None, 2, 3, RELEASE),
    ],
)
def test_attempt_fate(status: int | None, generation: int, generation_now: int, fate: Fate) -> None:
    assert attempt_fate(status, generation=generation, generation_now=generation_now) is fate
