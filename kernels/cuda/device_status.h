// How the CUDA kernels report failure: a message, empty on success. kernels/ depends on no
// status library (dist_opt turns these into absl::Status at its boundary), and nothing here
// throws or aborts.
#ifndef MDOPT_KERNELS_CUDA_DEVICE_STATUS_H_
#define MDOPT_KERNELS_CUDA_DEVICE_STATUS_H_

#include <string>
#include <utility>

namespace mdopt::kernels::cuda {

class DeviceStatus {
 public:
  DeviceStatus() = default;
  static DeviceStatus Error(std::string message) {
    DeviceStatus s;
    s.message_ = message.empty() ? "unknown CUDA error" : std::move(message);
    return s;
  }
  bool ok() const { return message_.empty(); }
  const std::string& message() const { return message_; }

 private:
  std::string message_;
};

// Whether a CUDA device is usable by this process, and if not why ("no CUDA device",
// "cudaGetDeviceCount: <error>"); never fails otherwise.
bool DevicePresent(std::string* why_not);

}  // namespace mdopt::kernels::cuda

#endif  // MDOPT_KERNELS_CUDA_DEVICE_STATUS_H_
