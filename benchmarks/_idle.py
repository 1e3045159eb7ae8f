"""Is the machine idle while a benchmark runs? CPU used by *other* processes, measured, not guessed.

The load average counts the benchmark's own threads, so after a 2-thread run on 2 cores it
reads about 2 on an idle machine; what distorts a ratio is other processes' CPU. `OtherLoad`
reads `/proc/stat` busy time minus this process's own CPU time over the timed span.
"""

from __future__ import annotations

import os
import resource
import time


class OtherLoad:
    """CPU cores used by other processes between `start()` and `stop()` (Linux; None elsewhere)."""

    def start(self) -> None:
        self.t0, self.busy0, self.own0 = time.perf_counter(), self._busy(), self._own()
        self.load0 = os.getloadavg()

    def stop(self) -> dict:
        wall = time.perf_counter() - self.t0
        busy = self._busy()
        other = None
        if busy is not None and self.busy0 is not None and wall > 0:
            other = max(0.0, ((busy - self.busy0) - (self._own() - self.own0)) / wall)
        return {"load_before": round(self.load0[0], 2), "load_after": round(os.getloadavg()[0], 2),
                "other_cores": None if other is None else round(other, 3)}

    @staticmethod
    def _busy() -> float | None:
        try:
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:]]
        except OSError:
            return None
        idle = v[3] + (v[4] if len(v) > 4 else 0)
        return (sum(v[:8]) - idle) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _own() -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    def reliable(self, result: dict, max_other: float = 0.3, max_load_without_proc: float = 0.5) -> bool:
        """True when other processes used at most `max_other` of a core (or, without /proc/stat, a low load)."""
        if result["other_cores"] is None:
            return max(result["load_before"], result["load_after"]) < max_load_without_proc
        return result["other_cores"] <= max_other
