/* The C ABI from a C11 program: a local communicator, an optimizer with an md-muon group and
 * a vector group, a 2-D f32 matrix and a 1-D bf16 vector, three steps with fixed gradients,
 * a checkpoint saved to (and loaded from) a temporary directory, and clean-up. Exits 0 and
 * prints "c_abi_smoke: ok" only if every call and check passed. */
#define _POSIX_C_SOURCE 200809L /* mkdtemp, opendir, rmdir */

/* Each public header on its own, leaf headers first; the umbrella last. */
#include "mdopt/export.h"
#include "mdopt/status.h"
#include "mdopt/comm.h"
#include "mdopt/optimizer.h"
#include "mdopt/mdopt.h"
#include "c_check.h"
/* The project's one bf16 rounding (plain C), which optimizer.h promises: nearest even. */
#include "kernels/common/bf16.h"

#include <dirent.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

enum { M = 8, N = 6, V = 5, STEPS = 3 };

/* Removes dir and the plain files in it (a checkpoint holds nothing else). */
static int remove_dir(const char* dir) {
  char path[4096];
  DIR* d = opendir(dir);
  struct dirent* e;
  if (d == NULL) return -1;
  while ((e = readdir(d)) != NULL) {
    if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0) continue;
    if (snprintf(path, sizeof path, "%s/%s", dir, e->d_name) >= (int)sizeof path ||
        remove(path) != 0) {
      closedir(d);
      return -1;
    }
  }
  closedir(d);
  return rmdir(dir);
}

static int run(const char* tmp_root) {
  mdopt_comm* comm = NULL;
  mdopt_optimizer* opt = NULL;
  mdopt_param_desc desc = MDOPT_PARAM_DESC_INIT;
  mdopt_step_info info = MDOPT_STEP_INFO_INIT;
  float w[M * N], w0[M * N], gw[M * N];
  uint16_t v[V], v0[V], gv[V];
  double dir_state[M * N], master_v0[V], master_v[V];
  int64_t index = -1, count = 0;
  int rank = -1, size = -1, step, i, changed;
  double norm = 0.0;
  char tmp[4096], ckpt[4200], manifest[4300];
  FILE* f;

  CHECK(mdopt_abi_version() == MDOPT_ABI_VERSION);
  CHECK(mdopt_version_string() != NULL && strlen(mdopt_version_string()) > 0);
  CHECK(mdopt_runtime_info() != NULL && strstr(mdopt_runtime_info(), "abi=") != NULL &&
        strstr(mdopt_runtime_info(), " blas=") != NULL && strstr(mdopt_runtime_info(), " isa=") != NULL);
  printf("c_abi_smoke: %s\n", mdopt_runtime_info());
  CHECK(strcmp(mdopt_status_string(MDOPT_INVALID_STATE), "MDOPT_INVALID_STATE") == 0);
  /* status.h: never NULL, even for a value outside the enum (legal to pass from C). */
  CHECK(mdopt_status_string((mdopt_status)42) != NULL);

  CHECK_OK(mdopt_comm_create_local(&comm));
  CHECK_OK(mdopt_comm_rank(comm, &rank));
  CHECK_OK(mdopt_comm_size(comm, &size));
  CHECK(rank == 0 && size == 1);

  CHECK_OK(mdopt_create(comm, "device=cpu threads=1", &opt));
  CHECK_OK(mdopt_add_group(opt, "matrices", "preset=md-muon"));
  CHECK_OK(mdopt_add_group(opt, "vectors", "preset=vector"));
  /* A refused call from C: a status and a message, nothing thrown. */
  CHECK(mdopt_add_group(opt, "broken", "preset=md-muon lr=fast") == MDOPT_INVALID_ARGUMENT);
  CHECK(strstr(mdopt_last_error(), "'lr'") != NULL);

  for (i = 0; i < M * N; ++i) {
    w[i] = sinf(0.37f * (float)i + 0.1f) / sqrtf((float)N);
    gw[i] = 0.01f * cosf(1.3f * (float)i);
  }
  /* Small values, so that bf16's spacing (about 1e-4 here) shows three Adam steps of 1e-3. */
  for (i = 0; i < V; ++i) {
    v[i] = FloatToBf16(0.02f + 0.01f * (float)i);
    gv[i] = FloatToBf16(0.05f * (float)i - 0.07f);
  }

  desc = mdopt_param_desc_init();
  desc.name = "w";
  desc.group = "matrices";
  desc.ndim = 2;
  desc.shape[0] = M;
  desc.shape[1] = N;
  desc.param_dtype = MDOPT_DTYPE_F32;
  desc.param = w;
  desc.grad_dtype = MDOPT_DTYPE_F32;
  desc.grad = gw;
  CHECK_OK(mdopt_add_param(opt, &desc, &index));
  CHECK(index == 0);

  desc = mdopt_param_desc_init();
  desc.name = "v";
  desc.group = "vectors";
  desc.ndim = 1;
  desc.shape[0] = V;
  desc.param_dtype = MDOPT_DTYPE_BF16;
  desc.param = v;
  desc.grad_dtype = MDOPT_DTYPE_BF16;
  desc.grad = gv;
  CHECK_OK(mdopt_add_param(opt, &desc, &index));
  CHECK(index == 1);

  CHECK_OK(mdopt_finalize(opt));
  memcpy(w0, w, sizeof w);
  memcpy(v0, v, sizeof v);
  CHECK_OK(mdopt_get_state(opt, 1, "master", master_v0, V, NULL));

  for (step = 1; step <= STEPS; ++step) {
    info = mdopt_step_info_init();
    CHECK_OK(mdopt_step(opt, 1.0, NULL, &info));
    CHECK(info.step == step);
    CHECK(info.skipped == 0);
    CHECK(isfinite(info.grad_norm) && info.grad_norm > 0.0);
    CHECK(info.seconds >= 0.0);
  }

  changed = 0;
  for (i = 0; i < M * N; ++i) {
    CHECK(isfinite(w[i]));
    changed += w[i] != w0[i];
  }
  CHECK(changed >= M * N / 2); /* a Muon update is dense */
  changed = 0;
  CHECK_OK(mdopt_get_state(opt, 1, "master", master_v, V, NULL));
  for (i = 0; i < V; ++i) {
    CHECK(isfinite(Bf16ToFloat(v[i])));
    CHECK(master_v[i] != master_v0[i]);
    /* The model's bf16 copy is the master rounded to nearest even. */
    CHECK(v[i] == FloatToBf16((float)master_v[i]));
    changed += v[i] != v0[i];
  }
  CHECK(changed > 0);

  /* The direction stays on its sphere: radius=auto is sqrt(max(m, n)) for frobenius. */
  CHECK_OK(mdopt_get_state(opt, 0, "direction", NULL, 0, &count));
  CHECK(count == M * N);
  CHECK_OK(mdopt_get_state(opt, 0, "direction", dir_state, M * N, NULL));
  for (i = 0; i < M * N; ++i) norm += dir_state[i] * dir_state[i];
  CHECK(fabs(sqrt(norm) - sqrt((double)M)) < 1e-4);

  if (snprintf(tmp, sizeof tmp, "%s/mdopt_c_abi_XXXXXX", tmp_root) >= (int)sizeof tmp ||
      mkdtemp(tmp) == NULL) {
    fprintf(stderr, "mkdtemp(%s) failed\n", tmp);
    return 1;
  }
  /* tmp is shorter than 4096 bytes, so neither can be truncated. */
  CHECK(snprintf(ckpt, sizeof ckpt, "%s/ckpt", tmp) < (int)sizeof ckpt);
  CHECK_OK(mdopt_save(opt, ckpt));
  CHECK(snprintf(manifest, sizeof manifest, "%s/manifest.json", ckpt) < (int)sizeof manifest);
  f = fopen(manifest, "r");
  CHECK(f != NULL);
  if (f != NULL) fclose(f);
  /* Loading what was just saved restores the same weights. */
  memcpy(w0, w, sizeof w);
  CHECK_OK(mdopt_load(opt, ckpt));
  CHECK(memcmp(w0, w, sizeof w) == 0);
  CHECK(remove_dir(ckpt) == 0);
  CHECK(rmdir(tmp) == 0);

  CHECK_OK(mdopt_destroy(opt));
  CHECK_OK(mdopt_comm_destroy(comm));
  return g_failures == 0 ? 0 : 1;
}

int main(void) {
  const char* tmp_root = getenv("TMPDIR");
  int rc;
  if (tmp_root == NULL || tmp_root[0] == '\0') tmp_root = "/tmp";
  rc = run(tmp_root);
  if (rc == 0) printf("c_abi_smoke: ok\n");
  return rc;
}
