"""ctest's entry to the Python tests (tests/CMakeLists.txt, test `python_package`): runs
`python3 -m pytest` on this folder against the build's libmdopt.so ($MDOPT_LIBRARY), or
exits 77 (ctest: skipped) saying why, in the form launch/skip-reasons.py reads: in a
sanitizer build (an ASan-instrumented library cannot be loaded into an uninstrumented
interpreter), or when pytest, numpy or torch is not importable (launch/install-deps.sh
installs them)."""
import importlib.util
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def skip(reason):
    print("%s:1: Skipped\n%s\n[  SKIPPED ] python_package" % (__file__, reason))
    sys.exit(77)


if os.environ.get("MDOPT_SANITIZE"):
    skip("python tests: libmdopt.so is built with -fsanitize=%s, which an uninstrumented "
         "python3 cannot load; they run in the plain build" % os.environ["MDOPT_SANITIZE"])
missing = [m for m in ("pytest", "numpy", "torch") if importlib.util.find_spec(m) is None]
if missing:
    skip("python tests: %s not importable by %s (launch/install-deps.sh installs them)"
         % (", ".join(missing), sys.executable))
sys.exit(subprocess.call([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                          HERE], cwd=HERE))
