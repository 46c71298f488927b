/* mdopt: umbrella header of the C ABI. */
#ifndef MDOPT_MDOPT_H_
#define MDOPT_MDOPT_H_

#include "mdopt/comm.h"
#include "mdopt/export.h"
#include "mdopt/optimizer.h"
#include "mdopt/status.h"

/* Bumped on every incompatible change of a function, struct or enum of the ABI (appending a
 * field to a versioned struct is compatible: docs/ABI.md, "Versioning"). libmdopt.so's
 * SONAME is libmdopt.so.<MDOPT_ABI_VERSION>; CMake reads the number from this line. */
#define MDOPT_ABI_VERSION 1
/* Compatible additions within ABI MDOPT_ABI_VERSION so far: a function or field marked
 * "since ABI 1 (minor N)" needs a library of minor N or later. The library's file name is
 * libmdopt.so.<MDOPT_ABI_VERSION>.<MDOPT_ABI_MINOR>.<release patch>; CMake reads it here. */
#define MDOPT_ABI_MINOR 7

#ifdef __cplusplus
extern "C" {
#endif

/* The ABI version the library was built with; compare with MDOPT_ABI_VERSION. */
MDOPT_API int mdopt_abi_version(void);

/* "major.minor.patch" of the library. */
MDOPT_API const char* mdopt_version_string(void);

/* What the library runs on, one line of key=value for logs and bug reports, e.g.
 * "version=0.1.0 abi=1 blas=OpenBLAS-0.3.21/Haswell threads=2 isa=avx2 onednn_bf16=no-cpu
 * cuda=no". Keys: docs/ABI.md. Static storage, never NULL. */
MDOPT_API const char* mdopt_runtime_info(void);

#ifdef __cplusplus
}
#endif

#endif /* MDOPT_MDOPT_H_ */
