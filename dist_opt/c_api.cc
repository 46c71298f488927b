// The C ABI of include/mdopt: thin shims that check pointers and struct sizes, call the C++
// optimizer, and turn absl::Status (and any exception) into an mdopt_status plus a
// thread-local message. Nothing thrown inside crosses this file.
#include <cstring>
#include <exception>
#include <new>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "comm/communicator.h"
#include "dist_opt/optimizer.h"
#include "mdopt/mdopt.h"

struct mdopt_comm {
  std::unique_ptr<mdopt::Communicator> impl;
};

struct mdopt_optimizer {
  std::unique_ptr<mdopt::Optimizer> impl;
};

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
    default: return MDOPT_INTERNAL;
  }
}

mdopt_status Fail(mdopt_status code, std::string message) {
  g_last_error = std::move(message);
  return code;
}

mdopt_status Report(const absl::Status& s) {
  if (s.ok()) return MDOPT_SUCCESS;
  return Fail(ToCode(s.code()), std::string(s.message()));
}

// Runs body, turning exceptions into MDOPT_INTERNAL so none crosses the ABI.
template <typename F>
mdopt_status Guard(const char* call, F&& body) {
  g_last_error.clear();
  try {
    return body();
  } catch (const std::bad_alloc&) {
    return Fail(MDOPT_INTERNAL, absl::StrCat(call, ": out of memory"));
  } catch (const std::exception& e) {
    return Fail(MDOPT_INTERNAL, absl::StrCat(call, ": ", e.what()));
  } catch (...) {
    return Fail(MDOPT_INTERNAL, absl::StrCat(call, ": unknown exception"));
  }
}

mdopt_status NullArgument(const char* call, const char* arg) {
  return Fail(MDOPT_INVALID_ARGUMENT, absl::StrCat(call, ": ", arg, " is NULL"));
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
  }
  return "MDOPT_UNKNOWN_STATUS";
}

const char* mdopt_last_error(void) { return g_last_error.c_str(); }

int mdopt_abi_version(void) { return MDOPT_ABI_VERSION; }

const char* mdopt_version_string(void) { return MDOPT_VERSION_STRING; }

mdopt_status mdopt_comm_create_local(mdopt_comm** out) {
  return Guard("mdopt_comm_create_local", [&] {
    if (out == nullptr) return NullArgument("mdopt_comm_create_local", "out");
    *out = new mdopt_comm{mdopt::MakeLocalCommunicator()};
    return MDOPT_SUCCESS;
  });
}

mdopt_status mdopt_comm_create_mpi(void* mpi_comm_or_null, mdopt_comm** out) {
  return Guard("mdopt_comm_create_mpi", [&] {
    if (out == nullptr) return NullArgument("mdopt_comm_create_mpi", "out");
    absl::StatusOr<std::unique_ptr<mdopt::Communicator>> c =
        mdopt::MakeMpiCommunicator(mpi_comm_or_null);
    if (!c.ok()) return Report(c.status());
    *out = new mdopt_comm{*std::move(c)};
    return MDOPT_SUCCESS;
  });
}

mdopt_status mdopt_comm_rank(const mdopt_comm* comm, int* rank) {
  return Guard("mdopt_comm_rank", [&] {
    if (comm == nullptr) return NullArgument("mdopt_comm_rank", "comm");
    if (rank == nullptr) return NullArgument("mdopt_comm_rank", "rank");
    *rank = comm->impl->rank();
    return MDOPT_SUCCESS;
  });
}

mdopt_status mdopt_comm_size(const mdopt_comm* comm, int* size) {
  return Guard("mdopt_comm_size", [&] {
    if (comm == nullptr) return NullArgument("mdopt_comm_size", "comm");
    if (size == nullptr) return NullArgument("mdopt_comm_size", "size");
    *size = comm->impl->size();
    return MDOPT_SUCCESS;
  });
}

mdopt_status mdopt_comm_destroy(mdopt_comm* comm) {
  return Guard("mdopt_comm_destroy", [&] {
    delete comm;
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
    *out = new mdopt_optimizer{std::make_unique<mdopt::Optimizer>(comm->impl.get(), *o)};
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

mdopt_status mdopt_add_param(mdopt_optimizer* opt, const mdopt_param_desc* desc,
                             int64_t* index_out) {
  return Guard("mdopt_add_param", [&] {
    if (opt == nullptr) return NullArgument("mdopt_add_param", "opt");
    if (desc == nullptr) return NullArgument("mdopt_add_param", "desc");
    if (desc->struct_size < sizeof(mdopt_param_desc)) {
      return Fail(MDOPT_INVALID_ARGUMENT,
                  absl::StrCat("mdopt_add_param: desc->struct_size = ", desc->struct_size,
                               ", expected sizeof(mdopt_param_desc) = ", sizeof(mdopt_param_desc)));
    }
    if (desc->name == nullptr) return NullArgument("mdopt_add_param", "desc->name");
    if (desc->group == nullptr) return NullArgument("mdopt_add_param", "desc->group");
    mdopt::ParamDescription d;
    d.name = desc->name;
    d.group = desc->group;
    d.ndim = desc->ndim;
    for (int k = 0; k < 3; ++k) d.shape[k] = desc->shape[k];
    d.param_dtype = static_cast<int>(desc->param_dtype);
    d.grad_dtype = static_cast<int>(desc->grad_dtype);
    d.param = desc->param;
    d.grad = desc->grad;
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
    return Report(opt->impl->Finalize());
  });
}

mdopt_status mdopt_step(mdopt_optimizer* opt, double lr_scale, void* stream,
                        mdopt_step_info* info_or_null) {
  return Guard("mdopt_step", [&] {
    if (opt == nullptr) return NullArgument("mdopt_step", "opt");
    if (info_or_null != nullptr && info_or_null->struct_size < sizeof(mdopt_step_info)) {
      return Fail(MDOPT_INVALID_ARGUMENT,
                  absl::StrCat("mdopt_step: info->struct_size = ", info_or_null->struct_size,
                               ", expected sizeof(mdopt_step_info) = ", sizeof(mdopt_step_info)));
    }
    absl::StatusOr<mdopt::StepResult> r = opt->impl->Step(lr_scale, stream);
    if (!r.ok()) return Report(r.status());
    if (info_or_null != nullptr) {
      info_or_null->step = r->step;
      info_or_null->skipped = r->skipped ? 1 : 0;
      info_or_null->grad_norm = r->grad_norm;
      info_or_null->seconds = r->seconds;
      info_or_null->exposed_comm_seconds = r->exposed_comm_seconds;
    }
    if (r->skipped) g_last_error = r->skip_reason;
    return MDOPT_SUCCESS;
  });
}

mdopt_status mdopt_save(mdopt_optimizer* opt, const char* dir) {
  return Guard("mdopt_save", [&] {
    if (opt == nullptr) return NullArgument("mdopt_save", "opt");
    if (dir == nullptr) return NullArgument("mdopt_save", "dir");
    return Report(opt->impl->Save(dir));
  });
}

mdopt_status mdopt_load(mdopt_optimizer* opt, const char* dir) {
  return Guard("mdopt_load", [&] {
    if (opt == nullptr) return NullArgument("mdopt_load", "opt");
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
