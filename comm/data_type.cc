#include "comm/communicator.h"

namespace mdopt {

size_t ElementSize(DataType dtype) {
  switch (dtype) {
    case DataType::kF32: return 4;
    case DataType::kBf16: return 2;
    case DataType::kF64: return 8;
    case DataType::kBytes: return 1;
  }
  return 0;
}

absl::string_view DataTypeName(DataType dtype) {
  switch (dtype) {
    case DataType::kF32: return "f32";
    case DataType::kBf16: return "bf16";
    case DataType::kF64: return "f64";
    case DataType::kBytes: return "bytes";
  }
  return "invalid dtype";
}

}  // namespace mdopt
