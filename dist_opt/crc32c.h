// CRC-32C (Castagnoli), the checksum of checkpoint files: the SSE4.2 instruction where the
// CPU has it, a table otherwise. Both give the same value.
#ifndef MDOPT_DIST_OPT_CRC32C_H_
#define MDOPT_DIST_OPT_CRC32C_H_

#include <cstddef>
#include <cstdint>

namespace mdopt {

// Extends crc (0 to start) over data[0, size).
uint32_t Crc32c(uint32_t crc, const void* data, size_t size);

}  // namespace mdopt

#endif  // MDOPT_DIST_OPT_CRC32C_H_
