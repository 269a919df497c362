"""Peak resident memory of the current process itself, from a clean baseline (Linux /proc).

`resource.getrusage(RUSAGE_SELF).ru_maxrss` is the wrong tool for a benchmark child: Linux keeps it across
fork and exec, so a child started by a process that once held 3 GiB reports 3 GiB. VmHWM in /proc/self/status
belongs to the process's own address space (exec starts a new one), and writing "5" to /proc/self/clear_refs
resets it to the current RSS (proc(5), "clear_refs"), so a window can be measured from a baseline taken after
the imports. Where the reset is refused (or VmHWM is missing), a thread samples VmRSS every `interval_s`
instead; a spike shorter than the interval can then be missed, and the result says which method was used.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

STATUS = "/proc/self/status"
CLEAR_REFS = "/proc/self/clear_refs"
KIB_PER_MIB = 1024


def read_status_kib(fields: tuple[str, ...] = ("VmRSS", "VmHWM")) -> dict[str, int]:
    """The named fields of /proc/self/status in KiB (fields absent on this kernel are left out)."""
    found: dict[str, int] = {}
    with open(STATUS) as status:
        for line in status:
            name, _, value = line.partition(":")
            if name in fields:
                found[name] = int(value.split()[0])
    return found


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS; False when the kernel refuses (then sample instead)."""
    try:
        with open(CLEAR_REFS, "w") as handle:
            handle.write("5")
    except OSError:
        return False
    status = read_status_kib()
    return "VmHWM" in status and status["VmHWM"] <= status["VmRSS"] + 4


@dataclass
class PeakReport:
    """MiB: `peak_mib` the highest RSS in the window (absolute), `baseline_mib` the RSS at its start,
    `growth_mib` = peak - baseline; `method` is "vmhwm" (exact) or "sampled" (VmRSS every interval)."""

    peak_mib: float
    baseline_mib: float
    growth_mib: float
    method: str


class PeakMemory:
    """Context manager measuring this process's peak RSS over a window.

        with PeakMemory() as meter:
            work()
        report = meter.report   # PeakReport, MiB

    Also usable without `with`: `start()` then `stop()` (returns the PeakReport).
    """

    def __init__(self, interval_s: float = 0.005):
        self.interval_s = interval_s
        self.report: PeakReport | None = None
        self._sampled_kib = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> PeakMemory:
        self._baseline_kib = read_status_kib()["VmRSS"]
        self._exact = reset_peak()
        if not self._exact:
            self._sampled_kib = self._baseline_kib
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sampled_kib = max(self._sampled_kib, read_status_kib(("VmRSS",))["VmRSS"])

    def stop(self) -> PeakReport:
        status = read_status_kib()
        if self._exact:
            peak_kib = max(status["VmHWM"], status["VmRSS"])
        else:
            self._stop.set()
            self._thread.join()
            peak_kib = max(self._sampled_kib, status["VmRSS"])
        self.report = PeakReport(peak_mib=peak_kib / KIB_PER_MIB, baseline_mib=self._baseline_kib / KIB_PER_MIB,
                                 growth_mib=(peak_kib - self._baseline_kib) / KIB_PER_MIB,
                                 method="vmhwm" if self._exact else "sampled")
        return self.report

    def __enter__(self) -> PeakMemory:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
