"""CPU threading: a short OpenMP spin, and a torch thread count that follows the machine's load.

OpenMP's wait policy is a trade-off that cannot be changed once torch is loaded (measured on
the 2-core machine, bf16 decoding of 80 rows at 64 new tokens, `bench/sampler.py --omp ...` with
and without `--busy`, bench/RESULTS.md):
- passive (`OMP_WAIT_POLICY=PASSIVE`: threads sleep between parallel regions) is safe when
  another process holds a core (416 tok/s), but every one of the many small ops per decode step
  pays a thread wake-up: on an idle machine two threads decode barely faster than one (464 vs
  418 tok/s);
- spinning briefly (`GOMP_SPINCOUNT=10000`, a few microseconds) decodes 1.36x faster than passive
  on the idle machine (629 tok/s), but when another process holds a core every parallel region
  waits for a thread that is not scheduled: half of passive's speed (211 tok/s), and up to 30x
  slower for small ops.
With one thread there are no parallel regions to wait for: the spin plus this module's thread
adapter runs at 396 tok/s on the busy machine (0.95x passive).

So the library asks for the short spin (`configure_env`, before torch is imported, unless the
user set a policy) and `adapt_threads()`, called from the hot loops, runs torch with one thread
fewer than the cores it may use whenever other processes used about half a core or more since
the last check, and goes back up when they stop. Our own threads' CPU time (spinning included)
is excluded, so the choice does not feed on itself. `PMC_UNLEARN_THREADS=N` (or
`OMP_NUM_THREADS`) fixes the count instead.
"""

from __future__ import annotations

import logging
import os
import time

log = logging.getLogger(__name__)

SPINCOUNT = "10000"
CHECK_EVERY_S = 0.5  # shortest interval the load is measured over


def configure_env(environ=os.environ) -> None:
    """Ask OpenMP for a short spin before waiting, unless a policy is already set. Call before importing torch."""
    if "OMP_WAIT_POLICY" in environ or "GOMP_SPINCOUNT" in environ:
        return
    environ["GOMP_SPINCOUNT"] = SPINCOUNT


def threads_from_env(environ=os.environ) -> int | None:
    """`PMC_UNLEARN_THREADS` as a thread count (None when unset or empty); UserError when it is not one."""
    raw = environ.get("PMC_UNLEARN_THREADS", "").strip()
    if not raw:
        return None
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if n < 1 or n > 4096:
        from pmc_unlearn.errors import UserError

        raise UserError(f"PMC_UNLEARN_THREADS={environ.get('PMC_UNLEARN_THREADS')!r}: give a whole number of "
                        "threads (1 or more), or unset it to follow the machine's load")
    return n


def check_env(environ=os.environ) -> None:
    """Validate the environment variables this package reads (called by the CLI before any work)."""
    threads_from_env(environ)


def others_cores(busy_s: float, own_s: float, wall_s: float) -> float:
    """Cores' worth of CPU used by other processes: (all cores' busy time - ours) / wall time, >= 0."""
    if wall_s <= 0:
        return 0.0
    return max(0.0, (busy_s - own_s) / wall_s)


def choose_threads(others: float, cores: int, max_threads: int) -> int:
    """Threads to run with when other processes use `others` cores of `cores`.

    One thread per core they leave free, where a core at least half used by someone else counts as
    taken: 2 cores, others 0.1 -> 2; others 0.5 or 1.0 -> 1; never below 1 or above max_threads.
    """
    free = int(cores - others + 0.5 - 1e-9)
    return max(1, min(max_threads, free))


def _read_busy_s() -> float | None:
    """Seconds of CPU all cores have been busy since boot (/proc/stat), or None off Linux."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    v = [int(x) for x in fields[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0)  # idle + iowait
    busy = sum(v[:8]) - idle  # user nice system idle iowait irq softirq steal (guest is inside user)
    return busy / os.sysconf("SC_CLK_TCK")


class _Adapter:
    def __init__(self):
        self.enabled: bool | None = None
        self.max_threads = 1
        self.cores = 1
        self.last: tuple[float, float, float] | None = None  # (wall, busy, own)

    def _init(self) -> None:
        import torch

        ours = threads_from_env()
        if ours:
            torch.set_num_threads(ours)
        fixed = ours or os.environ.get("OMP_NUM_THREADS")
        try:
            self.cores = len(os.sched_getaffinity(0))
        except AttributeError:
            self.cores = os.cpu_count() or 1
        self.max_threads = torch.get_num_threads()
        self.enabled = not fixed and self.max_threads > 1 and _read_busy_s() is not None

    def __call__(self) -> int | None:
        if self.enabled is None:
            self._init()
        if not self.enabled:
            return None
        now = time.monotonic()
        if self.last is not None and now - self.last[0] < CHECK_EVERY_S:
            return None
        busy, own = _read_busy_s(), time.process_time()
        if busy is None:
            return None
        prev, self.last = self.last, (now, busy, own)
        if prev is None:
            return None
        import torch

        others = others_cores(busy - prev[1], own - prev[2], now - prev[0])
        want = choose_threads(others, self.cores, self.max_threads)
        have = torch.get_num_threads()
        if want != have:
            torch.set_num_threads(want)
            log.debug("other processes use %.2f cores: torch threads %d -> %d", others, have, want)
        return want


adapt_threads = _Adapter()
"""Call often from CPU-heavy loops (cheap: it measures at most every 0.5 s); returns the thread count when it checked."""


class PeakMemory:
    """The process's peak resident memory (MB) over a block, sampled by a daemon thread every `every`
    seconds, and CUDA's own peak allocation when a GPU is in use. For the cost tables: a
    long-lived process (the demo runs every stage in one) needs the peak of each run, which
    `ru_maxrss` (the process's lifetime peak) cannot give."""

    def __init__(self, every: float = 0.25):
        self.every = every
        self.peak_rss = 0
        self._stop = None
        self._thread = None

    def _sample(self) -> None:
        import psutil

        proc = psutil.Process()
        while True:
            self.peak_rss = max(self.peak_rss, proc.memory_info().rss)
            if self._stop.wait(self.every):
                return

    def __enter__(self) -> "PeakMemory":
        import threading

        import torch

        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def result(self) -> dict[str, float]:
        import torch

        out = {"peak_rss_mb": round(self.peak_rss / 2**20, 1)}
        if torch.cuda.is_available():
            out["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        return out
