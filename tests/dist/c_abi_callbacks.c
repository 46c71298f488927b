/* mdopt_comm_create_callbacks from C11: two threads of one process are two ranks whose
 * collectives are callbacks over shared memory (a barrier-stepped exchange for the
 * collectives, mailboxes for point-to-point). Reduce-scatters and all-gathers are left
 * pending and land in the caller's buffers only inside wait, so a result read before its
 * wait would show. The sharded optimizer (a GPT-shaped set: embedding, attention and MLP
 * matrices in md-muon with the rows layout, whose Newton-Schulz gather and scatter are
 * point-to-point, and again with the owner layout; norm gains in a vector group) takes 10
 * steps at 2 ranks from gradients that differ per rank, reported ready during a backward.
 * Checks: every rank's weights equal one rank's (a local communicator fed the mean
 * gradient) within 5e-6 relative (the tolerance of the sharded step tests), both ranks hold
 * bitwise the same weights, bytes were sent; a failing callback is MDOPT_COMM_ERROR with its
 * message and breaks the communicator; refused arguments. Prints "c_abi_callbacks: ok". */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "mdopt/mdopt.h"
#include "../c_abi/c_check.h"

enum { RANKS = 2, D = 32, LAYERS = 2, VOCAB = 96, MAX_PARAMS = 16, STEPS = 10 };
static const double kTolerance = 5e-6;

/* ---- The fabric: RANKS threads, a generation barrier, posted pointers, mailboxes. ---- */

typedef struct message {
  int src, dst, tag;
  size_t bytes;
  struct message* next;
  unsigned char data[];
} message;

static struct {
  pthread_mutex_t mu;
  pthread_cond_t cv;
  int arrived;
  unsigned long generation;
  const void* posted[RANKS]; /* each rank's send buffer for the current collective */
  message* mail;             /* point-to-point messages not yet received, oldest first */
} g_fabric = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0, 0, {NULL}, NULL};

static void fabric_barrier(void) {
  pthread_mutex_lock(&g_fabric.mu);
  const unsigned long gen = g_fabric.generation;
  if (++g_fabric.arrived == RANKS) {
    g_fabric.arrived = 0;
    ++g_fabric.generation;
    pthread_cond_broadcast(&g_fabric.cv);
  } else {
    while (gen == g_fabric.generation) pthread_cond_wait(&g_fabric.cv, &g_fabric.mu);
  }
  pthread_mutex_unlock(&g_fabric.mu);
}

typedef struct {
  int rank;
  int fail_after; /* >= 0: the call after this many collectives fails (the failure test) */
  int calls;
  int aborted;
  char error[128];
} rank_ctx;

/* A collective finished at start whose result reaches recv only in wait. */
typedef struct {
  void* dst;
  size_t bytes;
  unsigned char data[];
} parked;

static size_t esize(int32_t dtype) {
  switch (dtype) {
    case MDOPT_COMM_DTYPE_F32: return 4;
    case MDOPT_COMM_DTYPE_BF16: return 2;
    case MDOPT_COMM_DTYPE_F64: return 8;
    default: return 1;
  }
}

/* memcpy without its undefined behaviour for empty buffers (a rank may own no rows: NULL). */
static void copy(void* dst, const void* src, size_t bytes) {
  if (bytes > 0) memcpy(dst, src, bytes);
}

static double load(const void* p, int32_t dtype, int64_t i) {
  if (dtype == MDOPT_COMM_DTYPE_F32) return ((const float*)p)[i];
  if (dtype == MDOPT_COMM_DTYPE_F64) return ((const double*)p)[i];
  uint32_t u = (uint32_t)((const uint16_t*)p)[i] << 16; /* bf16 */
  float f;
  memcpy(&f, &u, 4);
  return f;
}

static void store(void* p, int32_t dtype, int64_t i, double v) {
  if (dtype == MDOPT_COMM_DTYPE_F32) {
    ((float*)p)[i] = (float)v;
  } else if (dtype == MDOPT_COMM_DTYPE_F64) {
    ((double*)p)[i] = v;
  } else { /* bf16, round to nearest even */
    float f = (float)v;
    uint32_t u;
    memcpy(&u, &f, 4);
    u += 0x7fffu + ((u >> 16) & 1u);
    ((uint16_t*)p)[i] = (uint16_t)(u >> 16);
  }
}

static mdopt_status fail_check(rank_ctx* c, const char* what) {
  if (c->fail_after >= 0 && c->calls++ >= c->fail_after) {
    snprintf(c->error, sizeof c->error, "fake transport: %s refused on rank %d", what, c->rank);
    return MDOPT_COMM_ERROR;
  }
  return MDOPT_SUCCESS;
}

/* Sums segment [off, off + n) of every rank's posted buffer, in rank order, into out. */
static void sum_posted(int64_t off, int64_t n, int32_t dtype, void* out) {
  for (int64_t i = 0; i < n; ++i) {
    double s = 0.0;
    for (int r = 0; r < RANKS; ++r) s += load(g_fabric.posted[r], dtype, off + i);
    /* f32: the sum of two floats in double, rounded once, is the float sum. */
    store(out, dtype, i, s);
  }
}

static mdopt_status cb_all_reduce(void* user, const void* send, void* recv, int64_t count,
                                  int32_t dtype, void** pending) {
  rank_ctx* c = user;
  (void)pending;
  if (fail_check(c, "all-reduce")) return MDOPT_COMM_ERROR;
  void* tmp = malloc((size_t)count * esize(dtype) + 1);
  g_fabric.posted[c->rank] = send;
  fabric_barrier();
  sum_posted(0, count, dtype, tmp);
  fabric_barrier(); /* everyone has read every send (send may be recv) */
  copy(recv, tmp, (size_t)count * esize(dtype));
  free(tmp);
  return MDOPT_SUCCESS;
}

static mdopt_status cb_reduce_scatter(void* user, const void* send, void* recv,
                                      const int64_t* counts, int32_t dtype, void** pending) {
  rank_ctx* c = user;
  if (fail_check(c, "reduce-scatter")) return MDOPT_COMM_ERROR;
  int64_t off = 0;
  for (int r = 0; r < c->rank; ++r) off += counts[r];
  const size_t bytes = (size_t)counts[c->rank] * esize(dtype);
  parked* p = malloc(sizeof(parked) + bytes + 1);
  p->dst = recv;
  p->bytes = bytes;
  g_fabric.posted[c->rank] = send;
  fabric_barrier();
  sum_posted(off, counts[c->rank], dtype, p->data);
  fabric_barrier();
  *pending = p;
  return MDOPT_SUCCESS;
}

static mdopt_status cb_all_gather(void* user, const void* send, void* recv, const int64_t* counts,
                                  int32_t dtype, void** pending) {
  rank_ctx* c = user;
  if (fail_check(c, "all-gather")) return MDOPT_COMM_ERROR;
  int64_t total = 0;
  for (int r = 0; r < RANKS; ++r) total += counts[r];
  const size_t es = esize(dtype);
  parked* p = malloc(sizeof(parked) + (size_t)total * es + 1);
  p->dst = recv;
  p->bytes = (size_t)total * es;
  g_fabric.posted[c->rank] = send;
  fabric_barrier();
  int64_t off = 0;
  for (int r = 0; r < RANKS; ++r) {
    copy(p->data + off * es, g_fabric.posted[r], (size_t)counts[r] * es);
    off += counts[r];
  }
  fabric_barrier();
  *pending = p;
  return MDOPT_SUCCESS;
}

static mdopt_status cb_broadcast(void* user, void* data, int64_t count, int32_t dtype, int32_t root,
                                 void** pending) {
  rank_ctx* c = user;
  (void)pending;
  if (fail_check(c, "broadcast")) return MDOPT_COMM_ERROR;
  g_fabric.posted[c->rank] = data;
  fabric_barrier();
  if (c->rank != root) copy(data, g_fabric.posted[root], (size_t)count * esize(dtype));
  fabric_barrier();
  return MDOPT_SUCCESS;
}

/* Sends are eager (copied into a mailbox), receives block until their message is there:
 * messages from one source with one tag arrive in order. */
static mdopt_status cb_send_recv(void* user, const mdopt_comm_p2p* ops, int64_t n, int32_t tag,
                                 void** pending) {
  rank_ctx* c = user;
  (void)pending;
  pthread_mutex_lock(&g_fabric.mu);
  for (int64_t k = 0; k < n; ++k) {
    if (!ops[k].is_send) continue;
    const size_t bytes = (size_t)ops[k].count * esize(ops[k].dtype);
    message* m = malloc(sizeof(message) + bytes + 1);
    m->src = c->rank;
    m->dst = ops[k].peer;
    m->tag = tag;
    m->bytes = bytes;
    m->next = NULL;
    copy(m->data, ops[k].data, bytes);
    message** tail = &g_fabric.mail;
    while (*tail != NULL) tail = &(*tail)->next;
    *tail = m;
  }
  pthread_cond_broadcast(&g_fabric.cv);
  for (int64_t k = 0; k < n; ++k) {
    if (ops[k].is_send) continue;
    for (;;) {
      message** at = &g_fabric.mail;
      while (*at != NULL && !((*at)->src == ops[k].peer && (*at)->dst == c->rank && (*at)->tag == tag)) {
        at = &(*at)->next;
      }
      if (*at != NULL) {
        message* m = *at;
        *at = m->next;
        const size_t want = (size_t)ops[k].count * esize(ops[k].dtype);
        copy(ops[k].data, m->data, m->bytes < want ? m->bytes : want);
        const int ok = m->bytes == want;
        free(m);
        if (!ok) {
          pthread_mutex_unlock(&g_fabric.mu);
          snprintf(c->error, sizeof c->error, "fake transport: message size mismatch");
          return MDOPT_COMM_ERROR;
        }
        break;
      }
      pthread_cond_wait(&g_fabric.cv, &g_fabric.mu);
    }
  }
  pthread_mutex_unlock(&g_fabric.mu);
  return MDOPT_SUCCESS;
}

static mdopt_status cb_wait(void* user, void* pending, double timeout_s) {
  (void)user;
  (void)timeout_s;
  parked* p = pending;
  copy(p->dst, p->data, p->bytes);
  free(p);
  return MDOPT_SUCCESS;
}

static void cb_abort(void* user, const char* reason) {
  (void)reason;
  ((rank_ctx*)user)->aborted = 1;
}

static void cb_error_message(void* user, char* buf, size_t size) {
  snprintf(buf, size, "%s", ((rank_ctx*)user)->error);
}

static mdopt_comm_callbacks callbacks(rank_ctx* c) {
  mdopt_comm_callbacks cb = MDOPT_COMM_CALLBACKS_INIT;
  cb.rank = c->rank;
  cb.size = RANKS;
  cb.user = c;
  cb.all_reduce = cb_all_reduce;
  cb.reduce_scatter = cb_reduce_scatter;
  cb.all_gather = cb_all_gather;
  cb.broadcast = cb_broadcast;
  cb.send_recv = cb_send_recv;
  cb.wait = cb_wait;
  cb.abort = cb_abort;
  cb.error_message = cb_error_message;
  return cb;
}

/* ---- The model and its gradients. ---- */

typedef struct {
  char name[32];
  const char* group;
  int ndim;
  int64_t shape[2];
  int64_t numel;
} tensor_desc;

static tensor_desc g_t[MAX_PARAMS];
static int g_n = 0;

static void add(const char* name, const char* group, int64_t rows, int64_t cols) {
  tensor_desc* x = &g_t[g_n++];
  snprintf(x->name, sizeof x->name, "%s", name);
  x->group = group;
  x->ndim = cols > 0 ? 2 : 1;
  x->shape[0] = rows;
  x->shape[1] = cols;
  x->numel = rows * (cols > 0 ? cols : 1);
}

static void build_model(void) {
  char name[32];
  add("embed", "embeddings", VOCAB, D);
  for (int l = 0; l < LAYERS; ++l) {
    const char* parts[] = {"qkv", "proj", "fc1", "fc2"};
    const int64_t rows[] = {3 * D, D, 4 * D + 3, D}, cols[] = {D, D, D, 4 * D + 3};
    snprintf(name, sizeof name, "layers.%d.norm", l);
    add(name, "vectors", D, 0);
    for (int k = 0; k < 4; ++k) {
      snprintf(name, sizeof name, "layers.%d.%s", l, parts[k]);
      add(name, "matrices", rows[k], cols[k]);
    }
  }
}

/* A hash-based value in [-0.5, 0.5): the same on every thread for the same key. */
static float hashed(uint64_t a, uint64_t b, uint64_t c) {
  uint64_t x = a * 0x9E3779B97F4A7C15ull ^ (b + 0x632BE59BD9B4E019ull) * 0xBF58476D1CE4E5B9ull ^
               (c + 1) * 0x94D049BB133111EBull;
  x ^= x >> 31;
  x *= 0xD6E8FEB86659FD93ull;
  x ^= x >> 32;
  return (float)((x >> 11) * (1.0 / 9007199254740992.0)) - 0.5f;
}
static float weight0(int i, int64_t k) { return hashed(1, (uint64_t)i, (uint64_t)k) / sqrtf((float)D); }
/* Rank r's gradient: a shared part plus its own. */
static float grad(int step, int i, int64_t k, int r) {
  return 0.01f * hashed(2 + (uint64_t)step, (uint64_t)i, (uint64_t)k) +
         0.004f * hashed(1000 + (uint64_t)step * RANKS + (uint64_t)r, (uint64_t)i, (uint64_t)k);
}

typedef struct {
  float* w[MAX_PARAMS];
  float* g[MAX_PARAMS];
} model;

static void model_init(model* m) {
  for (int i = 0; i < g_n; ++i) {
    m->w[i] = malloc(sizeof(float) * (size_t)g_t[i].numel);
    m->g[i] = malloc(sizeof(float) * (size_t)g_t[i].numel);
    for (int64_t k = 0; k < g_t[i].numel; ++k) m->w[i][k] = weight0(i, k);
  }
}
static void model_free(model* m) {
  for (int i = 0; i < g_n; ++i) {
    free(m->w[i]);
    free(m->g[i]);
  }
}

/* rank < 0: the one-rank reference, fed the mean gradient. */
static int train(mdopt_comm* comm, const char* layout, int rank, model* m, int64_t* bytes_sent) {
  mdopt_optimizer* opt = NULL;
  char spec[96];
  snprintf(spec, sizeof spec, "preset=md-muon layout=%s", layout);
  CHECK_OK(mdopt_create(comm, "threads=1 grads=local bucket_mb=0.02", &opt));
  CHECK_OK(mdopt_add_group(opt, "matrices", spec));
  CHECK_OK(mdopt_add_group(opt, "embeddings", "preset=embedding"));
  CHECK_OK(mdopt_add_group(opt, "vectors", "preset=vector"));
  for (int i = 0; i < g_n; ++i) {
    mdopt_param_desc d = MDOPT_PARAM_DESC_INIT;
    d.name = g_t[i].name;
    d.group = g_t[i].group;
    d.ndim = g_t[i].ndim;
    d.shape[0] = g_t[i].shape[0];
    d.shape[1] = g_t[i].shape[1];
    d.param_dtype = MDOPT_DTYPE_F32;
    d.param = m->w[i];
    d.grad_dtype = MDOPT_DTYPE_F32;
    d.grad = m->g[i];
    CHECK_OK(mdopt_add_param(opt, &d, NULL));
  }
  CHECK_OK(mdopt_finalize(opt));
  *bytes_sent = 0;
  for (int step = 1; step <= STEPS; ++step) {
    for (int i = g_n - 1; i >= 0; --i) { /* backward: the last parameter first */
      for (int64_t k = 0; k < g_t[i].numel; ++k) {
        if (rank >= 0) {
          m->g[i][k] = grad(step, i, k, rank);
        } else {
          double s = 0.0;
          for (int r = 0; r < RANKS; ++r) s += grad(step, i, k, r);
          m->g[i][k] = (float)(s / RANKS);
        }
      }
      CHECK_OK(mdopt_grads_ready(opt, i, 1, NULL));
    }
    mdopt_step_info info = MDOPT_STEP_INFO_INIT;
    CHECK_OK(mdopt_step(opt, 1.0 - 0.05 * step, NULL, &info));
    if (info.step != step || info.skipped != 0) return 1;
    if (info.exposed_comm_seconds > info.seconds + 1e-6) return 1;
    *bytes_sent += info.bytes_sent;
  }
  CHECK_OK(mdopt_destroy(opt));
  return 0;
}

typedef struct {
  rank_ctx ctx;
  const char* layout;
  model m;
  int64_t sent;
  int rc;
} rank_job;

static void* rank_main(void* arg) {
  rank_job* j = arg;
  mdopt_comm_callbacks cb = callbacks(&j->ctx);
  mdopt_comm* comm = NULL;
  if (mdopt_comm_create_callbacks(&cb, &comm) != MDOPT_SUCCESS) {
    fprintf(stderr, "rank %d: %s\n", j->ctx.rank, mdopt_last_error());
    j->rc = 1;
    return NULL;
  }
  int r = -1, s = -1;
  mdopt_comm_rank(comm, &r);
  mdopt_comm_size(comm, &s);
  j->rc = (r != j->ctx.rank || s != RANKS) ? 1 : train(comm, j->layout, j->ctx.rank, &j->m, &j->sent);
  mdopt_comm_destroy(comm);
  return NULL;
}

static double rel_max_error(const float* a, const float* b, int64_t n) {
  double err = 0.0, ref = 0.0;
  for (int64_t k = 0; k < n; ++k) {
    err = fmax(err, fabs((double)a[k] - (double)b[k]));
    ref = fmax(ref, fabs((double)b[k]));
  }
  return ref > 0 ? err / ref : err;
}

/* Both ranks' transports refuse the first collective after finalize (before touching the
 * fabric, so neither waits for the other): the call that started it is MDOPT_COMM_ERROR
 * with the transport's message, the abort callback ran, and a later step fails fast as
 * broken without calling the transport. */
static void* failure_main(void* arg) {
  rank_job* j = arg;
  j->rc = 1;
  mdopt_comm_callbacks cb = callbacks(&j->ctx);
  mdopt_comm* comm = NULL;
  mdopt_optimizer* opt = NULL;
  if (mdopt_comm_create_callbacks(&cb, &comm) != MDOPT_SUCCESS) return NULL;
  if (mdopt_create(comm, "threads=1 grads=local", &opt) != MDOPT_SUCCESS) return NULL;
  mdopt_add_group(opt, "m", "preset=md-muon layout=rows");
  float w[24], g[24];
  for (int k = 0; k < 24; ++k) {
    w[k] = 0.1f * (float)(k + 1);
    g[k] = 0.01f * (float)(k % 5);
  }
  mdopt_param_desc d = MDOPT_PARAM_DESC_INIT;
  d.name = "w";
  d.group = "m";
  d.ndim = 2;
  d.shape[0] = 6;
  d.shape[1] = 4;
  d.param = w;
  d.grad = g;
  if (mdopt_add_param(opt, &d, NULL) != MDOPT_SUCCESS || mdopt_finalize(opt) != MDOPT_SUCCESS) {
    fprintf(stderr, "failure case, rank %d: %s\n", j->ctx.rank, mdopt_last_error());
    return NULL;
  }
  j->ctx.calls = 0;
  j->ctx.fail_after = 0;
  mdopt_status s = mdopt_step(opt, 1.0, NULL, NULL);
  char expect[64];
  snprintf(expect, sizeof expect, "refused on rank %d", j->ctx.rank);
  const int first_ok = s == MDOPT_COMM_ERROR && strstr(mdopt_last_error(), expect) != NULL;
  if (!first_ok) fprintf(stderr, "failure case, rank %d: %s: %s\n", j->ctx.rank, mdopt_status_string(s), mdopt_last_error());
  const int calls = j->ctx.calls;
  s = mdopt_step(opt, 1.0, NULL, NULL);
  const int second_ok = s == MDOPT_COMM_ERROR && strstr(mdopt_last_error(), "broken") != NULL &&
                        j->ctx.calls == calls;
  if (!second_ok) fprintf(stderr, "failure case, rank %d, again: %s: %s\n", j->ctx.rank, mdopt_status_string(s), mdopt_last_error());
  mdopt_destroy(opt);
  mdopt_comm_destroy(comm);
  j->rc = first_ok && second_ok && j->ctx.aborted ? 0 : 1;
  return NULL;
}

/* Refused arguments: the message names the field. */
static int refusals(void) {
  rank_ctx c = {0, -1, 0, 0, ""};
  mdopt_comm* comm = NULL;
  mdopt_comm_callbacks cb = callbacks(&c);
  cb.send_recv = NULL;
  CHECK(mdopt_comm_create_callbacks(&cb, &comm) == MDOPT_INVALID_ARGUMENT);
  CHECK(strstr(mdopt_last_error(), "send_recv") != NULL);
  cb = callbacks(&c);
  cb.rank = 2;
  CHECK(mdopt_comm_create_callbacks(&cb, &comm) == MDOPT_INVALID_ARGUMENT);
  CHECK(strstr(mdopt_last_error(), "rank = 2") != NULL);
  cb = callbacks(&c);
  cb.struct_size = 8;
  CHECK(mdopt_comm_create_callbacks(&cb, &comm) == MDOPT_INVALID_ARGUMENT);
  CHECK(strstr(mdopt_last_error(), "mdopt_comm_callbacks") != NULL);
  CHECK(mdopt_comm_create_callbacks(NULL, &comm) == MDOPT_INVALID_ARGUMENT);
  /* A v1-sized struct is accepted. */
  cb = callbacks(&c);
  cb.struct_size = MDOPT_COMM_CALLBACKS_SIZE_V1;
  CHECK_OK(mdopt_comm_create_callbacks(&cb, &comm));
  CHECK_OK(mdopt_comm_destroy(comm));
  return 0;
}

int main(void) {
  build_model();
  const char* layouts[] = {"rows", "owner"};
  for (int li = 0; li < 2; ++li) {
    model ref;
    model_init(&ref);
    mdopt_comm* local = NULL;
    CHECK_OK(mdopt_comm_create_local(&local));
    int64_t ref_sent = 0;
    if (train(local, layouts[li], -1, &ref, &ref_sent) != 0) return 1;
    CHECK_OK(mdopt_comm_destroy(local));

    rank_job jobs[RANKS];
    pthread_t th[RANKS];
    for (int r = 0; r < RANKS; ++r) {
      memset(&jobs[r], 0, sizeof jobs[r]);
      jobs[r].ctx.rank = r;
      jobs[r].ctx.fail_after = -1;
      jobs[r].layout = layouts[li];
      model_init(&jobs[r].m);
      pthread_create(&th[r], NULL, rank_main, &jobs[r]);
    }
    for (int r = 0; r < RANKS; ++r) pthread_join(th[r], NULL);
    double worst = 0.0;
    for (int r = 0; r < RANKS; ++r) {
      CHECK(jobs[r].rc == 0);
      CHECK(jobs[r].sent > 0);
      CHECK(jobs[r].ctx.aborted == 0);
      for (int i = 0; i < g_n; ++i) {
        const double e = rel_max_error(jobs[r].m.w[i], ref.w[i], g_t[i].numel);
        if (e > worst) worst = e;
        if (e > kTolerance) fprintf(stderr, "layout=%s rank %d %s: %.3g\n", layouts[li], r, g_t[i].name, e);
        CHECK(e <= kTolerance);
        CHECK(memcmp(jobs[r].m.w[i], jobs[0].m.w[i], sizeof(float) * (size_t)g_t[i].numel) == 0);
      }
    }
    printf("c_abi_callbacks: layout=%s, %d ranks vs one: worst relative error %.3g, %lld bytes sent by rank 0\n",
           layouts[li], RANKS, worst, (long long)jobs[0].sent);
    for (int r = 0; r < RANKS; ++r) model_free(&jobs[r].m);
    model_free(&ref);
  }
  {
    rank_job jobs[RANKS];
    pthread_t th[RANKS];
    for (int r = 0; r < RANKS; ++r) {
      memset(&jobs[r], 0, sizeof jobs[r]);
      jobs[r].ctx.rank = r;
      jobs[r].ctx.fail_after = -1;
      pthread_create(&th[r], NULL, failure_main, &jobs[r]);
    }
    for (int r = 0; r < RANKS; ++r) pthread_join(th[r], NULL);
    for (int r = 0; r < RANKS; ++r) CHECK(jobs[r].rc == 0);
  }
  if (refusals() != 0) return 1;
  if (g_failures == 0) printf("c_abi_callbacks: ok\n");
  return g_failures != 0;
}
