"""Peak resident memory of one piece of work, as the benchmarks' child processes measure it (Linux):
return freed memory to the OS (``malloc_trim``), reset the peak (``/proc/self/clear_refs``), run the
work, then read ``VmHWM - VmRSS(before)`` from ``/proc/self/status``."""

from __future__ import annotations

from typing import Optional


def proc_status_kb(field: str) -> Optional[int]:
    """``field`` (``"VmRSS"``, ``"VmHWM"``) of ``/proc/self/status`` in kB; None where it is unavailable."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def malloc_trim() -> bool:
    """Return memory freed by earlier calls to the OS (glibc), so the measured call cannot reuse it."""
    try:
        import ctypes

        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0) or True)
    except (OSError, AttributeError):
        return False


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (False where the kernel does not allow it)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
