/* mdopt: status codes and error reporting shared by every call of the C ABI. */
#ifndef MDOPT_STATUS_H_
#define MDOPT_STATUS_H_

#include "mdopt/export.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Every mdopt_* call that can fail returns one of these. Values are stable ABI. */
typedef enum {
  MDOPT_SUCCESS = 0,          /* the call did what it was asked */
  MDOPT_INVALID_ARGUMENT = 1, /* a null pointer, bad spec key/value, wrong shape or dtype */
  MDOPT_INVALID_STATE = 2,    /* the call is out of order (e.g. step before finalize) */
  MDOPT_COMM_ERROR = 3,       /* a collective failed or timed out */
  MDOPT_DEVICE_ERROR = 4,     /* the accelerator or its runtime failed */
  MDOPT_IO_ERROR = 5,         /* a checkpoint could not be written, or was refused on load */
  MDOPT_UNSUPPORTED = 6,      /* valid request this build or backend cannot serve */
  MDOPT_INTERNAL = 7,         /* a bug in mdopt; please report it with mdopt_last_error() */
  MDOPT_OUT_OF_MEMORY = 8     /* an allocation failed; mdopt_last_error() names the call */
} mdopt_status;

/* A static, human-readable name for a status ("MDOPT_INVALID_ARGUMENT"); never NULL. */
MDOPT_API const char* mdopt_status_string(mdopt_status status);

/* The message of the calling thread's most recent mdopt_* call: why it failed, or which
 * gradient made mdopt_step skip; "" when that call succeeded. Each call resets it, so read
 * it right after the call. The pointer stays valid until the next mdopt_* call on the
 * same thread. */
MDOPT_API const char* mdopt_last_error(void);

#ifdef __cplusplus
}
#endif

#endif /* MDOPT_STATUS_H_ */
