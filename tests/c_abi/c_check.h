/* The checks of mdopt's C test programs: CHECK counts a failed condition and goes on (so
 * that one run reports every broken check); CHECK_OK ends the run at a failed mdopt_* call,
 * whose consequences would only add noise. main returns g_failures != 0 at the end. */
#ifndef MDOPT_TESTS_C_ABI_C_CHECK_H_
#define MDOPT_TESTS_C_ABI_C_CHECK_H_

#include <stdio.h>

#include "mdopt/status.h"

static int g_failures = 0;

#define CHECK(cond)                                                             \
  do {                                                                          \
    if (!(cond)) {                                                              \
      fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #cond); \
      ++g_failures;                                                             \
    }                                                                           \
  } while (0)

#define CHECK_OK(call)                                                          \
  do {                                                                          \
    const mdopt_status s_ = (call);                                             \
    if (s_ != MDOPT_SUCCESS) {                                                  \
      fprintf(stderr, "%s:%d: %s -> %s: %s\n", __FILE__, __LINE__, #call,       \
              mdopt_status_string(s_), mdopt_last_error());                     \
      return 1;                                                                 \
    }                                                                           \
  } while (0)

#endif /* MDOPT_TESTS_C_ABI_C_CHECK_H_ */
