"""One dataclass configures every executor backend, the pool and the output caps."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

DEFAULT_PRELOAD = (
    "import math, fractions, itertools, functools\n"
    "from fractions import Fraction\n"
    "import numpy as np\n"
    "import sympy\n"
    "import sympy as sp\n"
)


@dataclass
class ExecutorConfig:
    """How model-written code is run. CLI flags map one to one onto these fields."""

    backend: Literal["local", "docker"] = "local"
    """``local``: ipykernel subprocess (sandboxed with bubblewrap when available);
    ``docker``: ipykernel inside a locked-down container."""
    timeout: float = 10.0
    """Seconds a cell may run before it is interrupted."""
    startup_timeout: float = 60.0
    """Seconds to wait for a new kernel to answer."""
    interrupt_grace: float = 3.0
    """Seconds an interrupted cell gets to stop before the kernel is restarted."""
    max_output_chars: int = 20_000
    """Each of stdout / stderr / result is cut to this many characters (head + tail kept)."""
    preload: str = DEFAULT_PRELOAD
    """Code run once at kernel start (and after a restart) so cells don't pay for imports."""

    # Resource limits (local: setrlimit; docker: cgroups).
    memory_mb: int = 2048
    """Memory cap (local: address space, RLIMIT_AS; docker: container memory)."""
    cpu_seconds: int = 3600
    """CPU seconds a kernel may use in its lifetime (local: RLIMIT_CPU)."""
    max_processes: int = 64
    """Processes/threads at most (local: RLIMIT_NPROC in a user namespace; docker: pids)."""
    max_file_mb: int = 64
    """Largest file a cell may write (local: RLIMIT_FSIZE; docker: size of the tmpfs work dir)."""
    cpus: float = 1.0
    """CPU share for a docker kernel (1.0 = one core)."""

    # Local backend.
    sandbox: Literal["auto", "bwrap", "none"] = "auto"
    """Local isolation: ``bwrap`` (no network, private /tmp, host files hidden), ``none``
    (setrlimit + temp cwd + scrubbed env only), ``auto`` = bwrap when installed."""

    # Docker backend.
    image: str = "tirforge-sandbox:latest"
    """Image with python3 + ipykernel (+ numpy, sympy); build with ``tirforge sandbox build``."""

    # Pool.
    pool_size: int = 4
    """Warm kernels kept per pool."""

    def __post_init__(self) -> None:
        if self.backend not in ("local", "docker"):
            raise ValueError(f"backend must be 'local' or 'docker', not {self.backend!r}")
        if self.sandbox not in ("auto", "bwrap", "none"):
            raise ValueError(f"sandbox must be 'auto', 'bwrap' or 'none', not {self.sandbox!r}")
        if self.timeout <= 0 or self.max_output_chars < 100 or self.pool_size < 1:
            raise ValueError("timeout must be > 0, max_output_chars >= 100, pool_size >= 1")
