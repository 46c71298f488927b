# Installs an mdopt build tree into a scratch prefix, then configures, builds and runs a
# separate project that finds it with find_package(mdopt CONFIG REQUIRED). Any failing step
# fails the test, with that step's output. Run by ctest (tests/consumer/CMakeLists.txt):
#   cmake -DMDOPT_BUILD_DIR=... -DCONSUMER_SOURCE_DIR=... -DWORK_DIR=... [-DCONFIG=...]
#         [-DGENERATOR=...] [-DMAKE_PROGRAM=...] [-DC_COMPILER=...] [-DEXPECTED_VERSION=...]
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

# Passed: nothing to look at, so leave no copy of the library behind.
file(REMOVE_RECURSE "${WORK_DIR}")
