"""setuptools hook (the metadata is in pyproject.toml): an installed copy remembers the
checkout it was installed from, so that it can find that checkout's build tree
(build/dist_opt/libmdopt.so.1) when the library is not installed anywhere else."""
import os

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPy(build_py):
    def run(self):
        super().run()
        root = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                             "..", ".."))
        if os.path.isfile(os.path.join(root, "include", "mdopt", "mdopt.h")):
            with open(os.path.join(self.build_lib, "mdopt", "_checkout.py"), "w") as f:
                f.write("# Written at install: the mdopt checkout this copy came from.\n"
                        "ROOT = %r\n" % root)


setup(cmdclass={"build_py": BuildPy})
