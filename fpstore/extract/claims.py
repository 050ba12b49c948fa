"""Per-slide claims: a slide's fingerprints are written only by the run that holds its claim.

A claim is an exclusive, non-blocking flock on ``status/.../.<slide_id>.lock`` (the kernel
drops it when its holder dies, however it dies). A run that finds a slide claimed by another
process defers it; once the claim is free it checks the slide's file against its own
settings: the same settings count as done elsewhere; a missing or corrupt file (the holder
died) is taken over and extracted; other settings are never counted as done: the slide
fails, named, and the run ends non-zero. On object storage there are no locks: there one
scheduler (the Ray driver) hands each slide to exactly one task.
"""

from __future__ import annotations

import sys
import time

from fpstore.extract.config import SlideResult
from fpstore.store.fingerprints import stored_state
from fpstore.store.io import remove_leftover_temporaries
from fpstore.store.layout import StoreLayout
from fpstore.store.locks import FileLock


class Claims:
    """The claims of one run over one encoder and cohort: take, defer, verify, release."""

    def __init__(self, store, encoder: str, cohort: str, key: dict, force: bool):
        self.layout = StoreLayout.of(store)
        self.encoder, self.cohort, self.key, self.force = encoder, cohort, key, force
        self.deferred: list = []  # plans whose claim another process held
        self.decided: dict[str, SlideResult] = {}  # slides settled without encoding them

    def _claim(self, slide_id: str) -> FileLock:
        path = None
        if not self.layout.is_remote:
            path = self.layout.claim_file(self.encoder, self.cohort, slide_id)
        return FileLock(path)

    def take(self, plan) -> FileLock | None:
        """The slide's claim if this run must encode it; None when it was deferred (another
        process holds it) or settled (``decided``: done elsewhere, or a conflict)."""
        claim = self._claim(plan.slide_id)
        if not claim.acquire():
            self.deferred.append(plan)
            return None
        if claim.abandoned:  # its last holder died, maybe mid-write: clear what it left
            for path in (
                self.layout.fingerprint_file(self.encoder, self.cohort, plan.slide_id),
                self.layout.status_file(self.encoder, self.cohort, plan.slide_id),
            ):
                remove_leftover_temporaries(path)
        stored = stored_state(
            self.layout.fingerprint_file(self.encoder, self.cohort, plan.slide_id), self.key
        )
        status = self.layout.status_file(self.encoder, self.cohort, plan.slide_id)
        if (
            stored.state in ("missing", "corrupt")
            or (stored.state == "other-settings" and self.force)
            or (stored.state == "match" and not status.is_file())  # its writer died between
        ):
            return claim
        claim.release()
        if stored.state == "match":
            self.decided[plan.slide_id] = SlideResult(plan.slide_id, "elsewhere")
        elif stored.state == "foreign":
            self.decided[plan.slide_id] = SlideResult(
                plan.slide_id, "failed", error=f"{stored.describe()}; move it out of the store"
            )
        else:
            self.decided[plan.slide_id] = SlideResult(
                plan.slide_id,
                "failed",
                error=(
                    "written meanwhile by another run with other settings "
                    f"({stored.describe()}); the store now mixes settings: rerun with the "
                    "settings you want and --force"
                ),
            )
        return None

    def wait_for_deferred(self, progress: bool = True, poll_s: float = 0.25) -> list:
        """Block until every deferred slide's claim is free; returns those plans (to be taken
        again) and clears the list."""
        plans, self.deferred = self.deferred, []
        for plan in plans:
            claim = self._claim(plan.slide_id)
            if progress:
                holder = claim.holder()
                print(
                    f"waiting for slide {plan.slide_id}, claimed by {holder or 'another process'}",
                    file=sys.stderr,
                    flush=True,
                )
            # A shared probe: it leaves an abandoned claim marked so for take() to see.
            while not claim.acquire(shared=True):
                time.sleep(poll_s)
            claim.release()
        return plans
