// The public headers and their initializers from C++17 under -Wall -Wextra -Wpedantic -Werror
// (which includes -Wmissing-field-initializers): built with the tests, never run.
#include "mdopt/mdopt.h"

mdopt_param_desc mdopt_cxx_check_desc() {
  mdopt_param_desc d = MDOPT_PARAM_DESC_INIT;
  mdopt_param_desc e = mdopt_param_desc_init();
  d.ndim = e.ndim;
  return d;
}

mdopt_step_info mdopt_cxx_check_info() {
  mdopt_step_info i = MDOPT_STEP_INFO_INIT;
  mdopt_step_info j = mdopt_step_info_init();
  i.step = j.step;
  return i;
}
