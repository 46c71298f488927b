// Element-wise arithmetic on host buffers that transports lack: bf16 addition (in float32,
// rounded to nearest even, the user-defined reduction of MPI) and the division of a mean.
#ifndef MDOPT_COMM_HOST_REDUCE_H_
#define MDOPT_COMM_HOST_REDUCE_H_

#include <cstdint>

#include "comm/communicator.h"

namespace mdopt {

// inout[i] = bf16(float(in[i]) + float(inout[i])).
void Bf16SumInto(const uint16_t* in, uint16_t* inout, int64_t n);
// data[i] /= divisor, in the dtype's arithmetic (bf16: in float32, then rounded).
void DivideInPlace(void* data, int64_t count, DataType dtype, int divisor);

}  // namespace mdopt

#endif  // MDOPT_COMM_HOST_REDUCE_H_
