// The record of one operation, shared by its Request and the backend that drives it. Records
// are recycled by their OpTracker (comm/op_tracker.h), which guards every field below with
// its one mutex; nothing here allocates, so that a steady stream of operations allocates
// nothing once the tracker's pools have grown to the stream's high-water mark.
//
// Three phases so that a timeout cannot report failure while the backend is still writing the
// result (a mean's division): the backend claims the op (BeginFinish) before it touches the
// user's buffer, and a failure only ends an op nobody has claimed.
#ifndef MDOPT_COMM_OP_STATE_H_
#define MDOPT_COMM_OP_STATE_H_

#include <cstddef>
#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "comm/communicator.h"

namespace mdopt {

// What an operation is, for messages: kept as numbers and a static name and formatted only
// when a message needs it (a timeout, a transport error), never on the way of a healthy op.
struct OpLabel {
  enum class Detail : uint8_t { kNone, kElements, kGroup };
  const char* what = "";  // a string literal: "all-reduce"
  Detail detail = Detail::kNone;
  int64_t count = 0;       // kElements: elements; kGroup: point-to-point ops
  DataType dtype = DataType::kBytes;
  bool reduces = false;    // kElements: append the ReduceOp
  ReduceOp reduce = ReduceOp::kSum;
  int root = -1;           // kElements: ">= 0" appends "from root R"
  int tag = 0;             // kGroup

  // " (1024 x f32, sum)", " (3 ops, tag 11)", " (8 x bytes) from root 2" or "".
  std::string Format() const;
};

// Who still refers to a record; it is recycled when neither does.
enum OpHolder : uint8_t { kUserHolder = 1, kBackendHolder = 2 };

class OpTracker;

class OpState {
 public:
  uint64_t seq() const { return seq_; }
  // Storage the backend asked for at Begin (16-byte aligned), until the record is recycled.
  void* scratch() const { return scratch_; }

 private:
  friend class OpTracker;
  enum class Phase : uint8_t { kPending, kFinishing, kDone };

  uint64_t seq_ = 0;
  OpLabel label_;
  Phase phase_ = Phase::kPending;
  uint8_t holders_ = 0;
  absl::Status status_;
  int64_t handles_ = 0;  // transport handles the backend counted for it (see OpTracker)
  void* scratch_ = nullptr;
  int scratch_class_ = -1;
  OpState* prev_ = nullptr;  // the pending list while not done; the free list when recycled
  OpState* next_ = nullptr;
};

}  // namespace mdopt

#endif  // MDOPT_COMM_OP_STATE_H_
