# Smoke tests of mdopt-bench, run by ctest as `cmake -DCASE=... -P smoke_test.cmake`:
#   gpt        tiny GPT, every preset, --reference, --json FILE
#   shapes     --shapes testdata/tiny_shapes.txt, --json - (JSON on stdout)
#   exit_codes bad command lines exit 2, a failing mdopt call exits 1
# Inputs: BENCH (the program), PYTHON, CHECKER (check_bench_json.py), SHAPES, WORK_DIR.
cmake_minimum_required(VERSION 3.22)

function(run_bench out_rc out_stdout out_stderr)
  execute_process(COMMAND ${BENCH} ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE so
                  ERROR_VARIABLE se TIMEOUT 60)
  set(${out_rc} "${rc}" PARENT_SCOPE)
  set(${out_stdout} "${so}" PARENT_SCOPE)
  set(${out_stderr} "${se}" PARENT_SCOPE)
endfunction()

function(expect_success rc so se what)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "${what}: exit code ${rc}\nstdout:\n${so}\nstderr:\n${se}")
  endif()
endfunction()

function(check_json file)
  execute_process(COMMAND ${PYTHON} ${CHECKER} ${file} ${ARGN} RESULT_VARIABLE rc
                  OUTPUT_VARIABLE so ERROR_VARIABLE se)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "JSON check of ${file} failed:\n${so}${se}")
  endif()
  message(STATUS "${so}")
endfunction()

file(MAKE_DIRECTORY ${WORK_DIR})
set(all_presets "md-muon,md-adamw,muon,adamw,muonh,adamh")

if(CASE STREQUAL "gpt")
  set(json ${WORK_DIR}/bench_gpt.json)
  file(REMOVE ${json})
  run_bench(rc so se --d-model 64 --layers 1 --vocab 256 --steps 2 --warmup 1
            --presets ${all_presets} --reference --json ${json} --threads 2)
  expect_success("${rc}" "${so}" "${se}" "mdopt-bench (tiny GPT)")
  message(STATUS "mdopt-bench output:\n${so}")
  foreach(word "median ms" "fast/ref" "mdopt-bench: mdopt" "cpu:" " ISA " "BLAS OpenBLAS"
               "md-muon costs " "x plain muon per step" "md-adamw costs " "Columns:"
               "ns per param =" "model B/p" "floor ms" "memory: ")
    string(FIND "${so}" "${word}" at)
    if(at EQUAL -1)
      message(FATAL_ERROR "the table lacks '${word}':\n${so}")
    endif()
  endforeach()
  # 256x64 embedding and head, 4 of 64x64, 256x64 and 64x256, three vectors of 64.
  check_json(${json} --presets ${all_presets} --engines fast,reference --params 82112
             --tensors 11 --steps 2 --reference-steps 2)

elseif(CASE STREQUAL "shapes")
  set(json ${WORK_DIR}/bench_shapes.json)
  run_bench(rc so se --shapes ${SHAPES} --steps 2 --warmup 0 --presets md-muon,adamw,muon
            --param-dtype bf16 --grad-dtype f32 --json -)
  expect_success("${rc}" "${so}" "${se}" "mdopt-bench --shapes")
  message(STATUS "mdopt-bench table (stderr):\n${se}")
  file(WRITE ${json} "${so}")  # stdout must be the JSON alone
  # The traffic model by hand (bf16 weights: +4 B where the final W is written; f32 grads):
  # 81920 matrix, 32768 table (embedding, head) and 192 vector elements. adamw: 36 B each;
  # muon: matrices 4 + 20 + 16 = 40, the rest adamw's 36; md-muon: matrices 4 + 24 + 12 + 12
  # = 52, tables (preset=embedding) 4 + 28 + 12 = 44, vectors 36.
  check_json(${json} --presets md-muon,adamw,muon --engines fast --params 114880 --tensors 9
             --steps 2 --model-bytes md-muon=5708544,adamw=4135680,muon=4463360)

elseif(CASE STREQUAL "exit_codes")
  set(bad_shapes ${WORK_DIR}/bad_shapes.txt)
  file(WRITE ${bad_shapes} "w matrix 4 4\nv vector 4 4\n")
  foreach(args "--presets;nope" "--steps;0" "--shapes;${bad_shapes}" "--shapes;${SHAPES};--d-model;8"
               "--presets;adamw,adamw" "--no-such-flag")
    run_bench(rc so se ${args})
    if(NOT rc EQUAL 2)
      message(FATAL_ERROR "mdopt-bench ${args}: exit code ${rc}, expected 2\n${so}${se}")
    endif()
  endforeach()
  # An error of the library itself (bf16 gradients for f32 weights) exits 1 with its status.
  run_bench(rc so se --d-model 8 --layers 1 --vocab 16 --steps 1 --presets adamw
            --param-dtype f32 --grad-dtype bf16)
  string(FIND "${se}" "MDOPT_INVALID_ARGUMENT" at)
  if(NOT rc EQUAL 1 OR at EQUAL -1)
    message(FATAL_ERROR "an ABI error gave exit code ${rc}, expected 1 and the status:\n${so}${se}")
  endif()
  run_bench(rc so se --help)
  string(FIND "${so}" "preset=embedding" at)
  if(NOT rc EQUAL 0 OR at EQUAL -1)
    message(FATAL_ERROR "--help: exit code ${rc} or no preset table:\n${so}${se}")
  endif()

else()
  message(FATAL_ERROR "unknown CASE '${CASE}'")
endif()
