#include "dist_opt/options.h"

#include <algorithm>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "dist_opt/key_values.h"
#include "kernels/backend_factory.h"

namespace mdopt {

absl::StatusOr<OptimizerOptions> ParseOptimizerOptions(absl::string_view options) {
  absl::StatusOr<std::vector<KeyValue>> pairs = SplitKeyValues(options, "option");
  if (!pairs.ok()) return pairs.status();
  OptimizerOptions o;
  bool ns_dtype_given = false;
  for (const auto& [key, value] : *pairs) {
    if (key == "device") {
      if (value == "cpu") continue;
      int device;
      absl::string_view ordinal = value;
      if (absl::ConsumePrefix(&ordinal, "cuda:") && absl::SimpleAtoi(ordinal, &device) &&
          device >= 0 && device < 1024) {
        if (!kernels::CudaBackendBuilt()) {
          return absl::UnimplementedError(absl::StrCat(
              "option device=cuda:", device, ": this build of mdopt has no CUDA backend"));
        }
        o.device = absl::StrCat("cuda:", device);
        continue;
      }
      return absl::InvalidArgumentError(
          absl::StrCat("option 'device': bad value '", value, "' (cpu or cuda:K)"));
    } else if (key == "threads") {
      if (!absl::SimpleAtoi(value, &o.threads) || o.threads < 1 || o.threads > 4096) {
        return absl::InvalidArgumentError(
            absl::StrCat("option 'threads': bad value '", value, "' (an integer in [1, 4096])"));
      }
    } else if (key == "kernels") {
      if (value == "fast") {
        o.kernels = OptimizerOptions::Kernels::kFast;
      } else if (value == "reference") {
        o.kernels = OptimizerOptions::Kernels::kReference;
      } else {
        return absl::InvalidArgumentError(
            absl::StrCat("option 'kernels': bad value '", value, "' (fast or reference)"));
      }
    } else if (key == "ns_dtype") {
      ns_dtype_given = true;
      if (value == "f32") {
        o.ns_bf16 = false;
      } else if (value == "bf16") {
        o.ns_bf16 = true;
      } else {
        return absl::InvalidArgumentError(
            absl::StrCat("option 'ns_dtype': bad value '", value, "' (f32 or bf16)"));
      }
    } else if (key == "ns_form") {
      if (value == "auto") {
        o.ns_form = kernels::NsForm::kAuto;
      } else if (value == "standard") {
        o.ns_form = kernels::NsForm::kStandard;
      } else if (value == "gram") {
        o.ns_form = kernels::NsForm::kGram;
      } else {
        return absl::InvalidArgumentError(absl::StrCat(
            "option 'ns_form': bad value '", value, "' (auto, standard or gram)"));
      }
    } else if (key == "grad_comm_dtype") {
      if (value != "f32" && value != "bf16") {
        return absl::InvalidArgumentError(
            absl::StrCat("option 'grad_comm_dtype': bad value '", value, "' (f32 or bf16)"));
      }
      o.grad_comm_bf16 = value == "bf16";
    } else if (key == "ns_comm_dtype") {
      if (value != "f32" && value != "bf16") {
        return absl::InvalidArgumentError(
            absl::StrCat("option 'ns_comm_dtype': bad value '", value, "' (f32 or bf16)"));
      }
      o.ns_comm_bf16 = value == "bf16";
    } else if (key == "grads") {
      if (value != "local" && value != "reduced") {
        return absl::InvalidArgumentError(
            absl::StrCat("option 'grads': bad value '", value, "' (local or reduced)"));
      }
      o.grads_reduced = value == "reduced";
    } else if (key == "gather") {
      if (value != "eager" && value != "deferred") {
        return absl::InvalidArgumentError(
            absl::StrCat("option 'gather': bad value '", value, "' (eager or deferred)"));
      }
      o.gather_deferred = value == "deferred";
    } else if (key == "bucket_mb") {
      double mb = 0;
      if (!absl::SimpleAtod(value, &mb) || !(mb > 0) || mb > 1e6) {
        return absl::InvalidArgumentError(
            absl::StrCat("option 'bucket_mb': bad value '", value, "' (a number in (0, 1e6])"));
      }
      o.bucket_bytes = std::max<int64_t>(1, static_cast<int64_t>(mb * (1 << 20)));
    } else if (key == "comm_timeout_s") {
      if (!absl::SimpleAtod(value, &o.comm_timeout_s) || !(o.comm_timeout_s > 0) ||
          o.comm_timeout_s > 1e7) {
        return absl::InvalidArgumentError(absl::StrCat(
            "option 'comm_timeout_s': bad value '", value, "' (seconds, in (0, 1e7])"));
      }
    } else if (key == "update_norms") {
      if (value != "0" && value != "1") {
        return absl::InvalidArgumentError(
            absl::StrCat("option 'update_norms': bad value '", value, "' (0 or 1)"));
      }
      o.update_norms = value == "1";
    } else if (key == "comm_pad") {
      if (value == "auto") {
        o.comm_pad = OptimizerOptions::CommPad::kAuto;
      } else if (value == "on") {
        o.comm_pad = OptimizerOptions::CommPad::kOn;
      } else if (value == "off") {
        o.comm_pad = OptimizerOptions::CommPad::kOff;
      } else {
        return absl::InvalidArgumentError(
            absl::StrCat("option 'comm_pad': bad value '", value, "' (auto, on or off)"));
      }
    } else {
      return absl::InvalidArgumentError(absl::StrCat(
          "option '", key, "' is unknown (known: device, threads, kernels, ns_dtype, "
          "ns_form, ns_comm_dtype, grad_comm_dtype, grads, gather, bucket_mb, comm_timeout_s, update_norms, comm_pad)"));
    }
  }
  // Newton-Schulz in bf16 by default on a GPU (tensor cores), in float32 on the CPU; a CPU
  // takes bf16 only where its matmul has it.
  const bool cuda = o.device != "cpu";
  if (!ns_dtype_given) o.ns_bf16 = cuda;
  if (o.ns_bf16 && !cuda) {
    const std::string why = kernels::Bf16NsUnavailableReason();
    if (!why.empty()) return absl::UnimplementedError(absl::StrCat("option ns_dtype=bf16: ", why));
  }
  if (cuda && o.kernels == OptimizerOptions::Kernels::kReference) {
    return absl::UnimplementedError(absl::StrCat(
        "option kernels=reference runs on the CPU only (device=", o.device, ")"));
  }
  return o;
}

}  // namespace mdopt
