"""How long to busy-poll: the window rule of poll mode, for devices and drivers alike.

As KVM sizes halt-polling, by how long the awaited event took after polling could have begun:
later than the window but within the limit, the window was too short and doubles; later than
the limit, polling could not have helped and the window halves, down to none. An event that
polling caught leaves the window as it is. A ring fed back to back keeps its window; one fed
now and then soon costs nothing.
"""

from __future__ import annotations

GROW_FROM = 10e-6  # seconds: the first window after none, once events show polling would pay


def adapt(window: float, limit: float, waited: float) -> float:
    """The next window (seconds), after an event came ``waited`` seconds after polling could
    have begun, with ``window`` the current one and ``limit`` the largest allowed."""
    if waited > limit:
        window /= 2
        return window if window >= GROW_FROM else 0.0
    if waited > window:
        return min(max(2 * window, GROW_FROM), limit)
    return window
