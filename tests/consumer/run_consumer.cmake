# Installs an mdopt build tree into a scratch prefix, then configures, builds and runs a
# separate project that finds it with find_package(mdopt CONFIG REQUIRED), and builds and
# runs the same program with the flags of `pkg-config --cflags --libs mdopt`. Any failing step
# fails the test, with that step's output. Run by ctest (tests/consumer/CMakeLists.txt):
#   cmake -DMDOPT_BUILD_DIR=... -DCONSUMER_SOURCE_DIR=... -DWORK_DIR=... [-DCONFIG=...]
#         [-DGENERATOR=...] [-DMAKE_PROGRAM=...] [-DC_COMPILER=...] [-DEXPECTED_VERSION=...]
#         [-DSANITIZE=address,undefined]
#         -P run_consumer.cmake
cmake_minimum_required(VERSION 3.22)

foreach(var MDOPT_BUILD_DIR CONSUMER_SOURCE_DIR WORK_DIR)
  if(NOT ${var})
    message(FATAL_ERROR "run_consumer.cmake: -D${var}=... is required")
  endif()
endforeach()

set(prefix "${WORK_DIR}/prefix")
set(build "${WORK_DIR}/build")
# A clean slate every run: a stale prefix or cache would hide a broken install.
file(REMOVE_RECURSE "${WORK_DIR}")
file(MAKE_DIRECTORY "${WORK_DIR}")

# Runs one step; on failure stops with its output.
function(run_step what)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT rc STREQUAL "0")
    message(FATAL_ERROR "consumer test: ${what} failed (${rc})\n"
                        "command: ${ARGN}\n--- stdout ---\n${out}\n--- stderr ---\n${err}")
  endif()
  message(STATUS "consumer test: ${what}: ok")
  set(step_output "${out}" PARENT_SCOPE)
endfunction()

set(config "${CONFIG}")
if(NOT config)
  set(config Release)
endif()
set(install_config "")
if(CONFIG)
  set(install_config --config "${CONFIG}")
endif()
run_step("install into ${prefix}"
  "${CMAKE_COMMAND}" --install "${MDOPT_BUILD_DIR}" --prefix "${prefix}" ${install_config})

set(configure_args -S "${CONSUMER_SOURCE_DIR}" -B "${build}"
  "-DCMAKE_PREFIX_PATH=${prefix}"
  "-DCMAKE_BUILD_TYPE=${config}"
  "-DMDOPT_EXPECTED_PREFIX=${prefix}"
  # Only the prefix under test: no user or system package registry.
  -DCMAKE_FIND_USE_PACKAGE_REGISTRY=OFF
  -DCMAKE_FIND_USE_SYSTEM_PACKAGE_REGISTRY=OFF)
if(GENERATOR)
  list(APPEND configure_args -G "${GENERATOR}")
endif()
if(MAKE_PROGRAM)
  list(APPEND configure_args "-DCMAKE_MAKE_PROGRAM=${MAKE_PROGRAM}")
endif()
if(C_COMPILER)
  list(APPEND configure_args "-DCMAKE_C_COMPILER=${C_COMPILER}")
endif()
if(EXPECTED_VERSION)
  list(APPEND configure_args "-DMDOPT_EXPECTED_VERSION=${EXPECTED_VERSION}")
endif()
# A sanitized libmdopt needs its runtime linked into the program too.
set(sanitize_flags "")
if(SANITIZE)
  set(sanitize_flags "-fsanitize=${SANITIZE}")
  list(APPEND configure_args "-DCMAKE_C_FLAGS=${sanitize_flags}"
       "-DCMAKE_EXE_LINKER_FLAGS=${sanitize_flags}")
endif()
run_step("configure" "${CMAKE_COMMAND}" ${configure_args})
run_step("build" "${CMAKE_COMMAND}" --build "${build}" --config "${config}")

set(path_file "${build}/consumer_path_${config}.txt")
if(NOT EXISTS "${path_file}")
  message(FATAL_ERROR "consumer test: the consumer project did not write ${path_file}")
endif()
file(READ "${path_file}" exe)
run_step("run ${exe}" "${exe}")
message(STATUS "${step_output}")
if(NOT step_output MATCHES "mdopt consumer: ok")
  message(FATAL_ERROR "consumer test: the program did not report success:\n${step_output}")
endif()

# The same program built with pkg-config, as a Makefile or a meson user would: only the
# installed mdopt.pc is searched (PKG_CONFIG_LIBDIR), found via PKG_CONFIG_PATH.
find_program(PKG_CONFIG_EXECUTABLE NAMES pkg-config pkgconf)
if(NOT PKG_CONFIG_EXECUTABLE)
  message(FATAL_ERROR "consumer test: pkg-config not found (launch/install-deps.sh installs it)")
endif()
file(GLOB_RECURSE pc_files "${prefix}/*/mdopt.pc")
list(LENGTH pc_files n_pc)
if(NOT n_pc EQUAL 1)
  message(FATAL_ERROR "consumer test: expected one installed mdopt.pc under ${prefix}, found: ${pc_files}")
endif()
get_filename_component(pc_dir "${pc_files}" DIRECTORY)
set(ENV{PKG_CONFIG_PATH} "${pc_dir}")
set(ENV{PKG_CONFIG_LIBDIR} "${pc_dir}")
run_step("pkg-config --cflags --libs mdopt" "${PKG_CONFIG_EXECUTABLE}" --cflags --libs mdopt)
string(STRIP "${step_output}" pc_flags)
separate_arguments(pc_flags UNIX_COMMAND "${pc_flags}")
run_step("pkg-config --variable=libdir mdopt" "${PKG_CONFIG_EXECUTABLE}" --variable=libdir mdopt)
string(STRIP "${step_output}" pc_libdir)
file(REAL_PATH "${pc_libdir}" pc_libdir_real)
file(REAL_PATH "${prefix}" prefix_real)
string(FIND "${pc_libdir_real}/" "${prefix_real}/" at)
if(NOT at EQUAL 0)
  message(FATAL_ERROR "consumer test: mdopt.pc's libdir ${pc_libdir} is not under ${prefix}")
endif()
if(EXPECTED_VERSION)
  run_step("pkg-config --modversion mdopt" "${PKG_CONFIG_EXECUTABLE}" --modversion mdopt)
  string(STRIP "${step_output}" pc_version)
  if(NOT pc_version STREQUAL EXPECTED_VERSION)
    message(FATAL_ERROR "consumer test: mdopt.pc says version ${pc_version}, expected ${EXPECTED_VERSION}")
  endif()
endif()
set(cc "${C_COMPILER}")
if(NOT cc)
  set(cc cc)
endif()
set(pc_exe "${WORK_DIR}/mdopt_consumer_pkgconfig")
set(version_define "")
if(EXPECTED_VERSION)
  set(version_define "-DMDOPT_EXPECTED_VERSION=\"${EXPECTED_VERSION}\"")
endif()
run_step("compile with pkg-config flags"
  "${cc}" -std=c11 -Wall -Wextra -Wpedantic -Werror ${version_define} ${sanitize_flags}
  "${CONSUMER_SOURCE_DIR}/main.c" ${pc_flags} -o "${pc_exe}")
# Run as the README prints it: no LD_LIBRARY_PATH, the rpath in mdopt.pc's Libs finds the library.
unset(ENV{LD_LIBRARY_PATH})
run_step("run ${pc_exe}" "${pc_exe}")
message(STATUS "${step_output}")
if(NOT step_output MATCHES "mdopt consumer: ok")
  message(FATAL_ERROR "consumer test: the pkg-config build did not report success:\n${step_output}")
endif()

# Passed: nothing to look at, so leave no copy of the library behind.
file(REMOVE_RECURSE "${WORK_DIR}")
