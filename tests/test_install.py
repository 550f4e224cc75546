"""The package installs as leedl_fast with kernels/ as leedl_fast.kernels, never a top-level ``kernels``."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_kernels_is_a_subpackage(tmp_path):
    code = (
        "import importlib.util, leedl_fast, leedl_fast.kernels.softmax as k;"
        "assert importlib.util.find_spec('kernels') is None, 'a top-level kernels package is importable';"
        "print(k.__file__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()).resolve() == (ROOT / "kernels" / "softmax.py").resolve()
