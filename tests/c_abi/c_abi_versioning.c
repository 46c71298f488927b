/* Struct versioning from a C11 program (docs/ABI.md, "Versioning"):
 * - a caller built against the first version of the ABI passes structs of exactly
 *   MDOPT_PARAM_DESC_SIZE_V1 / MDOPT_STEP_INFO_SIZE_V1 bytes: both are accepted, and
 *   mdopt_step writes nothing past the caller's struct (guard bytes right after it stay);
 * - a caller built against a newer ABI passes larger structs with a zero tail: accepted,
 *   and the tail is left as it was;
 * - a struct_size below the v1 size, or an absurd one, is refused with a message that names
 *   the struct, the size and the accepted range.
 * Exits 0 and prints "c_abi_versioning: ok" only if every check passed. */
#include "mdopt/mdopt.h"
#include "c_check.h"

#include <stdio.h>
#include <string.h>

enum { TAIL = 64, GUARD = 32, BUF = 1024 };
#define GUARD_BYTE 0xA5

/* Bytes [from, to) of buf all equal to value. */
static int all_bytes(const unsigned char* buf, size_t from, size_t to, unsigned char value) {
  size_t i;
  for (i = from; i < to; ++i)
    if (buf[i] != value) return 0;
  return 1;
}

/* The refusal message names the struct, the size given and the accepted range. */
static void check_refusal(mdopt_status got, const char* type, size_t size, size_t v1) {
  char want_size[64], want_range[64];
  const char* msg = mdopt_last_error();
  snprintf(want_size, sizeof want_size, "struct_size = %zu", size);
  snprintf(want_range, sizeof want_range, "[%zu, %zu]", v1, (size_t)MDOPT_STRUCT_SIZE_MAX);
  CHECK(got == MDOPT_INVALID_ARGUMENT);
  CHECK(strstr(msg, type) != NULL);
  CHECK(strstr(msg, want_size) != NULL);
  CHECK(strstr(msg, want_range) != NULL);
  if (got != MDOPT_INVALID_ARGUMENT || strstr(msg, want_range) == NULL)
    fprintf(stderr, "  status %s, message '%s'\n", mdopt_status_string(got), msg);
}

/* A parameter descriptor in buf, struct_size = size, the v1 fields from d, the bytes from
 * the v1 end to `zero_to` zero and from there `GUARD` guard bytes. */
static void place_desc(unsigned char* buf, const mdopt_param_desc* d, size_t size, size_t zero_to) {
  memset(buf, GUARD_BYTE, BUF);
  memset(buf, 0, zero_to);
  memcpy(buf, d, MDOPT_PARAM_DESC_SIZE_V1);
  memcpy(buf, &size, sizeof size); /* struct_size is the first field */
}

static int run(void) {
  /* Aligned storage for the structs, with room for a tail and guard bytes. */
  union {
    unsigned char bytes[BUF];
    long double align_;
    void* align_ptr_;
  } desc_buf, info_buf;
  float w1[4 * 3], g1[4 * 3], w2[5], g2[5];
  mdopt_comm* comm = NULL;
  mdopt_optimizer* opt = NULL;
  mdopt_param_desc d = MDOPT_PARAM_DESC_INIT;
  mdopt_step_info info = MDOPT_STEP_INFO_INIT;
  mdopt_step_info got;
  int64_t index = -1;
  size_t size;
  int i;

  /* The v1 sizes are the ends of the v1 fields; today's structs are v1 (plus padding). */
  CHECK(MDOPT_PARAM_DESC_SIZE_V1 <= sizeof(mdopt_param_desc));
  CHECK(MDOPT_STEP_INFO_SIZE_V1 <= sizeof(mdopt_step_info));
  CHECK(MDOPT_PARAM_DESC_SIZE_V1 ==
        offsetof(mdopt_param_desc, grad) + sizeof(const void*));
  CHECK(MDOPT_STEP_INFO_SIZE_V1 == offsetof(mdopt_step_info, exposed_comm_seconds) + sizeof(double));
  /* The initializers: struct_size = sizeof, the rest zero. */
  CHECK(d.struct_size == sizeof(mdopt_param_desc) && d.name == NULL && d.ndim == 0 &&
        d.param_dtype == 0 && d.grad == NULL && d.radius_scale == 0.0);
  CHECK(info.struct_size == sizeof(mdopt_step_info) && info.step == 0 && info.seconds == 0.0);
  CHECK(mdopt_param_desc_init().struct_size == sizeof(mdopt_param_desc));
  CHECK(mdopt_step_info_init().struct_size == sizeof(mdopt_step_info));

  for (i = 0; i < 12; ++i) {
    w1[i] = 0.1f * (float)(i + 1) - 0.55f;
    g1[i] = 0.01f * (float)(i % 5) - 0.02f;
  }
  for (i = 0; i < 5; ++i) {
    w2[i] = 0.2f * (float)i + 0.1f;
    g2[i] = 0.05f - 0.01f * (float)i;
  }

  CHECK_OK(mdopt_comm_create_local(&comm));
  CHECK_OK(mdopt_create(comm, "threads=1", &opt));
  CHECK_OK(mdopt_add_group(opt, "mat", "preset=md-adamw"));
  CHECK_OK(mdopt_add_group(opt, "vec", "preset=vector"));

  /* A v1-sized descriptor, guard bytes right after it. */
  d.name = "w";
  d.group = "mat";
  d.ndim = 2;
  d.shape[0] = 4;
  d.shape[1] = 3;
  d.param_dtype = MDOPT_DTYPE_F32;
  d.param = w1;
  d.grad_dtype = MDOPT_DTYPE_F32;
  d.grad = g1;
  place_desc(desc_buf.bytes, &d, MDOPT_PARAM_DESC_SIZE_V1, MDOPT_PARAM_DESC_SIZE_V1);
  CHECK_OK(mdopt_add_param(opt, (const mdopt_param_desc*)desc_buf.bytes, &index));
  CHECK(index == 0);
  CHECK(all_bytes(desc_buf.bytes, MDOPT_PARAM_DESC_SIZE_V1, BUF, GUARD_BYTE));

  /* A descriptor from a newer header: sizeof + 64 bytes, the tail zero. */
  d.name = "b";
  d.group = "vec";
  d.ndim = 1;
  d.shape[0] = 5;
  d.shape[1] = 0;
  d.param = w2;
  d.grad = g2;
  size = sizeof(mdopt_param_desc) + TAIL;
  place_desc(desc_buf.bytes, &d, size, size);
  CHECK_OK(mdopt_add_param(opt, (const mdopt_param_desc*)desc_buf.bytes, &index));
  CHECK(index == 1);

  /* Too small, absurd, and just past the maximum: refused, nothing registered. */
  d.name = "refused";
  size = MDOPT_PARAM_DESC_SIZE_V1 - 1;
  place_desc(desc_buf.bytes, &d, size, MDOPT_PARAM_DESC_SIZE_V1);
  check_refusal(mdopt_add_param(opt, (const mdopt_param_desc*)desc_buf.bytes, NULL),
                "mdopt_param_desc", size, MDOPT_PARAM_DESC_SIZE_V1);
  size = (size_t)1 << 40;
  place_desc(desc_buf.bytes, &d, size, MDOPT_PARAM_DESC_SIZE_V1);
  check_refusal(mdopt_add_param(opt, (const mdopt_param_desc*)desc_buf.bytes, NULL),
                "mdopt_param_desc", size, MDOPT_PARAM_DESC_SIZE_V1);
  size = (size_t)MDOPT_STRUCT_SIZE_MAX + 1;
  place_desc(desc_buf.bytes, &d, size, MDOPT_PARAM_DESC_SIZE_V1);
  check_refusal(mdopt_add_param(opt, (const mdopt_param_desc*)desc_buf.bytes, NULL),
                "mdopt_param_desc", size, MDOPT_PARAM_DESC_SIZE_V1);

  CHECK_OK(mdopt_finalize(opt));

  /* Step 1 with a v1-sized step info: filled in, the guard bytes after it untouched. */
  memset(info_buf.bytes, GUARD_BYTE, BUF);
  memset(info_buf.bytes, 0, MDOPT_STEP_INFO_SIZE_V1);
  size = MDOPT_STEP_INFO_SIZE_V1;
  memcpy(info_buf.bytes, &size, sizeof size);
  CHECK_OK(mdopt_step(opt, 1.0, NULL, (mdopt_step_info*)info_buf.bytes));
  CHECK(all_bytes(info_buf.bytes, MDOPT_STEP_INFO_SIZE_V1, BUF, GUARD_BYTE));
  memcpy(&got, info_buf.bytes, MDOPT_STEP_INFO_SIZE_V1);
  CHECK(got.struct_size == MDOPT_STEP_INFO_SIZE_V1);
  CHECK(got.step == 1 && got.skipped == 0 && got.grad_norm > 0.0 && got.seconds >= 0.0);

  /* Step 2 with a larger one: filled in, the zero tail left zero, the guard after it kept. */
  size = sizeof(mdopt_step_info) + TAIL;
  memset(info_buf.bytes, GUARD_BYTE, BUF);
  memset(info_buf.bytes, 0, size);
  memcpy(info_buf.bytes, &size, sizeof size);
  CHECK_OK(mdopt_step(opt, 1.0, NULL, (mdopt_step_info*)info_buf.bytes));
  CHECK(all_bytes(info_buf.bytes, sizeof(mdopt_step_info), size, 0));
  CHECK(all_bytes(info_buf.bytes, size, BUF, GUARD_BYTE));
  memcpy(&got, info_buf.bytes, sizeof got);
  CHECK(got.struct_size == size);
  CHECK(got.step == 2 && got.skipped == 0);

  /* Too small and absurd: refused, no step taken, nothing written. */
  size = MDOPT_STEP_INFO_SIZE_V1 - 1;
  memset(info_buf.bytes, GUARD_BYTE, BUF);
  memcpy(info_buf.bytes, &size, sizeof size);
  check_refusal(mdopt_step(opt, 1.0, NULL, (mdopt_step_info*)info_buf.bytes), "mdopt_step_info",
                size, MDOPT_STEP_INFO_SIZE_V1);
  CHECK(all_bytes(info_buf.bytes, sizeof size, BUF, GUARD_BYTE));
  size = (size_t)-1;
  memcpy(info_buf.bytes, &size, sizeof size);
  check_refusal(mdopt_step(opt, 1.0, NULL, (mdopt_step_info*)info_buf.bytes), "mdopt_step_info",
                size, MDOPT_STEP_INFO_SIZE_V1);
  CHECK(all_bytes(info_buf.bytes, sizeof size, BUF, GUARD_BYTE));
  info = mdopt_step_info_init();
  CHECK_OK(mdopt_step(opt, 1.0, NULL, &info));
  CHECK(info.step == 3);

  CHECK_OK(mdopt_destroy(opt));
  CHECK_OK(mdopt_comm_destroy(comm));
  return 0;
}

int main(void) {
  const int rc = run();
  if (rc != 0 || g_failures != 0) {
    fprintf(stderr, "c_abi_versioning: FAILED (%d failed checks)\n", g_failures);
    return 1;
  }
  printf("c_abi_versioning: ok\n");
  return 0;
}
