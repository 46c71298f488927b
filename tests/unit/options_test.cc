// ParseOptimizerOptions (dist_opt/options.h): the defaults, every key's accepted values
// with the field each sets, and refusals (bad values, unknown keys, malformed text) whose
// messages name the key or token at fault.
#include <gtest/gtest.h>

#include <string>

#include "absl/status/status.h"
#include "dist_opt/options.h"
#include "kernels/backend_factory.h"
#include "kernels/cpu/newton_schulz_bf16.h"

namespace mdopt {
namespace {

OptimizerOptions MustParse(const std::string& text) {
  absl::StatusOr<OptimizerOptions> o = ParseOptimizerOptions(text);
  EXPECT_TRUE(o.ok()) << text << ": " << o.status();
  return o.ok() ? *o : OptimizerOptions{};
}

TEST(OptimizerOptionsParse, EmptyTextGivesTheDefaults) {
  for (const char* text : {"", "  ", "\t\n", "device=cpu"}) {
    SCOPED_TRACE(text);
    const OptimizerOptions o = MustParse(text);
    EXPECT_EQ(o.kernels, OptimizerOptions::Kernels::kFast);
    EXPECT_EQ(o.threads, 0);
    EXPECT_FALSE(o.ns_bf16);
    EXPECT_FALSE(o.ns_comm_bf16);
    EXPECT_EQ(o.ns_form, kernels::NsForm::kAuto);
    EXPECT_FALSE(o.grads_reduced);
    EXPECT_FALSE(o.gather_deferred);
    EXPECT_EQ(o.bucket_bytes, int64_t{16} << 20);
    EXPECT_EQ(o.comm_timeout_s, 600.0);
    EXPECT_FALSE(o.update_norms);
    EXPECT_EQ(o.comm_pad, OptimizerOptions::CommPad::kAuto);
  }
}

TEST(OptimizerOptionsParse, EveryKeySetsItsField) {
  EXPECT_EQ(MustParse("threads=1").threads, 1);
  EXPECT_EQ(MustParse("threads=4096").threads, 4096);
  EXPECT_EQ(MustParse("kernels=reference").kernels, OptimizerOptions::Kernels::kReference);
  EXPECT_EQ(MustParse("kernels=fast").kernels, OptimizerOptions::Kernels::kFast);
  EXPECT_FALSE(MustParse("ns_dtype=f32").ns_bf16);
  EXPECT_EQ(MustParse("ns_form=auto").ns_form, kernels::NsForm::kAuto);
  EXPECT_EQ(MustParse("ns_form=standard").ns_form, kernels::NsForm::kStandard);
  EXPECT_EQ(MustParse("ns_form=gram").ns_form, kernels::NsForm::kGram);
  EXPECT_TRUE(MustParse("ns_comm_dtype=bf16").ns_comm_bf16);
  EXPECT_FALSE(MustParse("ns_comm_dtype=f32").ns_comm_bf16);
  EXPECT_TRUE(MustParse("grads=reduced").grads_reduced);
  EXPECT_FALSE(MustParse("grads=local").grads_reduced);
  EXPECT_TRUE(MustParse("gather=deferred").gather_deferred);
  EXPECT_FALSE(MustParse("gather=eager").gather_deferred);
  EXPECT_EQ(MustParse("bucket_mb=1").bucket_bytes, int64_t{1} << 20);
  EXPECT_EQ(MustParse("bucket_mb=0.5").bucket_bytes, int64_t{1} << 19);
  EXPECT_EQ(MustParse("bucket_mb=1e6").bucket_bytes, int64_t{1000000} << 20);
  // Below a byte it is one byte: every bucket holds something.
  EXPECT_EQ(MustParse("bucket_mb=1e-9").bucket_bytes, 1);
  EXPECT_EQ(MustParse("comm_timeout_s=2.5").comm_timeout_s, 2.5);
  EXPECT_EQ(MustParse("comm_timeout_s=1e7").comm_timeout_s, 1e7);
  EXPECT_TRUE(MustParse("update_norms=1").update_norms);
  EXPECT_FALSE(MustParse("update_norms=0").update_norms);
  EXPECT_EQ(MustParse("comm_pad=auto").comm_pad, OptimizerOptions::CommPad::kAuto);
  EXPECT_EQ(MustParse("comm_pad=on").comm_pad, OptimizerOptions::CommPad::kOn);
  EXPECT_EQ(MustParse("comm_pad=off").comm_pad, OptimizerOptions::CommPad::kOff);
  // All together, in any order and with any whitespace.
  const OptimizerOptions o = MustParse(
      "\tupdate_norms=1 gather=deferred  grads=reduced\nbucket_mb=2 threads=3 kernels=reference "
      "comm_timeout_s=30 ns_comm_dtype=bf16 ns_dtype=f32 device=cpu ");
  EXPECT_EQ(o.threads, 3);
  EXPECT_EQ(o.kernels, OptimizerOptions::Kernels::kReference);
  EXPECT_TRUE(o.update_norms && o.gather_deferred && o.grads_reduced && o.ns_comm_bf16);
  EXPECT_FALSE(o.ns_bf16);
  EXPECT_EQ(o.bucket_bytes, int64_t{2} << 20);
  EXPECT_EQ(o.comm_timeout_s, 30.0);
}

// ns_dtype=bf16 is accepted exactly where this build and CPU have a bf16 Newton-Schulz.
TEST(OptimizerOptionsParse, NsDtypeBf16FollowsAvailability) {
  absl::StatusOr<OptimizerOptions> o = ParseOptimizerOptions("ns_dtype=bf16");
  if (kernels::fast::Bf16NewtonSchulz::Available()) {
    ASSERT_TRUE(o.ok()) << o.status();
    EXPECT_TRUE(o->ns_bf16);
  } else {
    ASSERT_FALSE(o.ok());
    EXPECT_EQ(o.status().code(), absl::StatusCode::kUnimplemented);
    EXPECT_NE(o.status().message().find("ns_dtype=bf16"), absl::string_view::npos) << o.status();
  }
}

// Every ns_form goes with either ns_dtype (the bf16 Newton-Schulz has both forms too).
TEST(OptimizerOptionsParse, NsFormWithEitherNsDtype) {
  EXPECT_EQ(MustParse("ns_dtype=f32 ns_form=gram").ns_form, kernels::NsForm::kGram);
  if (!kernels::fast::Bf16NewtonSchulz::Available()) GTEST_SKIP() << "no bf16 Newton-Schulz here";
  EXPECT_EQ(MustParse("ns_dtype=bf16 ns_form=standard").ns_form, kernels::NsForm::kStandard);
  EXPECT_EQ(MustParse("ns_form=auto ns_dtype=bf16").ns_form, kernels::NsForm::kAuto);
  for (const char* text : {"ns_dtype=bf16 ns_form=gram", "ns_form=gram ns_dtype=bf16"}) {
    const OptimizerOptions o = MustParse(text);
    EXPECT_TRUE(o.ns_bf16) << text;
    EXPECT_EQ(o.ns_form, kernels::NsForm::kGram) << text;
  }
}

// device=cuda:K is a valid request: a build with the CUDA backend takes it (Newton-Schulz
// then defaults to bf16, the tensor cores' type), one without refuses it as unsupported.
TEST(OptimizerOptionsParse, CudaDeviceDependsOnTheBuild) {
  absl::StatusOr<OptimizerOptions> o = ParseOptimizerOptions("device=cuda:1");
  if (!kernels::CudaBackendBuilt()) {
    EXPECT_EQ(o.status().code(), absl::StatusCode::kUnimplemented);
    EXPECT_EQ(o.status().message(), "option device=cuda:1: this build of mdopt has no CUDA backend");
    return;
  }
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(o->device, "cuda:1");
  EXPECT_TRUE(o->ns_bf16);
  EXPECT_FALSE(MustParse("device=cuda:0 ns_dtype=f32").ns_bf16);
  EXPECT_FALSE(MustParse("device=cpu").ns_bf16);
  // On a GPU ns_dtype=bf16 does not depend on this CPU, whatever the order of the keys.
  EXPECT_TRUE(MustParse("ns_dtype=bf16 device=cuda:0").ns_bf16);
  const absl::StatusOr<OptimizerOptions> ref = ParseOptimizerOptions("kernels=reference device=cuda:0");
  EXPECT_EQ(ref.status().code(), absl::StatusCode::kUnimplemented);
  EXPECT_EQ(ref.status().message(), "option kernels=reference runs on the CPU only (device=cuda:0)");
}

TEST(OptimizerOptionsParse, RefusalsNameTheKey) {
  struct Case {
    const char* text;
    absl::StatusCode code;
    const char* message;
  };
  using C = absl::StatusCode;
  const Case cases[] = {
      {"device=cuda:-1", C::kInvalidArgument, "option 'device': bad value 'cuda:-1' (cpu or cuda:K)"},
      {"device=gpu", C::kInvalidArgument, "option 'device': bad value 'gpu' (cpu or cuda:K)"},
      {"threads=0", C::kInvalidArgument, "option 'threads': bad value '0' (an integer in [1, 4096])"},
      {"threads=4097", C::kInvalidArgument, "option 'threads': bad value '4097' (an integer in [1, 4096])"},
      {"threads=2.0", C::kInvalidArgument, "option 'threads': bad value '2.0' (an integer in [1, 4096])"},
      {"kernels=slow", C::kInvalidArgument, "option 'kernels': bad value 'slow' (fast or reference)"},
      {"ns_dtype=f16", C::kInvalidArgument, "option 'ns_dtype': bad value 'f16' (f32 or bf16)"},
      {"ns_form=Gram", C::kInvalidArgument, "option 'ns_form': bad value 'Gram' (auto, standard or gram)"},
      {"ns_form=", C::kInvalidArgument, "option: 'ns_form=' is not of the form key=value (empty value)"},
      {"ns_comm_dtype=f64", C::kInvalidArgument, "option 'ns_comm_dtype': bad value 'f64' (f32 or bf16)"},
      {"grads=summed", C::kInvalidArgument, "option 'grads': bad value 'summed' (local or reduced)"},
      {"gather=lazy", C::kInvalidArgument, "option 'gather': bad value 'lazy' (eager or deferred)"},
      {"bucket_mb=0", C::kInvalidArgument, "option 'bucket_mb': bad value '0' (a number in (0, 1e6])"},
      {"bucket_mb=1e7", C::kInvalidArgument, "option 'bucket_mb': bad value '1e7' (a number in (0, 1e6])"},
      {"bucket_mb=nan", C::kInvalidArgument, "option 'bucket_mb': bad value 'nan' (a number in (0, 1e6])"},
      {"comm_timeout_s=-1", C::kInvalidArgument, "option 'comm_timeout_s': bad value '-1' (seconds, in (0, 1e7])"},
      {"comm_timeout_s=inf", C::kInvalidArgument, "option 'comm_timeout_s': bad value 'inf' (seconds, in (0, 1e7])"},
      {"update_norms=yes", C::kInvalidArgument, "option 'update_norms': bad value 'yes' (0 or 1)"},
      {"comm_pad=1", C::kInvalidArgument, "option 'comm_pad': bad value '1' (auto, on or off)"},
      {"grad_comm_dtype=fp16", C::kInvalidArgument,
       "option 'grad_comm_dtype': bad value 'fp16' (f32 or bf16)"},
      {"threads=2 colour=red", C::kInvalidArgument,
       "option 'colour' is unknown (known: device, threads, kernels, ns_dtype, ns_form, ns_comm_dtype, "
       "grad_comm_dtype, grads, gather, bucket_mb, comm_timeout_s, update_norms, comm_pad)"},
      // Malformed text, from the shared tokeniser.
      {"threads=1 threads=2", C::kInvalidArgument, "option key 'threads' is given twice"},
      {"threads", C::kInvalidArgument, "option: 'threads' is not of the form key=value (no '=')"},
      {"kernels=", C::kInvalidArgument, "option: 'kernels=' is not of the form key=value (empty value)"},
      {"=cpu", C::kInvalidArgument, "option: '=cpu' is not of the form key=value (empty key)"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.text);
    absl::StatusOr<OptimizerOptions> o = ParseOptimizerOptions(c.text);
    ASSERT_FALSE(o.ok());
    EXPECT_EQ(o.status().code(), c.code);
    EXPECT_EQ(o.status().message(), c.message);
  }
}

}  // namespace
}  // namespace mdopt
