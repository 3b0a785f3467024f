"""tirforge: tool-integrated mathematical reasoning."""

import os as _os

# torch's OpenMP threads spin while they wait for work. On a CPU shared with kernels (and
# anything else) a spinning thread that gets descheduled stalls every barrier: batched decoding
# measured 10-13x slower under load (docs/benchmarks.md). Passive waiting costs ~nothing when
# idle. It must be set before libgomp loads, hence here, before anything imports torch.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
