// A Communicator that takes device memory over a host communicator (MPI, callbacks, local):
// for a device backend where NCCL cannot run, e.g. two ranks on one GPU (NCCL refuses two
// ranks per device). Each operation on MemorySpace::kDevice buffers copies its inputs to
// pinned host staging after the work queued on its stream so far, runs the wrapped
// communicator's collective on the staging, and copies the results back on completion.
// Host memory (kHost) goes to the wrapped communicator as it is.
//
// A test and fallback path, not a fast one: the host synchronises with the stream. The copy
// in waits for the stream's work before the collective starts, and Wait, Test (done) and
// OrderBefore finish an operation by copying its results to the device and waiting for
// that copy, so OrderBefore makes the stream wait by waiting on the host.
//
// Staging: one pinned buffer per operation in flight, taken from free lists kept per size
// and allocated only when none of that size is free, so a step that repeats the previous
// one's operations allocates no staging memory (each operation still makes a small request
// object). An operation that failed leaves its buffer to the transport, which may still
// write it (the failure model of communicator.h), and a request dropped unfinished finishes
// (waits) in its destructor.
//
// Capabilities: device_memory_ok(); equal_counts_only() and everything else as the wrapped
// communicator (stats, progress mode, timeout, Abort).
#ifndef MDOPT_COMM_HOST_STAGED_COMMUNICATOR_H_
#define MDOPT_COMM_HOST_STAGED_COMMUNICATOR_H_

#include <cstddef>
#include <memory>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "comm/communicator.h"

namespace mdopt {

// What the adapter needs of a device, apart from its logic so that the logic runs without
// one (tests give a host fake). The CUDA one is MakeHostStagedCommunicator's.
class StagingDevice {
 public:
  virtual ~StagingDevice() = default;
  // Page-locked host memory (nullptr when there is none) and its release.
  virtual void* AllocHost(size_t bytes) = 0;
  virtual void FreeHost(void* p) = 0;
  // Enqueues a copy on `stream` after the work queued on it so far (to_device: host ->
  // device, else device -> host).
  virtual absl::Status Copy(void* dst, const void* src, size_t bytes, bool to_device,
                            void* stream) = 0;
  // Returns when every copy and all other work queued on `stream` so far are done.
  virtual absl::Status Synchronize(void* stream) = 0;
};

// The adapter over `host` (not owned: it must outlive the adapter and every request it
// made) and the CUDA runtime. Unimplemented in a build without CUDA.
absl::StatusOr<std::unique_ptr<Communicator>> MakeHostStagedCommunicator(Communicator* host);

// The adapter over `host` and a given device.
std::unique_ptr<Communicator> MakeHostStagedCommunicator(Communicator* host,
                                                         std::shared_ptr<StagingDevice> device);

}  // namespace mdopt

#endif  // MDOPT_COMM_HOST_STAGED_COMMUNICATOR_H_
