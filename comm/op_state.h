// The completion record of one operation, shared by its Request and the backend that drives
// it. Three phases so that a timeout cannot report failure while the backend is still
// writing the result (a mean's division): the backend claims the op (BeginFinish) before it
// touches the user's buffer, and a failure only ends an op nobody has claimed.
#ifndef MDOPT_COMM_OP_STATE_H_
#define MDOPT_COMM_OP_STATE_H_

#include <cstdint>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

namespace mdopt {

class OpState {
 public:
  OpState(uint64_t seq, std::string name) : seq_(seq), name_(std::move(name)) {}

  uint64_t seq() const { return seq_; }
  const std::string& name() const { return name_; }

  // Pending -> finishing; false when it already failed or finished.
  bool BeginFinish();
  // Pending or finishing -> done with `s`; true when this call ended the op.
  bool Complete(absl::Status s);
  // Pending -> done with `s` (an error); false when finishing or done.
  bool Fail(absl::Status s);

  // True once done; false when `deadline` passed first.
  bool WaitUntil(absl::Time deadline) const;
  bool done() const;
  absl::Status status() const;  // meaningful once done

 private:
  enum class Phase { kPending, kFinishing, kDone };
  const uint64_t seq_;
  const std::string name_;
  mutable absl::Mutex mu_;
  Phase phase_ ABSL_GUARDED_BY(mu_) = Phase::kPending;
  absl::Status status_ ABSL_GUARDED_BY(mu_);
};

}  // namespace mdopt

#endif  // MDOPT_COMM_OP_STATE_H_
