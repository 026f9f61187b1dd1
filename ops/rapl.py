"""CPU package energy from RAPL through the Linux powercap interface.

Each package domain (`intel-rapl:N` whose `name` starts with "package"; AMD CPUs use the
same driver) has a cumulative `energy_uj` counter that wraps at `max_energy_range_uj`. The
energy of a window is the difference of two reads, corrected for one wrap; a window longer
than one wrap period (minutes at full load) would be undercounted, so read at least that
often. Since Linux 5.10 `energy_uj` is readable by root only: an unreadable counter makes
the metric absent and the reason is logged once.
"""

from __future__ import annotations

import logging
import os
import re

log = logging.getLogger("moeyard.ops")

_PACKAGE_DIR = re.compile(r"^intel-rapl:\d+$")


class RaplReader:
    """Joules drawn by all CPU packages of this machine between reads.

    Args:
        root: the powercap directory (`/sys/class/powercap`).
    """

    def __init__(self, root: str = "/sys/class/powercap") -> None:
        self.root = root
        self.available = False
        self.reason = ""
        self._domains: list[tuple[str, int]] = []  # (energy_uj path, max range in uJ)
        self._last: list[int] | None = None
        try:
            names = sorted(os.listdir(root))
        except OSError as e:
            self._unavailable(f"{root} cannot be listed ({e.strerror or e})")
            return
        for entry in names:
            if not _PACKAGE_DIR.match(entry):
                continue
            d = os.path.join(root, entry)
            try:
                with open(os.path.join(d, "name")) as f:
                    if not f.read().strip().startswith("package"):
                        continue
                with open(os.path.join(d, "max_energy_range_uj")) as f:
                    max_range = int(f.read().strip())
            except (OSError, ValueError) as e:
                self._unavailable(f"{d} is not readable ({_why(e)})")
                return
            self._domains.append((os.path.join(d, "energy_uj"), max_range))
        if not self._domains:
            self._unavailable(f"no RAPL package domain under {root}")
            return
        try:
            self._last = self._read_all()
        except (OSError, ValueError) as e:
            self._unavailable(str(e))
            return
        self.available = True

    def _unavailable(self, why: str) -> None:
        self.reason = why
        self._domains = []
        log.warning("CPU package energy unavailable: %s; no CPU energy is reported", why)

    def _read_all(self) -> list[int]:
        values = []
        for path, _ in self._domains:
            try:
                with open(path) as f:
                    values.append(int(f.read().strip()))
            except (OSError, ValueError) as e:
                raise type(e)(f"{path} is not readable ({_why(e)})") from e
        return values

    def read(self) -> float | None:
        """Joules since the previous read (the first read is taken at construction), or None
        when the counters cannot be read."""
        if not self.available:
            return None
        try:
            now = self._read_all()
        except (OSError, ValueError) as e:
            # Was readable at start: a transient failure or a permission change. Stop, once.
            self.available = False
            self._unavailable(str(e))
            return None
        assert self._last is not None
        total_uj = 0
        for (_, max_range), prev, cur in zip(self._domains, self._last, now, strict=True):
            total_uj += cur - prev if cur >= prev else cur + max_range - prev
        self._last = now
        return total_uj / 1e6


def _why(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e)
