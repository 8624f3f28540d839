"""A vendor library initialised once per process and shared by reference count.

NVML and AMD SMI are process-wide: every source of a module shares one initialisation, and
the last source closed shuts the library down. Swapping the module (a test double) starts
the count afresh.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from types import ModuleType

from engine.power.base import PowerSource, SourceError


class SharedLibrary:
    """``acquire(module)`` initialises ``module`` on first use and counts the holders;
    ``release()`` drops one and shuts it down with the last.

    ``init(module)`` and ``shut_down(module)`` call the vendor; ``what`` names it in errors;
    ``message(exc)`` turns a vendor exception into one line.
    """

    def __init__(
        self,
        what: str,
        init: Callable[[ModuleType], object],
        shut_down: Callable[[ModuleType], object],
        message: Callable[[BaseException], str],
    ) -> None:
        self.what, self._init, self._shut_down, self._message = what, init, shut_down, message
        self._lock = threading.Lock()
        self.module: ModuleType | None = None
        self.refs = 0

    def acquire(self, module: ModuleType) -> ModuleType:
        """Initialise ``module`` if no one holds it yet; raises SourceError (one line)."""
        with self._lock:
            if self.module is not module:  # a different binding (a test double) starts afresh
                self.module, self.refs = module, 0
            if self.refs == 0:
                try:
                    self._init(module)
                except Exception as exc:
                    raise SourceError(f"{self.what} failed: {self._message(exc)}") from None
            self.refs += 1
        return module

    def release(self) -> None:
        """Drop one hold; the last one shuts the library down (its failure is ignored:
        nothing useful can be done about it)."""
        with self._lock:
            if self.module is None or self.refs == 0:
                return
            self.refs -= 1
            if self.refs == 0:
                with contextlib.suppress(Exception):
                    self._shut_down(self.module)


def open_channel(
    make: Callable[[], PowerSource],
    probe: Callable[[PowerSource], object],
    prefix: str,
    label: str,
) -> tuple[PowerSource | None, str | None]:
    """Build one channel of a device and read it once, so that discovery keeps only what
    works: the source, or None and the one-line reason ``"{prefix}{label} unavailable: ..."``
    (``prefix`` names the device, e.g. "NVML GPU 0: ", and is not repeated from the error).
    A channel that fails its probe is closed."""
    source = None
    try:
        source = make()
        probe(source)
    except SourceError as exc:
        if source is not None:
            source.close()
        return None, f"{prefix}{label} unavailable: {str(exc).removeprefix(prefix)}"
    return source, None
