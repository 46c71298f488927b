# mdopt-sim end to end (ctest mdopt_sim_cli): both reference models at 8..4096 GPUs print
# their table and write the CSV and the plots; bad input is an error message and exit 2,
# never a crash.
cmake_minimum_required(VERSION 3.22)
file(REMOVE_RECURSE ${WORK_DIR})
file(MAKE_DIRECTORY ${WORK_DIR})
set(HW ${SRC}/integration/tools/sim/hardware/h100.conf)
# The plots need python3 with matplotlib (launch/install-deps.sh); without it, the CSV only.
set(PLOTS exposed_comm.png overhead.png)
set(OUT_FLAG --plot ${WORK_DIR})
execute_process(COMMAND python3 -c "import matplotlib" RESULT_VARIABLE no_mpl OUTPUT_QUIET ERROR_QUIET)
if(NOT no_mpl EQUAL 0)
  message(STATUS "no matplotlib: the plots are not checked")
  set(PLOTS "")
  set(OUT_FLAG --csv ${WORK_DIR}/mdopt-sim.csv)
endif()
execute_process(
  COMMAND ${SIM} --hardware ${HW} --shapes ${SRC}/docs/shapes/gpt-70b-dense.txt
          --shapes ${SRC}/docs/shapes/moe-64x-d4096-l32.txt --ranks 8,256,1024,4096 ${OUT_FLAG}
  RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err TIMEOUT 80)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "mdopt-sim: exit ${rc}\n${out}\n${err}")
endif()
foreach(want "| 4096 | md-muon | rows |" "| 8 | adamw | rows |" "model moe-64x-d4096-l32")
  string(FIND "${out}" "${want}" at)
  if(at LESS 0)
    message(FATAL_ERROR "no '${want}' in:\n${out}")
  endif()
endforeach()
foreach(f mdopt-sim.csv ${PLOTS})
  if(NOT EXISTS ${WORK_DIR}/${f})
    message(FATAL_ERROR "mdopt-sim --plot wrote no ${f}\n${out}\n${err}")
  endif()
endforeach()
file(WRITE ${WORK_DIR}/no_latency.conf "name = x\nhbm_gbps = 1\n")
set(DENSE ${SRC}/docs/shapes/gpt-d1024-l4-matrices.txt)
foreach(case "preset;${HW};--preset;nosuch;unknown preset 'nosuch'"
             "zero ranks;${HW};--ranks;0;a GPU count must be >= 1"
             "missing field;${WORK_DIR}/no_latency.conf;--ranks;8;missing hardware field"
             "no hardware file;${WORK_DIR}/none.conf;--ranks;8;cannot open the hardware file"
             "bad layout;${HW};--layouts;diagonal;is not rows or owner")
  list(GET case 0 name)
  list(GET case 1 hw)
  list(GET case 2 flag)
  list(GET case 3 value)
  list(GET case 4 expect)
  execute_process(
    COMMAND ${SIM} --hardware ${hw} --shapes ${DENSE} ${flag} ${value}
    RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err TIMEOUT 20)
  if(NOT rc EQUAL 2)
    message(FATAL_ERROR "${name}: exit ${rc}, expected 2\n${out}\n${err}")
  endif()
  string(FIND "${err}" "${expect}" at)
  if(at LESS 0)
    message(FATAL_ERROR "${name}: stderr lacks '${expect}':\n${err}")
  endif()
  message(STATUS "${name}: ${err}")
endforeach()
