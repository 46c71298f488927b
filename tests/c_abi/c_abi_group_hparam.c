/* mdopt_set_group_hparam and mdopt_get_group_hparam from C11. For the fast and the
 * reference engine: an optimizer whose spec says momentum=0.8 beta1=0.7 beta2=0.9 and one
 * built with the preset's values and given the same three by mdopt_set_group_hparam after
 * mdopt_finalize agree bit for bit after five steps; one whose momentum is changed after
 * two steps agrees with an unchanged one for those two steps and differs after. Refused
 * calls (a key that cannot change, a key the group's rule refuses, out-of-range and NaN
 * values, unknown group, NULLs) return MDOPT_INVALID_ARGUMENT with a message and change
 * nothing. */
#include "mdopt/mdopt.h"
#include "c_check.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

enum { M = 7, N = 5, STEPS = 5 };

static double next_uniform(uint64_t* s) {
  *s = *s * 6364136223846793005ull + 1442695040888963407ull;
  return (double)(*s >> 11) / 9007199254740992.0 - 0.5;
}

/* A matrix group and a vector (Adam) group. */
static int build(mdopt_comm* comm, const char* options, const char* spec, float* w, float* b,
                 const float* gw, const float* gb, mdopt_optimizer** out) {
  mdopt_param_desc d = MDOPT_PARAM_DESC_INIT;
  CHECK_OK(mdopt_create(comm, options, out));
  CHECK_OK(mdopt_add_group(*out, "hidden", spec));
  CHECK_OK(mdopt_add_group(*out, "vectors", "preset=vector"));
  d.name = "w";
  d.group = "hidden";
  d.ndim = 2;
  d.shape[0] = M;
  d.shape[1] = N;
  d.param_dtype = MDOPT_DTYPE_F32;
  d.param = w;
  d.grad_dtype = MDOPT_DTYPE_F32;
  d.grad = gw;
  CHECK_OK(mdopt_add_param(*out, &d, NULL));
  d.name = "b";
  d.group = "vectors";
  d.ndim = 1;
  d.shape[0] = M;
  d.param = b;
  d.grad = gb;
  CHECK_OK(mdopt_add_param(*out, &d, NULL));
  CHECK_OK(mdopt_finalize(*out));
  return 0;
}

static int run(const char* options) {
  mdopt_comm* comm = NULL;
  mdopt_optimizer *baked = NULL, *set = NULL, *later = NULL, *plain = NULL;
  float wa[M * N], wb[M * N], wc[M * N], wd[M * N], ba[M], bb[M], bc[M], bd[M];
  float gw[M * N], gb[M];
  double v = -1;
  uint64_t seed = 7;
  int i, step;

  for (i = 0; i < M * N; ++i) wa[i] = wb[i] = wc[i] = wd[i] = (float)next_uniform(&seed);
  for (i = 0; i < M; ++i) ba[i] = bb[i] = bc[i] = bd[i] = (float)next_uniform(&seed);
  CHECK_OK(mdopt_comm_create_local(&comm));
  if (build(comm, options, "preset=md-muon momentum=0.8 beta1=0.7 beta2=0.9", wa, ba, gw, gb,
            &baked) != 0 ||
      build(comm, options, "preset=md-muon", wb, bb, gw, gb, &set) != 0 ||
      build(comm, options, "preset=md-muon", wc, bc, gw, gb, &later) != 0 ||
      build(comm, options, "preset=md-muon", wd, bd, gw, gb, &plain) != 0)
    return 1;

  CHECK_OK(mdopt_get_group_hparam(set, "hidden", "momentum", &v));
  CHECK(v == 0.95);
  CHECK_OK(mdopt_set_group_hparam(set, "hidden", "momentum", 0.8));
  CHECK_OK(mdopt_set_group_hparam(set, "hidden", "beta1", 0.7));
  CHECK_OK(mdopt_set_group_hparam(set, "hidden", "beta2", 0.9));
  CHECK_OK(mdopt_get_group_hparam(set, "hidden", "momentum", &v));
  CHECK(v == 0.8);
  CHECK_OK(mdopt_get_group_hparam(set, "hidden", "beta1", &v));
  CHECK(v == 0.7);
  CHECK_OK(mdopt_get_group_hparam(set, "hidden", "gain_lr", &v));
  CHECK(v > 0);

  /* Refused: nothing changes. */
  CHECK(mdopt_set_group_hparam(set, "hidden", "ns_steps", 3) == MDOPT_INVALID_ARGUMENT);
  CHECK(strstr(mdopt_last_error(), "cannot change") != NULL);
  CHECK(mdopt_set_group_hparam(set, "vectors", "momentum", 0.5) == MDOPT_INVALID_ARGUMENT);
  CHECK(strstr(mdopt_last_error(), "base=muon only") != NULL);
  CHECK(mdopt_set_group_hparam(set, "hidden", "weight_decay", 0.1) == MDOPT_INVALID_ARGUMENT);
  CHECK(strstr(mdopt_last_error(), "sphere") != NULL);
  CHECK(mdopt_set_group_hparam(set, "hidden", "beta1", 1.0) == MDOPT_INVALID_ARGUMENT);
  CHECK(mdopt_set_group_hparam(set, "hidden", "momentum", NAN) == MDOPT_INVALID_ARGUMENT);
  CHECK(mdopt_set_group_hparam(set, "hidden", "eps", 0.0) == MDOPT_INVALID_ARGUMENT);
  CHECK(mdopt_set_group_hparam(set, "nope", "beta1", 0.5) == MDOPT_INVALID_ARGUMENT);
  CHECK(strstr(mdopt_last_error(), "'nope'") != NULL);
  CHECK(mdopt_set_group_hparam(NULL, "hidden", "beta1", 0.5) == MDOPT_INVALID_ARGUMENT);
  CHECK(mdopt_set_group_hparam(set, NULL, "beta1", 0.5) == MDOPT_INVALID_ARGUMENT);
  CHECK(mdopt_set_group_hparam(set, "hidden", NULL, 0.5) == MDOPT_INVALID_ARGUMENT);
  CHECK(mdopt_get_group_hparam(set, "hidden", "ns_steps", &v) == MDOPT_INVALID_ARGUMENT);
  CHECK(mdopt_get_group_hparam(set, "hidden", "beta1", NULL) == MDOPT_INVALID_ARGUMENT);
  CHECK_OK(mdopt_get_group_hparam(set, "hidden", "momentum", &v));
  CHECK(v == 0.8);
  CHECK_OK(mdopt_get_group_hparam(set, "hidden", "beta1", &v));
  CHECK(v == 0.7);
  /* lr through the same call moves gain_lr as mdopt_set_group_lr does. */
  CHECK_OK(mdopt_set_group_hparam(plain, "vectors", "lr", 2e-3));
  CHECK_OK(mdopt_get_group_hparam(plain, "vectors", "lr", &v));
  CHECK(v == 2e-3);
  CHECK_OK(mdopt_set_group_hparam(plain, "vectors", "lr", 1e-3));
  CHECK_OK(mdopt_set_group_hparam(later, "vectors", "lr", 1e-3));

  for (step = 0; step < STEPS; ++step) {
    for (i = 0; i < M * N; ++i) gw[i] = (float)next_uniform(&seed);
    for (i = 0; i < M; ++i) gb[i] = (float)next_uniform(&seed);
    if (step == 2) {
      CHECK(memcmp(wc, wd, sizeof wc) == 0 && memcmp(bc, bd, sizeof bc) == 0);
      CHECK_OK(mdopt_set_group_hparam(later, "hidden", "momentum", 0.5));
      CHECK_OK(mdopt_set_group_hparam(later, "vectors", "beta1", 0.5));
    }
    CHECK_OK(mdopt_step(baked, 1.0, NULL, NULL));
    CHECK_OK(mdopt_step(set, 1.0, NULL, NULL));
    CHECK_OK(mdopt_step(later, 1.0, NULL, NULL));
    CHECK_OK(mdopt_step(plain, 1.0, NULL, NULL));
  }
  CHECK(memcmp(wa, wb, sizeof wa) == 0 && memcmp(ba, bb, sizeof ba) == 0);
  CHECK(memcmp(wa, wd, sizeof wa) != 0);  /* the values made a difference */
  CHECK(memcmp(wc, wd, sizeof wc) != 0 && memcmp(bc, bd, sizeof bc) != 0);

  CHECK_OK(mdopt_destroy(baked));
  CHECK_OK(mdopt_destroy(set));
  CHECK_OK(mdopt_destroy(later));
  CHECK_OK(mdopt_destroy(plain));
  CHECK_OK(mdopt_comm_destroy(comm));
  return 0;
}

int main(void) {
  if (run("threads=1") != 0 || run("threads=1 kernels=reference") != 0 || g_failures != 0) {
    fprintf(stderr, "c_abi_group_hparam: FAILED (%d checks)\n", g_failures);
    return 1;
  }
  printf("c_abi_group_hparam: ok\n");
  return 0;
}
