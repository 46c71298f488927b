/* MDOPT_HD marks the small math functions of kernels/common that the CPU fast path and the
 * CUDA kernels share: under nvcc they compile for both host and device, elsewhere the mark
 * is empty. Plain C as well, because bf16.h is also included from C tests. */
#ifndef MDOPT_KERNELS_COMMON_HOST_DEVICE_H_
#define MDOPT_KERNELS_COMMON_HOST_DEVICE_H_

#if defined(__CUDACC__)
#define MDOPT_HD __host__ __device__
#else
#define MDOPT_HD
#endif

#endif /* MDOPT_KERNELS_COMMON_HOST_DEVICE_H_ */
