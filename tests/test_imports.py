"""`import riverone_hf` stays light: no CUDA initialisation, no optional heavy packages."""

import subprocess
import sys

SCRIPT = """
import sys, torch
import riverone_hf
assert not torch.cuda.is_initialized(), "importing riverone_hf initialised CUDA"
for heavy in ("pennylane", "optimum", "datasets", "numba", "aqlm"):
    assert heavy not in sys.modules, heavy + " imported by `import riverone_hf`"
"""


def test_import_is_light():
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
