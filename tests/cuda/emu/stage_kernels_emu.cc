// The stage kernels compiled by the host compiler against the CUDA emulation (README.md).
#include "kernels/cuda/stage_kernels.cu"
