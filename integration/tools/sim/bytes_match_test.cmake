# mdopt-sim's bytes per GPU against a real run (ctest: cmake -DMPIEXEC=... -DFLAGS=...
# -DRANKS=N -DBENCH=... -DSIM=... -DSHAPES=... -DHARDWARE=... -P bytes_match_test.cmake):
# mdopt-bench --mpi steps the model at N ranks and reports mdopt_step_info.bytes_sent (mean
# over ranks); mdopt-sim counts the same step from the plan alone. Equal, within the rounding
# of the two means to whole bytes, for each preset and layout, with small buckets so that
# matrices are cut into windows, with segments as MPI leaves them and padded equal (NCCL's).
cmake_minimum_required(VERSION 3.22)
foreach(pad 0 1)
foreach(layout rows owner)
  if(pad)
    set(pad_option on)
  else()
    set(pad_option off)
  endif()
  execute_process(
    COMMAND ${MPIEXEC} ${FLAGS} -np ${RANKS} ${BENCH} --mpi --shapes ${SHAPES}
            --presets md-muon,md-adamw,adamw --layout ${layout} --steps 1 --warmup 0 --threads 1
            --stream-mib 0 --options "bucket_mb=0.02 ns_comm_dtype=bf16 comm_pad=${pad_option}"
    RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err TIMEOUT 120)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "mdopt-bench --mpi at ${RANKS} ranks: exit ${rc}\n${out}\n${err}")
  endif()
  execute_process(
    COMMAND ${SIM} --hardware ${HARDWARE} --shapes ${SHAPES} --ranks ${RANKS} --f32-weights
            --comm-pad ${pad} --bucket-mb 0.02 --ns-comm bf16 --rank-bytes --layouts ${layout}
            --preset md-muon --baseline ""
    COMMAND_ECHO NONE RESULT_VARIABLE src OUTPUT_VARIABLE sim_muon ERROR_VARIABLE serr)
  execute_process(
    COMMAND ${SIM} --hardware ${HARDWARE} --shapes ${SHAPES} --ranks ${RANKS} --f32-weights
            --comm-pad ${pad} --bucket-mb 0.02 --ns-comm bf16 --rank-bytes --layouts ${layout}
            --preset md-adamw --baseline adamw
    RESULT_VARIABLE src2 OUTPUT_VARIABLE sim_adam ERROR_VARIABLE serr2)
  if(NOT src EQUAL 0 OR NOT src2 EQUAL 0)
    message(FATAL_ERROR "mdopt-sim failed:\n${serr}\n${serr2}")
  endif()
  set(sim "${sim_muon}\n${sim_adam}")
  set(found 0)
  string(REPLACE "\n" ";" lines "${out}")
  foreach(line IN LISTS lines)
    if(line MATCHES "^(md-muon|md-adamw|adamw) +[0-9.]+ +[0-9]+\\.[0-9]+ +[0-9.]+ +[0-9.]+ +([0-9]+) +[0-9]+ +[0-9]+\\.[0-9]+")
      set(preset ${CMAKE_MATCH_1})
      set(measured ${CMAKE_MATCH_2})
      set(sim_layout ${layout})
      if(preset STREQUAL "adamw")
        set(sim_layout rows)  # the sim's baseline runs in rows (adamw's preset layout)
        if(layout STREQUAL "owner")
          continue()
        endif()
      endif()
      if(NOT sim MATCHES "bytes ${preset} ${sim_layout} N=${RANKS} mean ([0-9]+)")
        message(FATAL_ERROR "no mdopt-sim figure for ${preset} ${sim_layout}:\n${sim}")
      endif()
      set(predicted ${CMAKE_MATCH_1})
      math(EXPR diff "${predicted} - ${measured}")
      if(diff GREATER 1 OR diff LESS -1)
        message(FATAL_ERROR "${preset} ${layout} comm_pad=${pad_option} at ${RANKS} ranks: mdopt-sim ${predicted} B, "
                            "bytes_sent ${measured} B\n${out}\n${sim}")
      endif()
      message(STATUS "${preset} ${layout} comm_pad=${pad_option} at ${RANKS} ranks: ${predicted} B = bytes_sent ${measured} B")
      math(EXPR found "${found} + 1")
    endif()
  endforeach()
  if(found LESS 2)
    message(FATAL_ERROR "expected the bytes of the presets at ${RANKS} ranks, found ${found}:\n${out}")
  endif()
endforeach()
endforeach()
