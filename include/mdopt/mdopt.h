/* mdopt: umbrella header of the C ABI. */
#ifndef MDOPT_MDOPT_H_
#define MDOPT_MDOPT_H_

#include "mdopt/comm.h"
#include "mdopt/export.h"
#include "mdopt/optimizer.h"
#include "mdopt/status.h"

/* Bumped on every incompatible change of a function, struct or enum of the ABI. */
#define MDOPT_ABI_VERSION 1

#ifdef __cplusplus
extern "C" {
#endif

/* The ABI version the library was built with; compare with MDOPT_ABI_VERSION. */
MDOPT_API int mdopt_abi_version(void);

/* "major.minor.patch" of the library. */
MDOPT_API const char* mdopt_version_string(void);

#ifdef __cplusplus
}
#endif

#endif /* MDOPT_MDOPT_H_ */
