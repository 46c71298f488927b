// The host-staged adapter's device (host_staged_communicator.h) on the CUDA runtime: pinned
// host memory from cudaMallocHost, copies with cudaMemcpyAsync on the caller's stream, made
// current on the device that holds the buffer, and cudaStreamSynchronize.
#include <cuda_runtime.h>

#include <atomic>

#include "absl/strings/str_cat.h"
#include "comm/host_staged_communicator.h"

namespace mdopt {
namespace {

absl::Status CudaError(absl::string_view what, cudaError_t e) {
  return absl::UnavailableError(
      absl::StrCat(what, ": ", cudaGetErrorName(e), " (", cudaGetErrorString(e), ")"));
}

// Makes `device` current for its lifetime and restores the caller's after.
class DeviceScope {
 public:
  explicit DeviceScope(int device) {
    if (cudaGetDevice(&previous_) != cudaSuccess || previous_ == device) {
      previous_ = -1;
      return;
    }
    if (cudaSetDevice(device) != cudaSuccess) previous_ = -1;
  }
  ~DeviceScope() {
    if (previous_ >= 0) cudaSetDevice(previous_);
  }
  DeviceScope(const DeviceScope&) = delete;
  DeviceScope& operator=(const DeviceScope&) = delete;

 private:
  int previous_ = -1;
};

class CudaStagingDevice final : public StagingDevice {
 public:
  void* AllocHost(size_t bytes) override {
    void* p = nullptr;
    return cudaMallocHost(&p, bytes) == cudaSuccess ? p : nullptr;
  }
  void FreeHost(void* p) override { cudaFreeHost(p); }

  absl::Status Copy(void* dst, const void* src, size_t bytes, bool to_device,
                    void* stream) override {
    const void* dev = to_device ? dst : src;
    cudaPointerAttributes a{};
    cudaError_t e = cudaPointerGetAttributes(&a, dev);
    if (e != cudaSuccess) return CudaError("cudaPointerGetAttributes", e);
    if (a.type != cudaMemoryTypeDevice && a.type != cudaMemoryTypeManaged) {
      return absl::InvalidArgumentError(
          "a MemorySpace::kDevice buffer is not CUDA device memory");
    }
    DeviceScope scope(a.device);
    e = cudaMemcpyAsync(dst, src, bytes, to_device ? cudaMemcpyHostToDevice : cudaMemcpyDeviceToHost,
                        static_cast<cudaStream_t>(stream));
    if (e != cudaSuccess) return CudaError("cudaMemcpyAsync", e);
    last_device_.store(a.device);
    return absl::OkStatus();
  }

  absl::Status Synchronize(void* stream) override {
    DeviceScope scope(last_device_.load());
    const cudaError_t e = cudaStreamSynchronize(static_cast<cudaStream_t>(stream));
    if (e != cudaSuccess) return CudaError("cudaStreamSynchronize", e);
    return absl::OkStatus();
  }

 private:
  // The device of the last copy: the null stream is one per device. (An adapter serves one
  // device backend, whose buffers are all on one device.)
  std::atomic<int> last_device_{0};
};

}  // namespace

absl::StatusOr<std::unique_ptr<Communicator>> MakeHostStagedCommunicator(Communicator* host) {
  if (host == nullptr) return absl::InvalidArgumentError("host-staged communicator: host is null");
  return MakeHostStagedCommunicator(host, std::make_shared<CudaStagingDevice>());
}

}  // namespace mdopt
