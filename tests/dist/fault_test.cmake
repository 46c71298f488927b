# Runs fault_peer under mpirun (MODE = exit | hang) and checks the job ends, with a failure,
# within the optimizer's comm_timeout_s (3 s) plus a margin: no survivor hangs.
string(TIMESTAMP t0 "%s")
execute_process(
  COMMAND ${MPIEXEC} ${FLAGS} -n 3 ${PEER} ${MODE}
  RESULT_VARIABLE rc
  OUTPUT_VARIABLE out ERROR_VARIABLE err
  TIMEOUT 60)
string(TIMESTAMP t1 "%s")
math(EXPR elapsed "${t1} - ${t0}")
message(STATUS "fault_test ${MODE}: mpirun exit '${rc}' after ${elapsed} s")
message(STATUS "${err}")
if(rc STREQUAL "0")
  message(FATAL_ERROR "fault_test ${MODE}: the job succeeded although a peer failed")
endif()
if(rc MATCHES "timeout|Process terminated")
  message(FATAL_ERROR "fault_test ${MODE}: the job hung (killed after 60 s)")
endif()
# comm_timeout_s = 3, plus MPI start-up and teardown on a loaded 2-core machine.
if(elapsed GREATER 25)
  message(FATAL_ERROR "fault_test ${MODE}: the job took ${elapsed} s, more than 3 s + 22 s margin")
endif()
if(MODE STREQUAL "hang" AND NOT err MATCHES "MDOPT|DEADLINE_EXCEEDED|UNAVAILABLE|ABORTED|comm")
  message(FATAL_ERROR "fault_test hang: no survivor reported the communication error")
endif()
