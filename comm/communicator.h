// The collectives the optimizer needs, independent of any optimizer. Backends: local (one
// rank) now; mpi and nccl implement the same interface.
#ifndef MDOPT_COMM_COMMUNICATOR_H_
#define MDOPT_COMM_COMMUNICATOR_H_

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/types/span.h"

namespace mdopt {

class Communicator {
 public:
  virtual ~Communicator() = default;

  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual std::string backend() const = 0;

  // In place: every rank ends with the element-wise sum over ranks, the same on every rank.
  virtual absl::Status AllReduceSum(absl::Span<double> data) = 0;
  // In place: every rank ends with root's bytes.
  virtual absl::Status Broadcast(absl::Span<uint8_t> data, int root) = 0;
  virtual absl::Status Barrier() = 0;
};

// Rank 0 of 1: every collective is the identity.
std::unique_ptr<Communicator> MakeLocalCommunicator();

}  // namespace mdopt

#endif  // MDOPT_COMM_COMMUNICATOR_H_
