"""Peak memory of a whole process tree, sampled in a thread.

:class:`TreeMemory` tracks this process, every descendant of it, and every process whose
environment carries a tag set in this process's environment before the children start
(``FEDSHIFT_BENCH_TAG``): Flower's local SuperLink starts in its own session and Ray's
workers are children of the raylet, so a process can leave the parent chain, but none
loses its environment. Each sample sums, over the tracked processes alive at that moment,

- RSS (resident set; shared pages such as torch's libraries count once per process, so the
  sum is an upper bound of the memory the tree holds), and
- PSS (proportional set; each shared page split between the processes that map it, so the
  sum is the tree's share of physical memory), read less often since it costs more.

The peaks and the number of processes at the RSS peak are kept. This machine's cgroup is
v1 and shared by every process of the sandbox, so a per-run ``memory.peak`` is not
available here; sampling is the measure.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from dataclasses import dataclass, field

import psutil

TAG = "FEDSHIFT_BENCH_TAG"
GIB = 1024 ** 3


@dataclass
class MemoryPeak:
    """What a :class:`TreeMemory` saw: peaks in bytes, processes, samples."""

    rss: int = 0
    pss: int = 0
    processes_at_peak: int = 0
    max_processes: int = 0
    samples: int = 0
    seconds: float = 0.0
    names_at_peak: dict[str, int] = field(default_factory=dict)  # process name -> RSS bytes at the peak

    def as_row(self) -> dict[str, float | int]:
        return {"peak_rss_gib": round(self.rss / GIB, 3), "peak_pss_gib": round(self.pss / GIB, 3),
                "processes_at_peak": self.processes_at_peak, "max_processes": self.max_processes,
                "memory_samples": self.samples, "sample_hz": round(self.samples / self.seconds, 1) if self.seconds else 0}


def _tagged(tag: str) -> set[int]:
    found = set()
    for proc in psutil.process_iter(["pid"]):
        try:
            if proc.environ().get(TAG) == tag:
                found.add(proc.pid)
        except (psutil.Error, OSError):
            continue
    return found


class TreeMemory:
    """``with TreeMemory() as mem: …`` samples at ``hz`` until the block ends; ``mem.peak``.

    The tag goes into ``os.environ`` for the block (children inherit it) and is removed after.
    PSS is read every ``pss_every``-th sample; the tag scan (all processes) every ``scan_every``-th.
    """

    def __init__(self, hz: float = 5.0, pss_every: int = 5, scan_every: int = 10) -> None:
        self.interval = 1.0 / hz
        self.pss_every = pss_every
        self.scan_every = scan_every
        self.tag = uuid.uuid4().hex
        self.peak = MemoryPeak()
        self._tracked: dict[int, psutil.Process] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tree-memory", daemon=True)
        self._previous: str | None = None

    def __enter__(self) -> "TreeMemory":
        self._previous = os.environ.get(TAG)
        os.environ[TAG] = self.tag
        self._started = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak.seconds = time.perf_counter() - self._started
        if self._previous is None:
            os.environ.pop(TAG, None)
        else:
            os.environ[TAG] = self._previous

    def _discover(self, scan: bool) -> None:
        me = psutil.Process()
        pids = {me.pid} | {c.pid for c in me.children(recursive=True)}
        for pid in list(self._tracked):  # descendants of tracked processes that left our chain
            try:
                pids |= {c.pid for c in self._tracked[pid].children(recursive=True)}
            except psutil.Error:
                self._tracked.pop(pid, None)
        if scan:
            pids |= _tagged(self.tag)
        for pid in pids - set(self._tracked):
            try:
                self._tracked[pid] = psutil.Process(pid)
            except psutil.Error:
                continue

    def sample(self, n: int) -> None:
        """One sample (``n``: the sample's number, which decides PSS and the tag scan)."""
        self._discover(scan=n % self.scan_every == 0)
        rss = pss = 0
        names: dict[str, int] = {}
        alive = 0
        for pid, proc in list(self._tracked.items()):
            try:
                if not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE:
                    self._tracked.pop(pid, None)
                    continue
                r = proc.memory_info().rss
                if n % self.pss_every == 0:
                    pss += proc.memory_full_info().pss
                name = proc.name()
            except psutil.Error:
                self._tracked.pop(pid, None)
                continue
            alive += 1
            rss += r
            names[name] = names.get(name, 0) + r
        peak = self.peak
        peak.samples += 1
        peak.max_processes = max(peak.max_processes, alive)
        if n % self.pss_every == 0:
            peak.pss = max(peak.pss, pss)
        if rss > peak.rss:
            peak.rss, peak.processes_at_peak, peak.names_at_peak = rss, alive, names

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            t0 = time.perf_counter()
            self.sample(n)
            n += 1
            self._stop.wait(max(0.0, self.interval - (time.perf_counter() - t0)))
        self.sample(0)
