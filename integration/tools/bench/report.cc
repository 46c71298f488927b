#include "report.h"

#include <cmath>
#include <map>
#include <utility>

namespace mdopt_bench {
namespace {

std::string JsonString(const std::string& s) {
  std::string out = "\"";
  for (unsigned char c : s) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\t': out += "\\t"; break;
      case '\r': out += "\\r"; break;
      default:
        if (c < 0x20) {
          char buf[8];
          std::snprintf(buf, sizeof buf, "\\u%04x", c);
          out += buf;
        } else {
          out += static_cast<char>(c);
        }
    }
  }
  return out + "\"";
}

// JSON has no NaN or Inf; an unmeasured or broken value becomes null.
std::string JsonNumber(double v) {
  if (!std::isfinite(v)) return "null";
  char buf[40];
  std::snprintf(buf, sizeof buf, "%.9g", v);
  return buf;
}

std::string JsonMsArray(const std::vector<double>& seconds) {
  std::string out = "[";
  for (size_t k = 0; k < seconds.size(); ++k) {
    if (k > 0) out += ", ";
    out += JsonNumber(1e3 * seconds[k]);
  }
  return out + "]";
}

std::string ThreadsText(const MachineInfo& m) {
  if (m.threads > 0) return std::to_string(m.threads);
  return "default (OMP_NUM_THREADS=" +
         (m.omp_num_threads.empty() ? std::string("unset") : m.omp_num_threads) + ")";
}

std::string ModelText(const BenchSetup& s) {
  if (s.model == "shapes") return "shapes file " + s.shapes_file;
  return "gpt d_model=" + std::to_string(s.gpt.d_model) + " layers=" +
         std::to_string(s.gpt.layers) + " vocab=" + std::to_string(s.gpt.vocab) +
         " ffn_mult=" + std::to_string(s.gpt.ffn_mult);
}

std::string IsaText(const std::string& isa) {
  if (isa == "avx512") return "AVX-512";
  if (isa == "avx2") return "AVX2";
  return isa;
}

// The cost of MD decoupling: each md-* preset's median fast step over its plain baseline's.
void PrintComparisons(std::FILE* out, const std::vector<BenchRow>& rows) {
  std::map<std::string, double> fast_ms;
  for (const BenchRow& r : rows)
    if (r.engine == EngineName(EngineKind::kFast)) fast_ms[r.preset] = r.median_ms();
  bool any = false;
  for (const auto& [md, plain] : {std::pair<const char*, const char*>{"md-muon", "muon"},
                                  {"md-adamw", "adamw"}}) {
    auto a = fast_ms.find(md), b = fast_ms.find(plain);
    if (a == fast_ms.end() || b == fast_ms.end() || !(b->second > 0.0)) continue;
    if (!any) std::fprintf(out, "\n");
    any = true;
    std::fprintf(out, "%s costs %.2fx plain %s per step (fast engine, median %.3f ms vs %.3f ms)\n",
                 md, a->second / b->second, plain, a->second, b->second);
  }
}

}  // namespace

void FillReferenceRatios(std::vector<BenchRow>* rows) {
  std::map<std::string, double> reference_ms;
  for (const BenchRow& r : *rows)
    if (r.engine == EngineName(EngineKind::kReference)) reference_ms[r.preset] = r.median_ms();
  for (BenchRow& r : *rows) {
    if (r.engine != EngineName(EngineKind::kFast)) continue;
    auto it = reference_ms.find(r.preset);
    if (it != reference_ms.end() && it->second > 0.0) r.ratio_to_reference = r.median_ms() / it->second;
  }
}

void PrintTable(std::FILE* out, const MachineInfo& m, const BenchSetup& s,
                const std::vector<BenchRow>& rows) {
  std::fprintf(out, "mdopt-bench: mdopt %s (ABI %d), %s\n", m.mdopt_version.c_str(),
               m.abi_version, m.date_utc.c_str());
  std::fprintf(out, "cpu: %s, %d logical CPUs, ISA %s; BLAS %s; threads: %s; oneDNN bf16: %s\n",
               m.cpu_model.c_str(), m.logical_cpus, IsaText(m.isa).c_str(), m.blas.c_str(),
               ThreadsText(m).c_str(), m.onednn_bf16.c_str());
  std::fprintf(out, "model: %s; %lld tensors, %lld params; param %s, grad %s; NS %s; seed %llu\n",
               ModelText(s).c_str(), static_cast<long long>(s.tensors),
               static_cast<long long>(s.params), s.param_dtype.c_str(), s.grad_dtype.c_str(),
               s.ns_dtype.c_str(),
               static_cast<unsigned long long>(s.seed));
  std::fprintf(out, "steps: fast %d timed after %d warm-up", s.steps, s.warmup);
  if (s.reference) std::fprintf(out, "; reference %d timed, no warm-up", s.reference_steps);
  std::fprintf(out, "; medians over the timed steps");
  std::fprintf(out, "; times from mdopt_step_info.seconds unless 'wall'\n");
  if (s.stream.elements > 0) {
    std::fprintf(out,
                 "memory: %.1f GB/s in place (4 arrays read, 3 written: Adam's pattern), triad "
                 "%.1f GB/s; %d threads, 4 x %lld MiB, medians\n",
                 s.stream.inplace_gbps, s.stream.triad_gbps, s.stream.threads,
                 static_cast<long long>(s.stream.elements * 4 >> 20));
  }
  std::fprintf(out, "\n");

  std::fprintf(out, "%-9s %-9s %11s %5s %10s %10s %11s %12s %9s %12s %9s %9s %6s %9s\n",
               "preset", "engine", "params", "steps", "median ms", "mean ms", "wall med ms",
               "ns per param", "state B/p", "workspace B", "fast/ref", "model B/p", "GB/s",
               "floor ms");
  for (const BenchRow& r : rows) {
    char ratio[32] = "-", model[32] = "-", gbps[32] = "-", floor_ms[32] = "-";
    if (r.ratio_to_reference > 0.0) std::snprintf(ratio, sizeof ratio, "%.4f", r.ratio_to_reference);
    if (r.model_bytes > 0) {
      std::snprintf(model, sizeof model, "%.1f", r.model_bytes_per_param());
      std::snprintf(gbps, sizeof gbps, "%.1f", r.achieved_gbps());
      if (s.stream.inplace_gbps > 0.0) {
        std::snprintf(floor_ms, sizeof floor_ms, "%.1f",
                      1e3 * static_cast<double>(r.model_bytes) / (s.stream.inplace_gbps * 1e9));
      }
    }
    std::fprintf(out, "%-9s %-9s %11lld %5d %10.3f %10.3f %11.3f %12.3f %9.2f %12lld %9s %9s %6s %9s\n",
                 r.preset.c_str(), r.engine.c_str(), static_cast<long long>(r.params), r.steps,
                 r.median_ms(), r.mean_ms(), r.wall_median_ms(), r.ns_per_param(),
                 r.state_bytes_per_param(), static_cast<long long>(r.workspace_bytes), ratio,
                 model, gbps, floor_ms);
  }
  PrintComparisons(out, rows);
  std::fprintf(out,
               "\nColumns: median/mean ms = time of one optimizer step (mdopt_step_info.seconds);\n"
               "  wall med ms = the same measured around the call; ns per param = median step\n"
               "  time divided by the parameter count (nanoseconds per parameter, not Newton-Schulz);\n"
               "  state B/p = optimizer-state bytes per parameter (mdopt_state_bytes / params; f32\n"
               "  weights are their own master copy, so Adam's two moments are 8 B/p); workspace B =\n"
               "  transient buffers (mdopt_workspace_bytes); fast/ref = the fast float32 engine's\n"
               "  median over the float64 reference engine's (0.01 = 100x faster; --reference);\n"
               "  model B/p = bytes per parameter a step of the fast engine moves by a model of its\n"
               "  element-wise passes (every pass from and to DRAM; Newton-Schulz's products not\n"
               "  counted; see docs/mdopt-bench.md); GB/s = those bytes / median ms; floor ms = those\n"
               "  bytes at the in-place stream's bandwidth.\n");
  std::fflush(out);
}

void WriteJson(std::ostream& out, const MachineInfo& m, const BenchSetup& s,
               const std::vector<BenchRow>& rows) {
  out << "{\n  \"tool\": \"mdopt-bench\",\n  \"machine\": {\n"
      << "    \"cpu_model\": " << JsonString(m.cpu_model) << ",\n"
      << "    \"logical_cpus\": " << m.logical_cpus << ",\n"
      << "    \"threads\": " << (m.threads > 0 ? std::to_string(m.threads) : "null") << ",\n"
      << "    \"omp_num_threads_env\": "
      << (m.omp_num_threads.empty() ? "null" : JsonString(m.omp_num_threads)) << ",\n"
      << "    \"date_utc\": " << JsonString(m.date_utc) << ",\n"
      << "    \"mdopt_version\": " << JsonString(m.mdopt_version) << ",\n"
      << "    \"abi_version\": " << m.abi_version << ",\n"
      << "    \"isa\": " << JsonString(m.isa) << ",\n"
      << "    \"blas\": " << JsonString(m.blas) << ",\n"
      << "    \"runtime_info\": " << JsonString(m.runtime_info) << ",\n"
      << "    \"stream_inplace_gbps\": "
      << (s.stream.elements > 0 ? JsonNumber(s.stream.inplace_gbps) : "null") << ",\n"
      << "    \"stream_triad_gbps\": "
      << (s.stream.elements > 0 ? JsonNumber(s.stream.triad_gbps) : "null") << "\n  },\n";
  out << "  \"setup\": {\n    \"model\": " << JsonString(s.model) << ",\n";
  if (s.model == "shapes") {
    out << "    \"shapes_file\": " << JsonString(s.shapes_file) << ",\n";
  } else {
    out << "    \"d_model\": " << s.gpt.d_model << ",\n    \"layers\": " << s.gpt.layers
        << ",\n    \"vocab\": " << s.gpt.vocab << ",\n    \"ffn_mult\": " << s.gpt.ffn_mult
        << ",\n";
  }
  out << "    \"tensors\": " << s.tensors << ",\n    \"params\": " << s.params << ",\n"
      << "    \"param_dtype\": " << JsonString(s.param_dtype) << ",\n"
      << "    \"ns_dtype\": " << JsonString(s.ns_dtype) << ",\n"
      << "    \"grad_dtype\": " << JsonString(s.grad_dtype) << ",\n"
      << "    \"warmup\": " << s.warmup << ",\n    \"steps\": " << s.steps << ",\n"
      << "    \"reference\": " << (s.reference ? "true" : "false") << ",\n"
      << "    \"reference_steps\": " << s.reference_steps << ",\n"
      << "    \"seed\": " << s.seed << "\n  },\n  \"rows\": [";
  for (size_t k = 0; k < rows.size(); ++k) {
    const BenchRow& r = rows[k];
    out << (k == 0 ? "\n" : ",\n") << "    {\"preset\": " << JsonString(r.preset)
        << ", \"engine\": " << JsonString(r.engine) << ", \"tensors\": " << r.tensors
        << ", \"params\": " << r.params << ", \"warmup\": " << r.warmup
        << ", \"steps\": " << r.steps << ",\n     \"median_ms\": " << JsonNumber(r.median_ms())
        << ", \"mean_ms\": " << JsonNumber(r.mean_ms())
        << ", \"wall_median_ms\": " << JsonNumber(r.wall_median_ms())
        << ", \"wall_mean_ms\": " << JsonNumber(r.wall_mean_ms())
        << ", \"ns_per_param\": " << JsonNumber(r.ns_per_param()) << ",\n     \"state_bytes\": "
        << r.state_bytes << ", \"state_bytes_per_param\": "
        << JsonNumber(r.state_bytes_per_param()) << ", \"workspace_bytes\": "
        << r.workspace_bytes << ",\n     \"ratio_to_reference\": "
        << (r.ratio_to_reference > 0.0 ? JsonNumber(r.ratio_to_reference) : "null")
        << ", \"model_bytes\": " << (r.model_bytes > 0 ? std::to_string(r.model_bytes) : "null")
        << ", \"achieved_gbps\": " << (r.model_bytes > 0 ? JsonNumber(r.achieved_gbps()) : "null")
        << ",\n     \"step_ms\": " << JsonMsArray(r.step_seconds)
        << ",\n     \"wall_ms\": " << JsonMsArray(r.wall_seconds) << "}";
  }
  out << (rows.empty() ? "]\n}\n" : "\n  ]\n}\n");
  out.flush();
}

}  // namespace mdopt_bench
