/* mdopt_set_group_lr and mdopt_get_group_lr from C11: two optimizers over the same start,
 * one with lr=0.01 gain_lr=0.002 in its spec, the other with twice both, halved by
 * mdopt_set_group_lr(0.01) (so that gain_lr = 0.004 * (0.01 / 0.02) = 0.002 exactly);
 * their weights agree bit for bit after five steps. Refused calls (unknown group, NaN and negative lr, NULLs) return
 * MDOPT_INVALID_ARGUMENT with a message and leave the lr as it was. */
#include "mdopt/mdopt.h"
#include "c_check.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

enum { M = 7, N = 5, STEPS = 5 };

/* A small deterministic generator (no libc rand: its sequence differs across libcs). */
static double next_uniform(uint64_t* s) {
  *s = *s * 6364136223846793005ull + 1442695040888963407ull;
  return (double)(*s >> 11) / 9007199254740992.0 - 0.5;
}

static int build(mdopt_comm* comm, const char* spec, float* w, const float* g,
                 mdopt_optimizer** out) {
  mdopt_param_desc d = MDOPT_PARAM_DESC_INIT;
  CHECK_OK(mdopt_create(comm, "threads=1", out));
  CHECK_OK(mdopt_add_group(*out, "hidden", spec));
  d.name = "w";
  d.group = "hidden";
  d.ndim = 2;
  d.shape[0] = M;
  d.shape[1] = N;
  d.param_dtype = MDOPT_DTYPE_F32;
  d.param = w;
  d.grad_dtype = MDOPT_DTYPE_F32;
  d.grad = g;
  CHECK_OK(mdopt_add_param(*out, &d, NULL));
  return 0;
}

static int run(void) {
  mdopt_comm* comm = NULL;
  mdopt_optimizer *baked = NULL, *set = NULL;
  float wa[M * N], wb[M * N], g[M * N];
  double lr = -1, gain_lr = -1;
  uint64_t seed = 42;
  int i, step;

  for (i = 0; i < M * N; ++i) wa[i] = wb[i] = (float)next_uniform(&seed);
  CHECK_OK(mdopt_comm_create_local(&comm));
  if (build(comm, "preset=md-muon lr=0.01 gain_lr=0.002", wa, g, &baked) != 0) return 1;
  if (build(comm, "preset=md-muon lr=0.02 gain_lr=0.004", wb, g, &set) != 0) return 1;

  CHECK_OK(mdopt_get_group_lr(set, "hidden", &lr, &gain_lr));
  CHECK(lr == 0.02 && gain_lr == 0.004);
  CHECK_OK(mdopt_set_group_lr(set, "hidden", 0.01));
  CHECK_OK(mdopt_get_group_lr(set, "hidden", &lr, &gain_lr));
  CHECK(lr == 0.01 && gain_lr == 0.002);

  /* Refused: the lr stays. */
  CHECK(mdopt_set_group_lr(set, "nope", 0.5) == MDOPT_INVALID_ARGUMENT);
  CHECK(strstr(mdopt_last_error(), "'nope'") != NULL);
  CHECK(mdopt_set_group_lr(set, "hidden", NAN) == MDOPT_INVALID_ARGUMENT);
  CHECK(strstr(mdopt_last_error(), "finite") != NULL);
  CHECK(mdopt_set_group_lr(set, "hidden", -0.1) == MDOPT_INVALID_ARGUMENT);
  CHECK(mdopt_set_group_lr(NULL, "hidden", 0.1) == MDOPT_INVALID_ARGUMENT);
  CHECK(mdopt_set_group_lr(set, NULL, 0.1) == MDOPT_INVALID_ARGUMENT);
  CHECK(mdopt_get_group_lr(NULL, "hidden", &lr, NULL) == MDOPT_INVALID_ARGUMENT);
  CHECK_OK(mdopt_get_group_lr(set, "hidden", &lr, NULL));
  CHECK(lr == 0.01);

  CHECK_OK(mdopt_finalize(baked));
  CHECK_OK(mdopt_finalize(set));
  for (step = 0; step < STEPS; ++step) {
    for (i = 0; i < M * N; ++i) g[i] = (float)next_uniform(&seed);
    CHECK_OK(mdopt_step(baked, 1.0, NULL, NULL));
    CHECK_OK(mdopt_step(set, 1.0, NULL, NULL));
  }
  CHECK(memcmp(wa, wb, sizeof wa) == 0);
  /* The weights moved: the comparison is not between two untouched copies. */
  seed = 42;
  CHECK(fabsf(wa[0] - (float)next_uniform(&seed)) > 1e-6f);

  CHECK_OK(mdopt_destroy(baked));
  CHECK_OK(mdopt_destroy(set));
  CHECK_OK(mdopt_comm_destroy(comm));
  return 0;
}

int main(void) {
  if (run() != 0 || g_failures != 0) {
    fprintf(stderr, "c_abi_group_lr: FAILED (%d checks)\n", g_failures);
    return 1;
  }
  printf("c_abi_group_lr: ok\n");
  return 0;
}
