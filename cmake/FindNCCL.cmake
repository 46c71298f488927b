# FindNCCL: NCCL's header and library (NCCL ships no CMake package).
#
# Looks under NCCL_ROOT (variable or environment), the CUDA toolkit's folders
# (CUDAToolkit_LIBRARY_ROOT, include/ and lib/, lib64/ of it), the system's, and the pip wheel
# nvidia-nccl-cu13 / -cu12 of the Python on PATH (site-packages/nvidia/nccl), in that order.
# Defines NCCL_FOUND, NCCL_INCLUDE_DIR, NCCL_LIBRARY, NCCL_VERSION and the imported target
# NCCL::NCCL.
set(_nccl_hints)
foreach(_root ${NCCL_ROOT} $ENV{NCCL_ROOT} ${CUDAToolkit_LIBRARY_ROOT} ${CUDAToolkit_ROOT}
        $ENV{CUDA_PATH} /usr/local/cuda)
  if(_root)
    list(APPEND _nccl_hints ${_root})
  endif()
endforeach()
if(CUDAToolkit_INCLUDE_DIRS)
  foreach(_inc ${CUDAToolkit_INCLUDE_DIRS})
    get_filename_component(_parent ${_inc} DIRECTORY)
    list(APPEND _nccl_hints ${_parent})
  endforeach()
endif()
# The pip wheel (what PyTorch uses), found through the Python on PATH.
find_program(_nccl_python NAMES python3 python)
if(_nccl_python)
  execute_process(
    COMMAND ${_nccl_python} -c "import nvidia.nccl, os; print(os.path.dirname(nvidia.nccl.__file__) if nvidia.nccl.__file__ else list(nvidia.nccl.__path__)[0])"
    OUTPUT_VARIABLE _nccl_pip OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET RESULT_VARIABLE _nccl_pip_rc)
  if(_nccl_pip_rc EQUAL 0 AND _nccl_pip)
    list(APPEND _nccl_pip_hints ${_nccl_pip})
  endif()
endif()

find_path(NCCL_INCLUDE_DIR nccl.h HINTS ${_nccl_hints} PATH_SUFFIXES include
          PATHS ${_nccl_pip_hints})
find_library(NCCL_LIBRARY NAMES nccl libnccl.so.2 HINTS ${_nccl_hints}
             PATH_SUFFIXES lib lib64 lib/x86_64-linux-gnu PATHS ${_nccl_pip_hints}/lib)

if(NCCL_INCLUDE_DIR AND EXISTS ${NCCL_INCLUDE_DIR}/nccl.h)
  file(STRINGS ${NCCL_INCLUDE_DIR}/nccl.h _nccl_ver REGEX "^#define NCCL_(MAJOR|MINOR|PATCH) +[0-9]+")
  foreach(_part MAJOR MINOR PATCH)
    string(REGEX MATCH "NCCL_${_part} +([0-9]+)" _m "${_nccl_ver}")
    set(_nccl_${_part} ${CMAKE_MATCH_1})
  endforeach()
  set(NCCL_VERSION "${_nccl_MAJOR}.${_nccl_MINOR}.${_nccl_PATCH}")
endif()

include(FindPackageHandleStandardArgs)
find_package_handle_standard_args(NCCL REQUIRED_VARS NCCL_LIBRARY NCCL_INCLUDE_DIR
                                  VERSION_VAR NCCL_VERSION)
if(NCCL_FOUND AND NOT TARGET NCCL::NCCL)
  add_library(NCCL::NCCL UNKNOWN IMPORTED)
  set_target_properties(NCCL::NCCL PROPERTIES IMPORTED_LOCATION ${NCCL_LIBRARY}
                        INTERFACE_INCLUDE_DIRECTORIES ${NCCL_INCLUDE_DIR})
endif()
mark_as_advanced(NCCL_INCLUDE_DIR NCCL_LIBRARY)
