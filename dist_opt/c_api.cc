// The C ABI of include/mdopt: thin shims that check pointers and struct sizes, call the C++
// optimizer, and turn absl::Status (and any exception) into an mdopt_status plus a
// thread-local message. Nothing thrown inside crosses this file.
#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstring>
#include <exception>
#include <memory>
#include <new>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "comm/callback_communicator.h"
#include "comm/communicator.h"
#include "dist_opt/optimizer.h"
#include "kernels/backend_factory.h"
#include "mdopt/mdopt.h"

namespace {

// A communicator and what the C ABI adds to it, shared by its handle and by every optimizer
// created on it (reference counted: mdopt_comm_destroy drops the handle's reference, the
// communicator goes with the last of them).
struct SharedComm {
  explicit SharedComm(std::unique_ptr<mdopt::Communicator> c) : impl(std::move(c)) {}
  std::unique_ptr<mdopt::Communicator> impl;
  std::atomic<bool> aborted{false};
  mutable absl::Mutex mu;
  std::string abort_reason ABSL_GUARDED_BY(mu);  // the first mdopt_comm_abort's
};

}  // namespace

struct mdopt_comm {
  std::shared_ptr<SharedComm> shared;
};

struct mdopt_optimizer {
  std::shared_ptr<SharedComm> comm;  // declared first: it outlives impl
  std::unique_ptr<mdopt::Optimizer> impl;
};

// The dtype fields are int32_t so that any value a caller stores is well defined; on every
// supported ABI the enum has the same size and alignment, so the layout is what it was
// when they were declared as mdopt_dtype.
static_assert(sizeof(mdopt_dtype) == sizeof(int32_t) && alignof(mdopt_dtype) == alignof(int32_t),
              "mdopt_dtype must be int32_t-sized");
#if defined(__LP64__) || defined(_LP64)
static_assert(offsetof(mdopt_param_desc, ndim) == 24 && offsetof(mdopt_param_desc, shape) == 32 &&
                  offsetof(mdopt_param_desc, param_dtype) == 56 &&
                  offsetof(mdopt_param_desc, param) == 64 &&
                  offsetof(mdopt_param_desc, grad_dtype) == 72 &&
                  offsetof(mdopt_param_desc, grad) == 80,
              "mdopt_param_desc v1 layout changed");
static_assert(MDOPT_PARAM_DESC_SIZE_V1 == 88 && MDOPT_STEP_INFO_SIZE_V1 == 48,
              "v1 struct sizes changed");
static_assert(offsetof(mdopt_step_info, skipped) == 16 &&
                  offsetof(mdopt_step_info, exposed_comm_seconds) == 40,
              "mdopt_step_info v1 layout changed");
#endif
#if defined(__LP64__) || defined(_LP64)
static_assert(MDOPT_COMM_CALLBACKS_SIZE_V1 == 120 && offsetof(mdopt_comm_callbacks, user) == 16 &&
                  offsetof(mdopt_comm_callbacks, all_reduce) == 24,
              "mdopt_comm_callbacks v1 layout changed");
static_assert(sizeof(mdopt_comm_p2p) == 32 && offsetof(mdopt_comm_p2p, data) == 8 &&
                  offsetof(mdopt_comm_p2p, count) == 16 && offsetof(mdopt_comm_p2p, dtype) == 24,
              "mdopt_comm_p2p layout changed (it is frozen)");
#endif
static_assert(static_cast<int>(MDOPT_COMM_DTYPE_F32) == static_cast<int>(MDOPT_DTYPE_F32) &&
                  static_cast<int>(MDOPT_COMM_DTYPE_BF16) == static_cast<int>(MDOPT_DTYPE_BF16),
              "the communicator's dtypes extend mdopt_dtype");
static_assert(MDOPT_PARAM_DESC_SIZE_V1 <= sizeof(mdopt_param_desc) &&
                  MDOPT_STEP_INFO_SIZE_V1 <= sizeof(mdopt_step_info),
              "the v1 sizes are prefixes of the current structs");

namespace {

thread_local std::string g_last_error;

mdopt_status ToCode(absl::StatusCode c) {
  switch (c) {
    case absl::StatusCode::kOk: return MDOPT_SUCCESS;
    case absl::StatusCode::kInvalidArgument:
    case absl::StatusCode::kOutOfRange:
    case absl::StatusCode::kNotFound:
    case absl::StatusCode::kAlreadyExists: return MDOPT_INVALID_ARGUMENT;
    case absl::StatusCode::kFailedPrecondition: return MDOPT_INVALID_STATE;
    case absl::StatusCode::kUnavailable:
    case absl::StatusCode::kDeadlineExceeded:
    case absl::StatusCode::kAborted: return MDOPT_COMM_ERROR;
    case absl::StatusCode::kDataLoss: return MDOPT_IO_ERROR;
    case absl::StatusCode::kUnimplemented: return MDOPT_UNSUPPORTED;
    case absl::StatusCode::kResourceExhausted: return MDOPT_OUT_OF_MEMORY;
    default: return MDOPT_INTERNAL;
  }
}

mdopt_status Fail(mdopt_status code, std::string message) {
  g_last_error = std::move(message);
  return code;
}

mdopt_status Report(const absl::Status& s) {
  if (s.ok()) return MDOPT_SUCCESS;
  if (mdopt::kernels::IsDeviceError(s)) return Fail(MDOPT_DEVICE_ERROR, std::string(s.message()));
  if (s.code() == absl::StatusCode::kResourceExhausted &&
      s.message().find("out of memory") == absl::string_view::npos) {
    return Fail(MDOPT_OUT_OF_MEMORY, absl::StrCat("out of memory: ", s.message()));
  }
  return Fail(ToCode(s.code()), std::string(s.message()));
}

// Runs body, turning exceptions into statuses (std::bad_alloc into MDOPT_OUT_OF_MEMORY, any
// other into MDOPT_INTERNAL) so that none crosses the ABI.
template <typename F>
mdopt_status Guard(const char* call, F&& body) {
  g_last_error.clear();
  try {
    return body();
  } catch (const std::bad_alloc&) {
    return Fail(MDOPT_OUT_OF_MEMORY, absl::StrCat(call, ": out of memory"));
  } catch (const std::exception& e) {
    return Fail(MDOPT_INTERNAL, absl::StrCat(call, ": ", e.what()));
  } catch (...) {
    return Fail(MDOPT_INTERNAL, absl::StrCat(call, ": unknown exception"));
  }
}

mdopt_status NullArgument(const char* call, const char* arg) {
  return Fail(MDOPT_INVALID_ARGUMENT, absl::StrCat(call, ": ", arg, " is NULL"));
}

// A versioned struct's struct_size must be at least its v1 size (every v1 field present) and
// at most MDOPT_STRUCT_SIZE_MAX (anything larger is an uninitialised size, not a newer struct).
bool StructSizeOk(const char* call, const char* what, const char* type, size_t size,
                  size_t v1_size, mdopt_status* failure) {
  if (size >= v1_size && size <= MDOPT_STRUCT_SIZE_MAX) return true;
  *failure = Fail(MDOPT_INVALID_ARGUMENT,
                  absl::StrCat(call, ": ", what, "->struct_size = ", size, " is outside the range ",
                               "accepted for ", type, ", [", v1_size, ", ", MDOPT_STRUCT_SIZE_MAX,
                               "] (the v1 size up to 64 KiB; set it to sizeof(", type, ")"));
  return false;
}

// The caller's struct as this library's struct: the bytes within both struct_size and our
// sizeof, the rest zero. Fields past the caller's struct_size are never read.
template <typename T>
T ReadVersioned(const T* in) {
  T out;
  std::memset(&out, 0, sizeof out);
  std::memcpy(&out, in, std::min(in->struct_size, sizeof(T)));
  return out;
}

// Writes our struct's fields into the caller's, never past its struct_size (nor our sizeof),
// and leaves its struct_size as it was.
template <typename T>
void WriteVersioned(const T& in, T* out) {
  const size_t n = std::min(out->struct_size, sizeof(T));
  constexpr size_t skip = sizeof(size_t);  // struct_size, the first field
  std::memcpy(reinterpret_cast<char*>(out) + skip, reinterpret_cast<const char*>(&in) + skip,
              n - skip);
}

// The two byte-count queries: check the pointers, ask the optimizer, copy the answer out.
template <typename Query>
mdopt_status BytesQuery(const char* call, const mdopt_optimizer* opt, int64_t* bytes, Query query) {
  return Guard(call, [&] {
    if (opt == nullptr) return NullArgument(call, "opt");
    if (bytes == nullptr) return NullArgument(call, "bytes");
    absl::StatusOr<int64_t> b = query(*opt->impl);
    if (!b.ok()) return Report(b.status());
    *bytes = *b;
    return MDOPT_SUCCESS;
  });
}


// Copies `text` into a caller's buffer under the describe_plan rules (NUL-terminated,
// truncated to `size`, the whole size in *needed).
void CopyOut(const std::string& text, char* buf, size_t size, size_t* needed_or_null) {
  if (needed_or_null != nullptr) *needed_or_null = text.size() + 1;
  if (size > 0) {
    const size_t n = std::min(size - 1, text.size());
    std::memcpy(buf, text.data(), n);
    buf[n] = '\0';
  }
}

// The plan as `render` writes it, for mdopt_describe_plan and mdopt_plan_json.
template <typename Render>
mdopt_status PlanText(const char* call, const mdopt_optimizer* opt, char* buf, size_t size,
                      size_t* needed_or_null, Render render) {
  return Guard(call, [&] {
    if (opt == nullptr) return NullArgument(call, "opt");
    if (buf == nullptr && size > 0) return NullArgument(call, "buf");
    const mdopt::ShardPlan* plan = opt->impl->plan();
    if (plan == nullptr) return Fail(MDOPT_INVALID_STATE, absl::StrCat(call, " before mdopt_finalize"));
    CopyOut(render(*plan), buf, size, needed_or_null);
    return MDOPT_SUCCESS;
  });
}

mdopt_comm* NewComm(std::unique_ptr<mdopt::Communicator> c) {
  return new mdopt_comm{std::make_shared<SharedComm>(std::move(c))};
}

// Calls that need the communicator refuse once it was aborted: MDOPT_COMM_ERROR naming the
// reason. False (and *failure set) when aborted.
bool CommUsable(const char* call, const SharedComm& c, mdopt_status* failure) {
  if (!c.aborted.load(std::memory_order_acquire)) return true;
  std::string reason;
  {
    absl::MutexLock l(&c.mu);
    reason = c.abort_reason;
  }
  *failure = Fail(MDOPT_COMM_ERROR,
                  absl::StrCat(call, ": the communicator was aborted (mdopt_comm_abort: ", reason,
                               "); it and every optimizer on it refuse further work"));
  return false;
}

// mdopt_comm_create_nccl and mdopt_comm_create_nccl2: the arguments are checked in every
// build (before MDOPT_UNSUPPORTED in one without NCCL).
mdopt_status CreateNccl(const char* call, const char* id, int size, int rank, int device,
                        double timeout_s, mdopt_comm** out) {
  return Guard(call, [&] {
    if (out == nullptr) return NullArgument(call, "out");
    if (id == nullptr) return NullArgument(call, "id");
    if (size < 1) {
      return Fail(MDOPT_INVALID_ARGUMENT, absl::StrCat(call, ": size = ", size, " (must be >= 1)"));
    }
    if (rank < 0 || rank >= size) {
      return Fail(MDOPT_INVALID_ARGUMENT,
                  absl::StrCat(call, ": rank = ", rank, " is outside [0, ", size, ")"));
    }
    if (device < 0) {
      return Fail(MDOPT_INVALID_ARGUMENT,
                  absl::StrCat(call, ": device = ", device, " (a CUDA device index, >= 0)"));
    }
    if (!(timeout_s > 0.0 && timeout_s <= 1e7)) {  // also refuses NaN
      return Fail(MDOPT_INVALID_ARGUMENT,
                  absl::StrCat(call, ": timeout_s = ", timeout_s, " is outside (0, 1e7] seconds"));
    }
    absl::StatusOr<std::unique_ptr<mdopt::Communicator>> c =
        mdopt::MakeNcclCommunicator(id, size, rank, device, absl::Seconds(timeout_s));
    if (!c.ok()) return Report(c.status());
    *out = NewComm(*std::move(c));
    return MDOPT_SUCCESS;
  });
}

}  // namespace

extern "C" {

const char* mdopt_status_string(mdopt_status status) {
  switch (status) {
    case MDOPT_SUCCESS: return "MDOPT_SUCCESS";
    case MDOPT_INVALID_ARGUMENT: return "MDOPT_INVALID_ARGUMENT";
    case MDOPT_INVALID_STATE: return "MDOPT_INVALID_STATE";
    case MDOPT_COMM_ERROR: return "MDOPT_COMM_ERROR";
    case MDOPT_DEVICE_ERROR: return "MDOPT_DEVICE_ERROR";
    case MDOPT_IO_ERROR: return "MDOPT_IO_ERROR";
    case MDOPT_UNSUPPORTED: return "MDOPT_UNSUPPORTED";
    case MDOPT_INTERNAL: return "MDOPT_INTERNAL";
    case MDOPT_OUT_OF_MEMORY: return "MDOPT_OUT_OF_MEMORY";
  }
  return "MDOPT_UNKNOWN_STATUS";
}

const char* mdopt_last_error(void) { return g_last_error.c_str(); }

int mdopt_abi_version(void) { return MDOPT_ABI_VERSION; }

const char* mdopt_version_string(void) { return MDOPT_VERSION_STRING; }

const char* mdopt_runtime_info(void) try {
  // Built once (thread-safe static); OpenMP's default thread count is read then.
  static const std::string info =
      absl::StrCat("version=", MDOPT_VERSION_STRING, " abi=", MDOPT_ABI_VERSION, " ",
                   mdopt::kernels::BackendRuntimeInfo());
  return info.c_str();
} catch (...) {
  return "version=" MDOPT_VERSION_STRING " (runtime info unavailable)";
}

mdopt_status mdopt_comm_create_local(mdopt_comm** out) {
  return Guard("mdopt_comm_create_local", [&] {
    if (out == nullptr) return NullArgument("mdopt_comm_create_local", "out");
    *out = NewComm(mdopt::MakeLocalCommunicator());
    return MDOPT_SUCCESS;
  });
}

mdopt_status mdopt_comm_create_mpi(void* mpi_comm_or_null, mdopt_comm** out) {
  return Guard("mdopt_comm_create_mpi", [&] {
    if (out == nullptr) return NullArgument("mdopt_comm_create_mpi", "out");
    absl::StatusOr<std::unique_ptr<mdopt::Communicator>> c =
        mdopt::MakeMpiCommunicator(mpi_comm_or_null);
    if (!c.ok()) return Report(c.status());
    *out = NewComm(*std::move(c));
    return MDOPT_SUCCESS;
  });
}

mdopt_status mdopt_comm_create_callbacks(const mdopt_comm_callbacks* cb, mdopt_comm** out) {
  const char* call = "mdopt_comm_create_callbacks";
  return Guard(call, [&] {
    if (cb == nullptr) return NullArgument(call, "cb");
    if (out == nullptr) return NullArgument(call, "out");
    mdopt_status failure = MDOPT_SUCCESS;
    if (!StructSizeOk(call, "cb", "mdopt_comm_callbacks", cb->struct_size,
                      MDOPT_COMM_CALLBACKS_SIZE_V1, &failure)) {
      return failure;
    }
    // comm's CallbackTransport over the caller's C callbacks. Its `user` is a copy of the
    // caller's struct, deleted by its destroy after the caller's destroy (never called when
    // creation fails); a callback left NULL stays null, so that comm refuses a missing
    // required one and falls back for a missing optional one as the ABI says.
    using Cb = mdopt_comm_callbacks;
    using mdopt::DataType;
    static_assert(static_cast<int>(DataType::kF32) == MDOPT_COMM_DTYPE_F32 &&
                      static_cast<int>(DataType::kBf16) == MDOPT_COMM_DTYPE_BF16 &&
                      static_cast<int>(DataType::kF64) == MDOPT_COMM_DTYPE_F64 &&
                      static_cast<int>(DataType::kBytes) == MDOPT_COMM_DTYPE_BYTES,
                  "mdopt_comm_dtype values are comm's DataType values");
    static_assert(MDOPT_SUCCESS == mdopt::CallbackTransport::kOk, "success is 0 on both sides");
    struct Bridge {
      static const Cb& C(void* u) { return *static_cast<const Cb*>(u); }
      static int32_t Dt(DataType d) { return static_cast<int32_t>(d); }
      static int AllReduce(void* u, const void* s, void* r, int64_t n, DataType d, void** p) {
        return C(u).all_reduce(C(u).user, s, r, n, Dt(d), p);
      }
      static int ReduceScatter(void* u, const void* s, void* r, const int64_t* counts,
                               DataType d, void** p) {
        return C(u).reduce_scatter(C(u).user, s, r, counts, Dt(d), p);
      }
      static int AllGather(void* u, const void* s, void* r, const int64_t* counts, DataType d,
                           void** p) {
        return C(u).all_gather(C(u).user, s, r, counts, Dt(d), p);
      }
      static int Broadcast(void* u, void* data, int64_t n, DataType d, int root, void** p) {
        return C(u).broadcast(C(u).user, data, n, Dt(d), root, p);
      }
      // The halves as mdopt_comm_p2p, valid during the call (the ABI's ops are read there).
      static int SendRecv(void* u, const mdopt::P2P* ops, int64_t n, int tag, void** p) {
        thread_local std::vector<mdopt_comm_p2p> v;
        v.clear();
        for (int64_t k = 0; k < n; ++k) {
          v.push_back({ops[k].peer, ops[k].is_send ? 1 : 0, ops[k].data, ops[k].count,
                       Dt(ops[k].dtype)});
        }
        return C(u).send_recv(C(u).user, v.data(), n, tag, p);
      }
      static int Barrier(void* u, void** p) { return C(u).barrier(C(u).user, p); }
      static int Wait(void* u, void* h, double t) { return C(u).wait(C(u).user, h, t); }
      static int Test(void* u, void* h, bool* done) {
        int32_t d = 0;
        const mdopt_status s = C(u).test(C(u).user, h, &d);
        *done = d != 0;
        return s;
      }
      static void SetTimeout(void* u, double t) { C(u).set_timeout(C(u).user, t); }
      static void Abort(void* u, const char* why) { C(u).abort(C(u).user, why); }
      static void ErrorMessage(void* u, char* buf, size_t n) { C(u).error_message(C(u).user, buf, n); }
      static void Destroy(void* u) {
        const Cb* c = static_cast<const Cb*>(u);
        if (c->destroy != nullptr) c->destroy(c->user);
        delete c;
      }
    };
    auto copy = std::make_unique<Cb>(ReadVersioned(cb));
    const Cb& c = *copy;
    mdopt::CallbackTransport t;
    t.rank = c.rank;
    t.size = c.size;
    t.user = copy.get();
    if (c.all_reduce != nullptr) t.all_reduce = Bridge::AllReduce;
    if (c.reduce_scatter != nullptr) t.reduce_scatter = Bridge::ReduceScatter;
    if (c.all_gather != nullptr) t.all_gather = Bridge::AllGather;
    if (c.broadcast != nullptr) t.broadcast = Bridge::Broadcast;
    if (c.send_recv != nullptr) t.send_recv = Bridge::SendRecv;
    if (c.barrier != nullptr) t.barrier = Bridge::Barrier;
    if (c.wait != nullptr) t.wait = Bridge::Wait;
    if (c.test != nullptr) t.test = Bridge::Test;
    if (c.set_timeout != nullptr) t.set_timeout = Bridge::SetTimeout;
    if (c.abort != nullptr) t.abort = Bridge::Abort;
    if (c.error_message != nullptr) t.error_message = Bridge::ErrorMessage;
    t.destroy = Bridge::Destroy;
    absl::StatusOr<std::unique_ptr<mdopt::Communicator>> made =
        mdopt::MakeCallbackCommunicator(t);
    if (!made.ok()) {  // names the call, then the field
      return Report(absl::Status(made.status().code(),
                                 absl::StrCat(call, ": ", made.status().message())));
    }
    copy.release();  // the communicator's now: freed by Bridge::Destroy
    *out = NewComm(*std::move(made));
    return MDOPT_SUCCESS;
  });
}

mdopt_status mdopt_comm_nccl_unique_id(char id[MDOPT_NCCL_UNIQUE_ID_BYTES]) {
  return Guard("mdopt_comm_nccl_unique_id", [&] {
    if (id == nullptr) return NullArgument("mdopt_comm_nccl_unique_id", "id");
    static_assert(MDOPT_NCCL_UNIQUE_ID_BYTES == mdopt::kNcclIdBytes, "ncclUniqueId size");
    if (absl::Status s = mdopt::NcclUniqueId(id); !s.ok()) return Report(s);
    return MDOPT_SUCCESS;
  });
}

mdopt_status mdopt_comm_create_nccl(const char* id, int size, int rank, int device,
                                    mdopt_comm** out) {
  return CreateNccl("mdopt_comm_create_nccl", id, size, rank, device, 600.0, out);
}

mdopt_status mdopt_comm_nccl_id(mdopt_nccl_id* id) {
  return Guard("mdopt_comm_nccl_id", [&] {
    if (id == nullptr) return NullArgument("mdopt_comm_nccl_id", "id");
    static_assert(sizeof(id->bytes) == mdopt::kNcclIdBytes, "ncclUniqueId size");
    if (absl::Status s = mdopt::NcclUniqueId(id->bytes); !s.ok()) return Report(s);
    return MDOPT_SUCCESS;
  });
}

mdopt_status mdopt_comm_create_nccl2(const mdopt_nccl_id* id, int size, int rank, int device,
                                     double timeout_s, mdopt_comm** out) {
  return CreateNccl("mdopt_comm_create_nccl2", id == nullptr ? nullptr : id->bytes, size, rank,
                    device, timeout_s, out);
}

mdopt_status mdopt_comm_abort(mdopt_comm* comm, const char* reason) {
  return Guard("mdopt_comm_abort", [&] {
    if (comm == nullptr) return NullArgument("mdopt_comm_abort", "comm");
    SharedComm& c = *comm->shared;
    std::string why = reason == nullptr || reason[0] == '\0' ? "no reason given" : reason;
    {
      absl::MutexLock l(&c.mu);
      if (c.aborted.load(std::memory_order_relaxed)) return MDOPT_SUCCESS;  // the first wins
      c.abort_reason = why;
      c.aborted.store(true, std::memory_order_release);
    }
    // Never blocks (Communicator::Abort): fails every pending and later operation, which
    // wakes every thread waiting on one.
    c.impl->Abort(why);
    return MDOPT_SUCCESS;
  });
}

mdopt_status mdopt_comm_rank(const mdopt_comm* comm, int* rank) {
  return Guard("mdopt_comm_rank", [&] {
    if (comm == nullptr) return NullArgument("mdopt_comm_rank", "comm");
    if (rank == nullptr) return NullArgument("mdopt_comm_rank", "rank");
    *rank = comm->shared->impl->rank();
    return MDOPT_SUCCESS;
  });
}

mdopt_status mdopt_comm_size(const mdopt_comm* comm, int* size) {
  return Guard("mdopt_comm_size", [&] {
    if (comm == nullptr) return NullArgument("mdopt_comm_size", "comm");
    if (size == nullptr) return NullArgument("mdopt_comm_size", "size");
    *size = comm->shared->impl->size();
    return MDOPT_SUCCESS;
  });
}

mdopt_status mdopt_comm_destroy(mdopt_comm* comm) {
  return Guard("mdopt_comm_destroy", [&] {
    delete comm;  // the handle's reference; optimizers on it keep theirs
    return MDOPT_SUCCESS;
  });
}

mdopt_status mdopt_create(mdopt_comm* comm, const char* options, mdopt_optimizer** out) {
  return Guard("mdopt_create", [&] {
    if (comm == nullptr) return NullArgument("mdopt_create", "comm");
    if (out == nullptr) return NullArgument("mdopt_create", "out");
    absl::StatusOr<mdopt::OptimizerOptions> o =
        mdopt::ParseOptimizerOptions(options == nullptr ? "" : options);
    if (!o.ok()) return Report(o.status());
    mdopt_status failure = MDOPT_SUCCESS;
    if (!CommUsable("mdopt_create", *comm->shared, &failure)) return failure;
    *out = new mdopt_optimizer{comm->shared,
                               std::make_unique<mdopt::Optimizer>(comm->shared->impl.get(), *o)};
    return MDOPT_SUCCESS;
  });
}

mdopt_status mdopt_add_group(mdopt_optimizer* opt, const char* name, const char* spec) {
  return Guard("mdopt_add_group", [&] {
    if (opt == nullptr) return NullArgument("mdopt_add_group", "opt");
    if (name == nullptr) return NullArgument("mdopt_add_group", "name");
    if (spec == nullptr) return NullArgument("mdopt_add_group", "spec");
    return Report(opt->impl->AddGroup(name, spec));
  });
}

mdopt_status mdopt_set_group_lr(mdopt_optimizer* opt, const char* group, double lr) {
  return Guard("mdopt_set_group_lr", [&] {
    if (opt == nullptr) return NullArgument("mdopt_set_group_lr", "opt");
    if (group == nullptr) return NullArgument("mdopt_set_group_lr", "group");
    return Report(opt->impl->SetGroupLr(group, lr));
  });
}

mdopt_status mdopt_set_group_hparam(mdopt_optimizer* opt, const char* group, const char* key,
                                    double value) {
  return Guard("mdopt_set_group_hparam", [&] {
    if (opt == nullptr) return NullArgument("mdopt_set_group_hparam", "opt");
    if (group == nullptr) return NullArgument("mdopt_set_group_hparam", "group");
    if (key == nullptr) return NullArgument("mdopt_set_group_hparam", "key");
    return Report(opt->impl->SetGroupHparam(group, key, value));
  });
}

mdopt_status mdopt_get_group_hparam(const mdopt_optimizer* opt, const char* group,
                                    const char* key, double* value) {
  return Guard("mdopt_get_group_hparam", [&] {
    if (opt == nullptr) return NullArgument("mdopt_get_group_hparam", "opt");
    if (group == nullptr) return NullArgument("mdopt_get_group_hparam", "group");
    if (key == nullptr) return NullArgument("mdopt_get_group_hparam", "key");
    if (value == nullptr) return NullArgument("mdopt_get_group_hparam", "value");
    return Report(opt->impl->GetGroupHparam(group, key, value));
  });
}

mdopt_status mdopt_get_group_lr(const mdopt_optimizer* opt, const char* group, double* lr,
                                double* gain_lr) {
  return Guard("mdopt_get_group_lr", [&] {
    if (opt == nullptr) return NullArgument("mdopt_get_group_lr", "opt");
    if (group == nullptr) return NullArgument("mdopt_get_group_lr", "group");
    return Report(opt->impl->GetGroupLr(group, lr, gain_lr));
  });
}

mdopt_status mdopt_add_param(mdopt_optimizer* opt, const mdopt_param_desc* desc,
                             int64_t* index_out) {
  return Guard("mdopt_add_param", [&] {
    if (opt == nullptr) return NullArgument("mdopt_add_param", "opt");
    if (desc == nullptr) return NullArgument("mdopt_add_param", "desc");
    mdopt_status failure = MDOPT_SUCCESS;
    if (!StructSizeOk("mdopt_add_param", "desc", "mdopt_param_desc", desc->struct_size,
                      MDOPT_PARAM_DESC_SIZE_V1, &failure)) {
      return failure;
    }
    const mdopt_param_desc in = ReadVersioned(desc);
    if (in.name == nullptr) return NullArgument("mdopt_add_param", "desc->name");
    if (in.group == nullptr) return NullArgument("mdopt_add_param", "desc->group");
    mdopt::ParamDescription d;
    d.name = in.name;
    d.group = in.group;
    d.ndim = in.ndim;
    for (int k = 0; k < 3; ++k) d.shape[k] = in.shape[k];
    d.param_dtype = in.param_dtype;
    d.grad_dtype = in.grad_dtype;
    d.param = in.param;
    d.grad = in.grad;
    d.radius_scale = in.radius_scale;
    absl::StatusOr<int64_t> index = opt->impl->AddParam(d);
    if (!index.ok()) return Report(index.status());
    if (index_out != nullptr) *index_out = *index;
    return MDOPT_SUCCESS;
  });
}

mdopt_status mdopt_set_pointers(mdopt_optimizer* opt, int64_t index, void* param,
                                const void* grad) {
  return Guard("mdopt_set_pointers", [&] {
    if (opt == nullptr) return NullArgument("mdopt_set_pointers", "opt");
    return Report(opt->impl->SetPointers(index, param, grad));
  });
}

mdopt_status mdopt_finalize(mdopt_optimizer* opt) {
  return Guard("mdopt_finalize", [&] {
    if (opt == nullptr) return NullArgument("mdopt_finalize", "opt");
    if (mdopt_status f = MDOPT_SUCCESS; !CommUsable("mdopt_finalize", *opt->comm, &f)) return f;
    return Report(opt->impl->Finalize());
  });
}

mdopt_status mdopt_step(mdopt_optimizer* opt, double lr_scale, void* stream,
                        mdopt_step_info* info_or_null) {
  return Guard("mdopt_step", [&] {
    if (opt == nullptr) return NullArgument("mdopt_step", "opt");
    if (mdopt_status f = MDOPT_SUCCESS; !CommUsable("mdopt_step", *opt->comm, &f)) return f;
    mdopt_status failure = MDOPT_SUCCESS;
    if (info_or_null != nullptr &&
        !StructSizeOk("mdopt_step", "info", "mdopt_step_info", info_or_null->struct_size,
                      MDOPT_STEP_INFO_SIZE_V1, &failure)) {
      return failure;
    }
    absl::StatusOr<mdopt::StepResult> r = opt->impl->Step(lr_scale, stream, info_or_null != nullptr);
    if (!r.ok()) return Report(r.status());
    if (info_or_null != nullptr) {
      mdopt_step_info info = MDOPT_STEP_INFO_INIT;
      info.step = r->step;
      info.skipped = r->skipped ? 1 : 0;
      info.grad_norm = r->grad_norm;
      info.seconds = r->seconds;
      info.exposed_comm_seconds = r->exposed_comm_seconds;
      info.comm_seconds = r->comm_seconds;
      info.bytes_sent = r->bytes_sent;
      WriteVersioned(info, info_or_null);
    }
    if (r->skipped) g_last_error.assign(r->skip_reason.data(), r->skip_reason.size());
    return MDOPT_SUCCESS;
  });
}

mdopt_status mdopt_grads_ready(mdopt_optimizer* opt, int64_t first_index, int64_t count,
                               void* stream) {
  return Guard("mdopt_grads_ready", [&] {
    if (opt == nullptr) return NullArgument("mdopt_grads_ready", "opt");
    if (mdopt_status f = MDOPT_SUCCESS; !CommUsable("mdopt_grads_ready", *opt->comm, &f)) return f;
    return Report(opt->impl->GradsReady(first_index, count, stream));
  });
}

mdopt_status mdopt_gather_params(mdopt_optimizer* opt, void* stream) {
  return Guard("mdopt_gather_params", [&] {
    if (opt == nullptr) return NullArgument("mdopt_gather_params", "opt");
    if (mdopt_status f = MDOPT_SUCCESS; !CommUsable("mdopt_gather_params", *opt->comm, &f)) return f;
    return Report(opt->impl->GatherParams(stream));
  });
}

mdopt_status mdopt_describe_plan(const mdopt_optimizer* opt, char* buf, size_t size,
                                 size_t* needed_or_null) {
  return PlanText("mdopt_describe_plan", opt, buf, size, needed_or_null,
                  [&](const mdopt::ShardPlan& plan) {
                    return plan.Describe(opt->impl->registry().params());
                  });
}

mdopt_status mdopt_plan_json(const mdopt_optimizer* opt, char* buf, size_t size,
                             size_t* needed_or_null) {
  return PlanText("mdopt_plan_json", opt, buf, size, needed_or_null,
                  [](const mdopt::ShardPlan& plan) { return plan.ToJson(); });
}

mdopt_status mdopt_group_info(const mdopt_optimizer* opt, const char* group,
                              mdopt_group_stats* out) {
  return Guard("mdopt_group_info", [&] {
    if (opt == nullptr) return NullArgument("mdopt_group_info", "opt");
    if (mdopt_status f = MDOPT_SUCCESS; !CommUsable("mdopt_group_info", *opt->comm, &f)) return f;
    if (group == nullptr) return NullArgument("mdopt_group_info", "group");
    if (out == nullptr) return NullArgument("mdopt_group_info", "out");
    mdopt_status failure = MDOPT_SUCCESS;
    if (!StructSizeOk("mdopt_group_info", "out", "mdopt_group_stats", out->struct_size,
                      MDOPT_GROUP_STATS_SIZE_V1, &failure)) {
      return failure;
    }
    absl::StatusOr<mdopt::GroupInfo> g = opt->impl->LastStepOfGroup(group);
    if (!g.ok()) return Report(g.status());
    mdopt_group_stats info = MDOPT_GROUP_STATS_INIT;
    info.matrices = g->matrices;
    info.orthogonalized = g->orthogonalized;
    info.projected = g->projected;
    info.gain_stepped = g->gain_stepped;
    info.skipped = g->skipped;
    info.mean_relative_update = g->mean_relative_update;
    WriteVersioned(info, out);
    return MDOPT_SUCCESS;
  });
}

mdopt_status mdopt_save(mdopt_optimizer* opt, const char* dir) {
  return Guard("mdopt_save", [&] {
    if (opt == nullptr) return NullArgument("mdopt_save", "opt");
    if (mdopt_status f = MDOPT_SUCCESS; !CommUsable("mdopt_save", *opt->comm, &f)) return f;
    if (dir == nullptr) return NullArgument("mdopt_save", "dir");
    return Report(opt->impl->Save(dir));
  });
}

mdopt_status mdopt_load(mdopt_optimizer* opt, const char* dir) {
  return Guard("mdopt_load", [&] {
    if (opt == nullptr) return NullArgument("mdopt_load", "opt");
    if (mdopt_status f = MDOPT_SUCCESS; !CommUsable("mdopt_load", *opt->comm, &f)) return f;
    if (dir == nullptr) return NullArgument("mdopt_load", "dir");
    return Report(opt->impl->Load(dir));
  });
}

mdopt_status mdopt_state_bytes(const mdopt_optimizer* opt, int64_t* bytes) {
  return BytesQuery("mdopt_state_bytes", opt, bytes,
                    [](const mdopt::Optimizer& o) { return o.StateBytes(); });
}

mdopt_status mdopt_workspace_bytes(const mdopt_optimizer* opt, int64_t* bytes) {
  return BytesQuery("mdopt_workspace_bytes", opt, bytes,
                    [](const mdopt::Optimizer& o) { return o.WorkspaceBytes(); });
}

mdopt_status mdopt_get_state(const mdopt_optimizer* opt, int64_t index, const char* field,
                             double* out, int64_t count, int64_t* count_out) {
  return Guard("mdopt_get_state", [&] {
    if (opt == nullptr) return NullArgument("mdopt_get_state", "opt");
    if (mdopt_status f = MDOPT_SUCCESS; !CommUsable("mdopt_get_state", *opt->comm, &f)) return f;
    if (field == nullptr) return NullArgument("mdopt_get_state", "field");
    absl::StatusOr<std::vector<double>> v = opt->impl->GetState(index, field);
    if (!v.ok()) return Report(v.status());
    const int64_t n = static_cast<int64_t>(v->size());
    if (count_out != nullptr) *count_out = n;
    if (out == nullptr) return MDOPT_SUCCESS;
    if (count != n) {
      return Fail(MDOPT_INVALID_ARGUMENT,
                  absl::StrCat("mdopt_get_state: field '", field, "' has ", n,
                               " values, count = ", count));
    }
    std::memcpy(out, v->data(), sizeof(double) * v->size());
    return MDOPT_SUCCESS;
  });
}

mdopt_status mdopt_destroy(mdopt_optimizer* opt) {
  return Guard("mdopt_destroy", [&] {
    delete opt;
    return MDOPT_SUCCESS;
  });
}

}  // extern "C"
