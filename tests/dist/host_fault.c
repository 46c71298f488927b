/* One rank of tests/dist/host_fault_test.sh: mdopt across "hosts" (network namespaces joined
 * over TCP), a host lost mid-step, and a restart at the smaller world size.
 *
 *   host_fault train  DIR STEPS FAULT_STEP VICTIM TIMEOUT_S
 *   host_fault resume DIR STEPS
 *
 * train: every rank steps an optimizer (md-muon matrices and an md-adamw vector, comm_timeout_s
 * = TIMEOUT_S) with gradients that depend on the step only (grads=reduced: the same on every
 * rank, at any world size), and checkpoints into DIR/ckpt after every step (DIR/ckpt-step
 * names the last step saved). At FAULT_STEP rank VICTIM writes DIR/victim-ready and waits for
 * DIR/go before stepping; the others enter the step and wait on it, and the test script cuts
 * the victim host's link or kills its processes meanwhile. A rank whose step fails writes
 * DIR/result-RANK: "rank R step S status NAME elapsed SECONDS end EPOCH_SECONDS" (the step's
 * duration, and when it returned by the wall clock the script's fault time is taken on), then
 * ends at once: _exit, not MPI_Finalize, which would wait for the lost host.
 *
 * resume: loads DIR/ckpt at the world size it runs at, takes the steps after DIR/ckpt-step up
 * to STEPS, and on rank 0 compares the weights with an uninterrupted run of STEPS steps on one
 * rank (a local communicator, the same gradients); writes DIR/resume-result: "from S to T
 * ranks N rel_err E moved M" (M: how far the resumed steps moved the weights) and exits 1 if E exceeds the sharded tolerance (5e-6, docs/ARCHITECTURE.md). */
#define _POSIX_C_SOURCE 200809L
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "mdopt/mdopt.h"
#include "../c_abi/c_check.h"

enum { TENSORS = 3 };
static const int64_t kRows[TENSORS] = {48, 37, 29};
static const int64_t kCols[TENSORS] = {32, 21, 0}; /* 0: a 1-D vector (md-adamw) */
static const double kTolerance = 5e-6;

typedef struct {
  float* w[TENSORS];
  float* g[TENSORS];
  mdopt_optimizer* opt;
} model;

static int64_t numel(int i) { return kRows[i] * (kCols[i] > 0 ? kCols[i] : 1); }

static double wall(void) {
  struct timespec t;
  clock_gettime(CLOCK_REALTIME, &t);
  return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}
static double mono(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

/* A uniform draw in [-0.5, 0.5) from (tensor, element, step): splitmix64 of the three, so
 * any rank at any world size computes the same gradient for a step. */
static float draw(uint64_t a, uint64_t b, uint64_t c) {
  uint64_t z = a * 0x9E3779B97F4A7C15ull ^ b * 0xBF58476D1CE4E5B9ull ^ c * 0x94D049BB133111EBull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  return (float)((double)(z >> 11) * (1.0 / 9007199254740992.0)) - 0.5f;
}

static void set_grads(model* m, int step) {
  for (int i = 0; i < TENSORS; ++i)
    for (int64_t k = 0; k < numel(i); ++k) m->g[i][k] = 0.02f * draw((uint64_t)i + 1, (uint64_t)k, (uint64_t)step);
}

static int make(mdopt_comm* comm, const char* options, model* m) {
  CHECK_OK(mdopt_create(comm, options, &m->opt));
  CHECK_OK(mdopt_add_group(m->opt, "matrices", "preset=md-muon"));
  CHECK_OK(mdopt_add_group(m->opt, "vectors", "preset=md-adamw"));
  for (int i = 0; i < TENSORS; ++i) {
    m->w[i] = malloc(sizeof(float) * (size_t)numel(i));
    m->g[i] = malloc(sizeof(float) * (size_t)numel(i));
    if (m->w[i] == NULL || m->g[i] == NULL) return 1;
    for (int64_t k = 0; k < numel(i); ++k) m->w[i][k] = draw(100 + (uint64_t)i, (uint64_t)k, 0) / sqrtf((float)kRows[i]);
    char name[16];  /* room for any int: -Wformat-truncation in optimised builds */
    snprintf(name, sizeof name, "w%d", i);
    mdopt_param_desc d = MDOPT_PARAM_DESC_INIT;
    d.name = name;
    d.group = kCols[i] > 0 ? "matrices" : "vectors";
    d.ndim = kCols[i] > 0 ? 2 : 1;
    d.shape[0] = kRows[i];
    d.shape[1] = kCols[i];
    d.param_dtype = d.grad_dtype = MDOPT_DTYPE_F32;
    d.param = m->w[i];
    d.grad = m->g[i];
    CHECK_OK(mdopt_add_param(m->opt, &d, NULL));
  }
  CHECK_OK(mdopt_finalize(m->opt));
  return 0;
}

static void path(char* out, size_t n, const char* dir, const char* name) {
  snprintf(out, n, "%s/%s", dir, name);
}

/* Written whole under a temporary name, then renamed: a reader never sees half a line. */
static void write_file(const char* dir, const char* name, const char* text) {
  char tmp[512], dst[512];
  snprintf(tmp, sizeof tmp, "%s/.%s.tmp", dir, name);
  path(dst, sizeof dst, dir, name);
  FILE* f = fopen(tmp, "w");
  if (f == NULL) return;
  fputs(text, f);
  fflush(f);
  fsync(fileno(f));
  fclose(f);
  rename(tmp, dst);
}

static int exists(const char* dir, const char* name) {
  char p[512];
  path(p, sizeof p, dir, name);
  return access(p, F_OK) == 0;
}

static int train(int argc, char** argv) {
  if (argc != 7) return 2;
  const char* dir = argv[2];
  const int steps = atoi(argv[3]), fault_step = atoi(argv[4]), victim = atoi(argv[5]);
  const double timeout = atof(argv[6]);
  mdopt_comm* comm = NULL;
  CHECK_OK(mdopt_comm_create_mpi(NULL, &comm));
  int rank = 0, size = 0;
  CHECK_OK(mdopt_comm_rank(comm, &rank));
  CHECK_OK(mdopt_comm_size(comm, &size));
  char options[160];
  snprintf(options, sizeof options, "threads=1 grads=reduced bucket_mb=0.002 comm_timeout_s=%g", timeout);
  static model m;
  if (make(comm, options, &m) != 0) return 1;
  char ckpt[512];
  path(ckpt, sizeof ckpt, dir, "ckpt");
  for (int step = 1; step <= steps; ++step) {
    set_grads(&m, step);
    if (step == fault_step && rank == victim) {
      char pid[32];
      snprintf(pid, sizeof pid, "%ld\n", (long)getpid());
      write_file(dir, "victim-ready", pid);
      const double give_up = mono() + 60.0;
      const struct timespec tick = {0, 10 * 1000 * 1000};
      while (!exists(dir, "go") && mono() < give_up) nanosleep(&tick, NULL);
    }
    const double t0 = mono();
    const mdopt_status s = mdopt_step(m.opt, 1.0, NULL, NULL);
    const double elapsed = mono() - t0;
    if (s != MDOPT_SUCCESS) {
      char line[1024], name[32];
      snprintf(line, sizeof line, "rank %d step %d status %s elapsed %.3f end %.6f\n", rank, step,
               mdopt_status_string(s), elapsed, wall());
      snprintf(name, sizeof name, "result-%d", rank);
      write_file(dir, name, line);
      fprintf(stderr, "host_fault: %s  (%s)\n", strtok(line, "\n"), mdopt_last_error());
      _exit(0);
    }
    CHECK_OK(mdopt_save(m.opt, ckpt));
    if (rank == 0) {
      char text[32];
      snprintf(text, sizeof text, "%d\n", step);
      write_file(dir, "ckpt-step", text);
    }
  }
  fprintf(stderr, "host_fault: rank %d of %d finished %d steps without a failure\n", rank, size, steps);
  _exit(0);
}

static double rel_max_error(const model* a, const model* b) {
  double diff = 0.0, ref = 0.0;
  for (int i = 0; i < TENSORS; ++i)
    for (int64_t k = 0; k < numel(i); ++k) {
      const double d = fabs((double)a->w[i][k] - (double)b->w[i][k]);
      diff = d > diff ? d : diff;
      const double r = fabs((double)b->w[i][k]);
      ref = r > ref ? r : ref;
    }
  return ref > 0.0 ? diff / ref : diff;
}

static int resume(int argc, char** argv) {
  if (argc != 4) return 2;
  const char* dir = argv[2];
  const int steps = atoi(argv[3]);
  char p[512];
  path(p, sizeof p, dir, "ckpt-step");
  FILE* f = fopen(p, "r");
  int from = 0;
  CHECK(f != NULL && fscanf(f, "%d", &from) == 1);
  if (f != NULL) fclose(f);
  mdopt_comm* comm = NULL;
  CHECK_OK(mdopt_comm_create_mpi(NULL, &comm));
  int rank = 0, size = 0;
  CHECK_OK(mdopt_comm_rank(comm, &rank));
  CHECK_OK(mdopt_comm_size(comm, &size));
  static model m, straight;
  if (make(comm, "threads=1 grads=reduced bucket_mb=0.002 comm_timeout_s=30", &m) != 0) return 1;
  path(p, sizeof p, dir, "ckpt");
  CHECK_OK(mdopt_load(m.opt, p));
  static model loaded; /* the weights as the checkpoint restored them */
  for (int i = 0; i < TENSORS; ++i) {
    loaded.w[i] = malloc(sizeof(float) * (size_t)numel(i));
    if (loaded.w[i] == NULL) return 1;
    memcpy(loaded.w[i], m.w[i], sizeof(float) * (size_t)numel(i));
  }
  for (int step = from + 1; step <= steps; ++step) {
    set_grads(&m, step);
    mdopt_step_info info = MDOPT_STEP_INFO_INIT;
    CHECK_OK(mdopt_step(m.opt, 1.0, NULL, &info));
    CHECK(info.step == step);
  }
  if (rank == 0) {
    mdopt_comm* local = NULL;
    CHECK_OK(mdopt_comm_create_local(&local));
    if (make(local, "threads=1", &straight) != 0) return 1;
    for (int step = 1; step <= steps; ++step) {
      set_grads(&straight, step);
      CHECK_OK(mdopt_step(straight.opt, 1.0, NULL, NULL));
    }
    const double err = rel_max_error(&m, &straight);
    /* The resumed steps moved the weights: the match is not that of an idle run. */
    const double moved = rel_max_error(&loaded, &straight);
    char line[160];
    snprintf(line, sizeof line, "from %d to %d ranks %d rel_err %.3g moved %.3g\n", from, steps, size, err, moved);
    write_file(dir, "resume-result", line);
    fprintf(stderr, "host_fault: resumed %s", line);
    CHECK(err <= kTolerance);
    CHECK(moved > 1e-3);
    CHECK(from >= 1 && from < steps);
    CHECK_OK(mdopt_destroy(straight.opt));
    CHECK_OK(mdopt_comm_destroy(local));
  }
  CHECK_OK(mdopt_destroy(m.opt));
  CHECK_OK(mdopt_comm_destroy(comm));
  return g_failures != 0;
}

int main(int argc, char** argv) {
  if (argc >= 2 && strcmp(argv[1], "train") == 0) return train(argc, argv);
  if (argc >= 2 && strcmp(argv[1], "resume") == 0) return resume(argc, argv);
  fprintf(stderr, "usage: host_fault train DIR STEPS FAULT_STEP VICTIM TIMEOUT_S | resume DIR STEPS\n");
  return 2;
}
