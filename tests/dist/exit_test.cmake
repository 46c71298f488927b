# Runs c_abi_exit (PROGRAM) under mpirun at NP ranks in MODE (none | comm): a program that
# returns from main without destroying its optimizer (and communicator). mpirun must exit 0,
# every rank must have printed its line, and mpirun must not report a process that exited
# without finalising MPI.
execute_process(
  COMMAND ${MPIEXEC} ${FLAGS} -n ${NP} ${PROGRAM} ${MODE}
  RESULT_VARIABLE rc
  OUTPUT_VARIABLE out ERROR_VARIABLE err
  TIMEOUT 120)
message(STATUS "exit_test np${NP} ${MODE}: mpirun exit '${rc}'\n${out}${err}")
if(NOT rc STREQUAL "0")
  message(FATAL_ERROR "exit_test np${NP} ${MODE}: mpirun exited with '${rc}', expected 0")
endif()
string(REGEX MATCHALL "c_abi_exit: ok rank [0-9]+" lines "${out}")
list(LENGTH lines n)
if(NOT n EQUAL NP)
  message(FATAL_ERROR "exit_test np${NP} ${MODE}: ${n} of ${NP} ranks reported ok")
endif()
if("${out}${err}" MATCHES "exited improperly|without calling .finalize|MPI_Finalize")
  message(FATAL_ERROR "exit_test np${NP} ${MODE}: mpirun reported an improper exit")
endif()
