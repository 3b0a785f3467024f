"""AutoIF: instruction-following data verified by code that runs in the sandbox.

Stages (each resumable, files in one work folder): 1 seeds, 2 augment (self-instruct),
3 verifiers (K functions + cases per instruction, as JSON), 4 crossval (every function on every
case in a kernel; AutoIF's filter), 5 backtranslate (restate + judge), 6 queries, 7 responses
(pass rate over the kept functions, in the sandbox), 8 export (SFT messages, DPO pairs).
"""

from tirforge.agent.pipelines.autoif.config import AutoIFConfig
from tirforge.agent.pipelines.autoif.pipeline import STAGES, run_autoif, verifier_pool

__all__ = ["STAGES", "AutoIFConfig", "run_autoif", "verifier_pool"]
