/* LD_PRELOAD shim for the checkpoint tests: logs the path of every open, openat, fopen (and
 * their 64-bit and fortified variants) to $MDOPT_OPEN_LOG/open.<pid>.log, then does the open.
 * As root, file permissions would not stop a rank reading another rank's file: only tracing
 * its opens shows which files it read. The log is written with raw syscalls so that logging
 * does not recurse into the wrappers. Built by test_checkpoint_sharded.py with cc. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

static void note(const char* path) {
  const char* dir = getenv("MDOPT_OPEN_LOG");
  if (dir == NULL || path == NULL) return;
  char name[4096];
  snprintf(name, sizeof name, "%s/open.%ld.log", dir, (long)getpid());
  int fd = (int)syscall(SYS_openat, AT_FDCWD, name, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
  if (fd < 0) return;
  char line[4200];
  int n = snprintf(line, sizeof line, "%s\n", path);
  if (n > 0) syscall(SYS_write, fd, line, (size_t)(n < (int)sizeof line ? n : (int)sizeof line - 1));
  syscall(SYS_close, fd);
}

#define MODE_ARG(flags)                                  \
  mode_t mode = 0;                                       \
  if ((flags) & (O_CREAT | O_TMPFILE)) {                 \
    va_list ap;                                          \
    va_start(ap, flags);                                 \
    mode = (mode_t)va_arg(ap, int);                      \
    va_end(ap);                                          \
  }

#define WRAP_OPEN(fn)                                                        \
  int fn(const char* path, int flags, ...) {                                 \
    MODE_ARG(flags);                                                         \
    note(path);                                                              \
    static int (*real)(const char*, int, ...);                               \
    if (real == NULL) real = (int (*)(const char*, int, ...))dlsym(RTLD_NEXT, #fn); \
    return real(path, flags, mode);                                          \
  }
#define WRAP_OPENAT(fn)                                                      \
  int fn(int dirfd, const char* path, int flags, ...) {                      \
    MODE_ARG(flags);                                                         \
    note(path);                                                              \
    static int (*real)(int, const char*, int, ...);                          \
    if (real == NULL) real = (int (*)(int, const char*, int, ...))dlsym(RTLD_NEXT, #fn); \
    return real(dirfd, path, flags, mode);                                   \
  }
#define WRAP_FOPEN(fn)                                                       \
  FILE* fn(const char* path, const char* m) {                                \
    note(path);                                                              \
    static FILE* (*real)(const char*, const char*);                          \
    if (real == NULL) real = (FILE * (*)(const char*, const char*))dlsym(RTLD_NEXT, #fn); \
    return real(path, m);                                                    \
  }

WRAP_OPEN(open)
WRAP_OPEN(open64)
WRAP_OPENAT(openat)
WRAP_OPENAT(openat64)
WRAP_FOPEN(fopen)
WRAP_FOPEN(fopen64)

int __open_2(const char* path, int flags) { return open(path, flags); }
int __open64_2(const char* path, int flags) { return open64(path, flags); }
int __openat_2(int dirfd, const char* path, int flags) { return openat(dirfd, path, flags); }
int __openat64_2(int dirfd, const char* path, int flags) { return openat64(dirfd, path, flags); }
