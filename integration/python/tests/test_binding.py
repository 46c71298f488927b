"""The ctypes binding on its own (no torch): loading, versions, errors, lr control."""
import ctypes

import pytest

import mdopt
from mdopt import _core, _lib


def test_library_loads_and_reports():
    assert mdopt.ABI_VERSION == 1
    assert _lib.lib.mdopt_abi_version() == 1
    assert mdopt.version().count(".") == 2
    info = mdopt.runtime_info()
    assert "abi=1" in info and "blas=" in info
    assert mdopt.library_path.endswith(_lib.SONAME) or "libmdopt" in mdopt.library_path


def test_struct_sizes_match_the_headers():
    # LP64 sizes of the current headers (the library accepts any size from the v1 one up).
    assert ctypes.sizeof(_lib.ParamDesc) == 96  # 88 (v1) + radius_scale
    assert ctypes.sizeof(_lib.StepInfo) == 64
    assert ctypes.sizeof(_lib.GroupStats) == 56
    assert _lib.init(_lib.StepInfo).struct_size == 64


def test_errors_carry_status_and_message():
    opt = _core.Optimizer(mdopt.comm.local(), "threads=1")
    with pytest.raises(mdopt.MdoptError) as e:
        opt.add_group("g", "preset=md-muon lr=-1")
    assert e.value.status == "MDOPT_INVALID_ARGUMENT"
    assert "lr" in e.value.message and "'g'" in e.value.message
    with pytest.raises(mdopt.MdoptError) as e:
        opt.step()
    assert e.value.status == "MDOPT_INVALID_STATE"
    assert "before mdopt_finalize" in e.value.message
    with pytest.raises(mdopt.MdoptError) as e:
        _core.Optimizer(mdopt.comm.local(), "threads=0")
    assert e.value.status == "MDOPT_INVALID_ARGUMENT" and "threads" in e.value.message
    assert "threads" in str(e.value)


def test_group_lr_follows_and_refusals_change_nothing():
    opt = _core.Optimizer(mdopt.comm.local(), "threads=1")
    opt.add_group("m", "preset=md-muon")
    assert opt.group_lr("m") == (8e-3, 1e-3)
    opt.set_group_lr("m", 4e-3)
    assert opt.group_lr("m") == (4e-3, 5e-4)
    for bad in (float("nan"), -1.0, float("inf")):
        with pytest.raises(mdopt.MdoptError) as e:
            opt.set_group_lr("m", bad)
        assert e.value.status == "MDOPT_INVALID_ARGUMENT"
    with pytest.raises(mdopt.MdoptError) as e:
        opt.set_group_lr("nope", 1e-3)
    assert "'nope'" in e.value.message
    assert opt.group_lr("m") == (4e-3, 5e-4)


def test_comm_local():
    c = mdopt.comm.local()
    assert (c.rank, c.size) == (0, 1)
    c.close()
    with pytest.raises(ValueError):
        c.handle


@pytest.mark.parametrize("where", ["missing-file", "folder-without-it"])
def test_mdopt_library_naming_nothing_loadable_is_an_import_error(tmp_path, where):
    import os
    import subprocess
    import sys
    path = tmp_path / "libmdopt.so.1" if where == "missing-file" else tmp_path
    env = dict(os.environ, MDOPT_LIBRARY=str(path))
    r = subprocess.run([sys.executable, "-c", "import mdopt"], env=env, capture_output=True,
                       text=True, cwd=os.path.dirname(os.path.dirname(_lib.__file__)))
    assert r.returncode != 0
    assert "ImportError: mdopt: MDOPT_LIBRARY=%s, but " % path in r.stderr
    assert "does not exist" in r.stderr
