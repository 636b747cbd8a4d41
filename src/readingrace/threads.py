"""Thread limits for small fits: one torch and one BLAS thread where threads cost more than they save."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from threadpoolctl import threadpool_limits

#: Below this many values (rows x features) a fit runs on one thread. On small problems thread start-up
#: and contention cost far more than they save: a logistic probe took 0.4 s on one thread and 24 s on two
#: busy cores; the thumbnail reference of a C4 run (531 x 1024) 0.8 s against 37 s for its three largest C.
SINGLE_THREAD_BELOW = 5_000_000


@contextlib.contextmanager
def threads_for(n_values: int) -> Iterator[None]:
    """One torch and one BLAS thread for small problems; the caller's settings otherwise (restored)."""
    if n_values >= SINGLE_THREAD_BELOW:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1):
            yield
    finally:
        torch.set_num_threads(before)
