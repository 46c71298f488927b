/* The distributed C ABI as the README shows it, from C11 under mpirun: an MPI communicator
 * made by mdopt (MPI initialised by mdopt itself), a GPT-shaped set (embedding, per layer
 * attention and MLP matrices in md-muon, norm gains in a vector group), local gradients that
 * differ per rank reported ready during a backward that runs from the last parameter to the
 * first, and 5 steps. Checks: every step taken, bytes were sent, exposed communication is at
 * most the wall time, and every rank ends with bitwise the same weights (compared through a
 * second MPI communicator of the program's own). Prints "c_abi_sharded: ok" on success. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <mpi.h>

#include "mdopt/mdopt.h"
#include "../c_abi/c_check.h"

enum { D = 64, LAYERS = 2, VOCAB = 256, MAX_PARAMS = 32, STEPS = 5 };

typedef struct {
  char name[64];
  const char* group;
  int ndim;
  int64_t shape[2];
  int64_t numel;
  float* w;
  float* g;
} tensor;

static uint64_t g_seed = 88172645463325252ull;
static float uniform(void) { /* xorshift64, the same stream on every rank */
  g_seed ^= g_seed << 13;
  g_seed ^= g_seed >> 7;
  g_seed ^= g_seed << 17;
  return (float)((g_seed >> 11) * (1.0 / 9007199254740992.0)) - 0.5f;
}

static void add(tensor* t, int* n, const char* name, const char* group, int64_t rows, int64_t cols) {
  tensor* x = &t[(*n)++];
  snprintf(x->name, sizeof x->name, "%s", name);
  x->group = group;
  x->ndim = cols > 0 ? 2 : 1;
  x->shape[0] = rows;
  x->shape[1] = cols;
  x->numel = rows * (cols > 0 ? cols : 1);
  x->w = malloc(sizeof(float) * (size_t)x->numel);
  x->g = malloc(sizeof(float) * (size_t)x->numel);
  for (int64_t k = 0; k < x->numel; ++k) x->w[k] = uniform() / sqrtf((float)D);
}

int main(void) {
  mdopt_comm* comm = NULL;
  CHECK_OK(mdopt_comm_create_mpi(NULL, &comm)); /* initialises MPI: the program did not */
  int rank = 0, size = 0;
  CHECK_OK(mdopt_comm_rank(comm, &rank));
  CHECK_OK(mdopt_comm_size(comm, &size));

  mdopt_optimizer* opt = NULL;
  CHECK_OK(mdopt_create(comm, "threads=1 grads=local bucket_mb=0.05", &opt));
  CHECK_OK(mdopt_add_group(opt, "matrices", "preset=md-muon"));
  CHECK_OK(mdopt_add_group(opt, "embeddings", "preset=embedding"));
  CHECK_OK(mdopt_add_group(opt, "vectors", "preset=vector"));

  tensor t[MAX_PARAMS];
  int n = 0;
  char name[64];
  add(t, &n, "embed", "embeddings", VOCAB, D);
  for (int l = 0; l < LAYERS; ++l) {
    const char* parts[] = {"qkv", "proj", "fc1", "fc2"};
    const int64_t rows[] = {3 * D, D, 4 * D, D}, cols[] = {D, D, D, 4 * D};
    snprintf(name, sizeof name, "layers.%d.norm", l);
    add(t, &n, name, "vectors", D, 0);
    for (int k = 0; k < 4; ++k) {
      snprintf(name, sizeof name, "layers.%d.%s", l, parts[k]);
      add(t, &n, name, "matrices", rows[k], cols[k]);
    }
  }
  for (int i = 0; i < n; ++i) {
    mdopt_param_desc d = MDOPT_PARAM_DESC_INIT;
    d.name = t[i].name;
    d.group = t[i].group;
    d.ndim = t[i].ndim;
    d.shape[0] = t[i].shape[0];
    d.shape[1] = t[i].shape[1];
    d.param_dtype = MDOPT_DTYPE_F32;
    d.param = t[i].w;
    d.grad_dtype = MDOPT_DTYPE_F32;
    d.grad = t[i].g;
    CHECK_OK(mdopt_add_param(opt, &d, NULL));
  }
  CHECK_OK(mdopt_finalize(opt));
  { /* The plan for programs names the world and one slot per matrix. */
    size_t needed = 0;
    CHECK_OK(mdopt_plan_json(opt, NULL, 0, &needed));
    char* plan = malloc(needed);
    CHECK(plan != NULL);
    CHECK_OK(mdopt_plan_json(opt, plan, needed, NULL));
    char world[32];
    snprintf(world, sizeof world, "\"world\":%d", size);
    CHECK(strstr(plan, world) != NULL);
    int slots = 0;
    for (const char* p = plan; (p = strstr(p, "\"block_rows\"")) != NULL; ++p) ++slots;
    CHECK(slots == n);
    free(plan);
  }

  int64_t sent = 0;
  for (int step = 1; step <= STEPS; ++step) {
    /* "Backward": the last parameter's gradient is final first. */
    for (int i = n - 1; i >= 0; --i) {
      for (int64_t k = 0; k < t[i].numel; ++k) t[i].g[k] = 0.01f * uniform() + 0.001f * (float)rank;
      CHECK_OK(mdopt_grads_ready(opt, i, 1, NULL));
    }
    mdopt_step_info info = MDOPT_STEP_INFO_INIT;
    CHECK_OK(mdopt_step(opt, 1.0 - 0.1 * step, NULL, &info));
    CHECK(info.step == step && info.skipped == 0);
    CHECK(info.exposed_comm_seconds <= info.seconds + 1e-6);
    sent += info.bytes_sent;
  }
  CHECK(size == 1 ? sent == 0 : sent > 0);

  /* Every rank holds the same weights, bit for bit. */
  MPI_Comm mine;
  MPI_Comm_dup(MPI_COMM_WORLD, &mine);
  for (int i = 0; i < n; ++i) {
    uint64_t h = 1469598103934665603ull;
    const unsigned char* b = (const unsigned char*)t[i].w;
    for (size_t k = 0; k < sizeof(float) * (size_t)t[i].numel; ++k) h = (h ^ b[k]) * 1099511628211ull;
    uint64_t lo = 0, hi = 0;
    MPI_Allreduce(&h, &lo, 1, MPI_UINT64_T, MPI_MIN, mine);
    MPI_Allreduce(&h, &hi, 1, MPI_UINT64_T, MPI_MAX, mine);
    CHECK(lo == hi);
  }
  MPI_Comm_free(&mine);

  CHECK_OK(mdopt_destroy(opt));
  CHECK_OK(mdopt_comm_destroy(comm));
  for (int i = 0; i < n; ++i) {
    free(t[i].w);
    free(t[i].g);
  }
  if (g_failures == 0 && rank == 0) {
    printf("c_abi_sharded: ok (%d ranks, %d params, %lld bytes sent by rank 0)\n", size, n, (long long)sent);
  }
  return g_failures != 0;
}
