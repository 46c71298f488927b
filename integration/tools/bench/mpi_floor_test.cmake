# mdopt-bench --mpi at N ranks (ctest: cmake -DMPIEXEC=... -DFLAGS=... -DRANKS=N -DBENCH=...
# -P mpi_floor_test.cmake): every preset's bytes on the wire per rank per step equal the
# floor the tool derives from the plan term by term (gradients, weights, Newton-Schulz,
# cross-row all-reduce, finite check), to the byte, on a model whose row blocks divide
# evenly (no padding); and the cross-row term is the one all-reduce of the record.
cmake_minimum_required(VERSION 3.22)
execute_process(
  COMMAND ${MPIEXEC} ${FLAGS} -np ${RANKS} ${BENCH} --mpi --d-model 64 --layers 2 --vocab 256
          --presets md-adamw,md-muon,adamw --steps 2 --warmup 1 --threads 1 --stream-mib 0
  RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err TIMEOUT 120)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "mdopt-bench --mpi at ${RANKS} ranks: exit ${rc}\n${out}\n${err}")
endif()
string(REPLACE "\n" ";" lines "${out}")
set(rows 0)
foreach(line IN LISTS lines)
  # preset  grads  weights  ns  cross  check  bytes-floor  cross-as-AG
  if(line MATCHES "^(md-adamw|md-muon|adamw) +([0-9]+) +([0-9]+) +([0-9]+) +([0-9]+) +([0-9]+) +(-?[0-9]+) +([0-9]+)$")
    math(EXPR rows "${rows} + 1")
    set(preset ${CMAKE_MATCH_1})
    set(cross ${CMAKE_MATCH_5})
    set(excess ${CMAKE_MATCH_7})
    set(as_ag ${CMAKE_MATCH_8})
    if(NOT excess EQUAL 0)
      message(FATAL_ERROR "${preset} at ${RANKS} ranks sends ${excess} bytes per step beyond its floor\n${out}")
    endif()
    # One all-reduce of L doubles: floor(2 (N-1) 8 L / N) = cross; an all-gather: (N-1) 8 L.
    if(preset STREQUAL "md-adamw" AND NOT cross GREATER 0)
      message(FATAL_ERROR "md-adamw at ${RANKS} ranks has no cross-row bytes\n${out}")
    endif()
    math(EXPR twice "2 * ${as_ag} / (${RANKS} - 1)")
    if(cross GREATER twice)
      message(FATAL_ERROR "${preset}: cross-row bytes ${cross} above twice the record (${twice})\n${out}")
    endif()
    message(STATUS "${preset} at ${RANKS} ranks: on its floor; cross-row ${cross} B (as all-gather ${as_ag} B)")
  endif()
endforeach()
if(NOT rows EQUAL 3)
  message(FATAL_ERROR "expected the floor terms of 3 presets, found ${rows}:\n${out}")
endif()
