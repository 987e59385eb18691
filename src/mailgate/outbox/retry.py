"""When to try again after a transient failure: exponential backoff with jitter, never sooner than
a server's Retry-After, and never past the message's maximum age."""

from __future__ import annotations

import random

from ..config import Config


def retry_delay(failures: int, config: Config, *, retry_after: float | None = None, rng: random.Random) -> float:
    """Seconds to wait after the `failures`-th failed attempt (1 for the first).

    The wait grows as retry_base × retry_factorⁿ⁻¹ up to retry_max_delay; "equal jitter" then
    takes between half and all of it, so that messages which failed together don't come back
    together. A server's Retry-After is a floor, even above retry_max_delay: it knows best.
    """
    exponent = max(failures, 1) - 1
    # Capped before the power is taken, so a thousand failures can't overflow a float.
    ceiling = min(config.retry_base * config.retry_factor ** min(exponent, 64), config.retry_max_delay)
    delay = ceiling / 2 + rng.random() * ceiling / 2
    if retry_after is not None and retry_after > delay:
        delay = retry_after
    return delay
