/* Uses an installed mdopt: checks the version it was built against, then takes one step. */
#include <stdio.h>
#include <string.h>

#include "mdopt/mdopt.h"

#define CHECK_OK(call)                                                                \
  do {                                                                                \
    const mdopt_status s_ = (call);                                                   \
    if (s_ != MDOPT_SUCCESS) {                                                        \
      fprintf(stderr, "%s -> %s: %s\n", #call, mdopt_status_string(s_), mdopt_last_error()); \
      return 1;                                                                       \
    }                                                                                 \
  } while (0)

int main(void) {
  mdopt_comm* comm = NULL;
  mdopt_optimizer* opt = NULL;
  mdopt_param_desc desc = MDOPT_PARAM_DESC_INIT;
  mdopt_step_info info = MDOPT_STEP_INFO_INIT;
  float w[4 * 3] = {0.5f, -0.25f, 0.125f, 0.75f, -0.5f, 0.25f, 0.1f, 0.2f, -0.3f, 0.4f, 0.6f, -0.7f};
  float g[4 * 3] = {0.1f, 0.2f, 0.3f, -0.1f, -0.2f, -0.3f, 0.05f, 0.0f, 0.01f, -0.02f, 0.03f, 0.04f};
  const float before = w[0];

  if (mdopt_abi_version() != MDOPT_ABI_VERSION) {
    fprintf(stderr, "ABI %d in the library, %d in the header\n", mdopt_abi_version(), MDOPT_ABI_VERSION);
    return 1;
  }
#ifdef MDOPT_EXPECTED_VERSION
  if (strcmp(mdopt_version_string(), MDOPT_EXPECTED_VERSION) != 0) {
    fprintf(stderr, "library version %s, expected %s\n", mdopt_version_string(), MDOPT_EXPECTED_VERSION);
    return 1;
  }
#endif
  CHECK_OK(mdopt_comm_create_local(&comm));
  CHECK_OK(mdopt_create(comm, "threads=1", &opt));
  CHECK_OK(mdopt_add_group(opt, "matrices", "preset=md-adamw"));
  desc.name = "w";
  desc.group = "matrices";
  desc.ndim = 2;
  desc.shape[0] = 4;
  desc.shape[1] = 3;
  desc.param_dtype = MDOPT_DTYPE_F32;
  desc.param = w;
  desc.grad_dtype = MDOPT_DTYPE_F32;
  desc.grad = g;
  CHECK_OK(mdopt_add_param(opt, &desc, NULL));
  CHECK_OK(mdopt_finalize(opt));
  CHECK_OK(mdopt_step(opt, 1.0, NULL, &info));
  if (info.step != 1 || info.skipped != 0 || w[0] == before) {
    fprintf(stderr, "unexpected step: step %lld, skipped %d\n", (long long)info.step, info.skipped);
    return 1;
  }
  CHECK_OK(mdopt_destroy(opt));
  CHECK_OK(mdopt_comm_destroy(comm));
  printf("mdopt consumer: ok (mdopt %s, ABI %d)\n", mdopt_version_string(), mdopt_abi_version());
  return 0;
}
