"""Every kernel compiles for sm_90 without a GPU (tools/compile_check.py): compile mode rejects
things the interpreter accepts (a loop variable whose type changes, for one), and the row kernels
keep their 16-byte vector accesses."""
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_every_kernel_compiles_for_the_gpu():
    run = subprocess.run([sys.executable, str(ROOT / "tools" / "compile_check.py")], capture_output=True, text=True,
                         timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    vectors: dict = {}  # per kernel, its variant with the most vector accesses (some copy no rows)
    for m in re.finditer(r"ok\s+(\w+):.*PTX: (\d+)/(\d+)", run.stdout):
        vectors[m.group(1)] = max(vectors.get(m.group(1), (0, 0)), (int(m.group(2)), int(m.group(3))))
    for name in ("_push_kernel", "_epilogue_kernel", "_reduce_kernel", "_pipelined_kernel"):
        loads, stores = vectors[name]
        assert loads > 0 and stores > 0, (name, run.stdout)
