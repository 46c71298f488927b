#include "hardware.h"

#include <cstdlib>
#include <fstream>
#include <map>
#include <sstream>

namespace mdopt_sim {
namespace {

std::string Trim(const std::string& s) {
  const size_t a = s.find_first_not_of(" \t\r");
  if (a == std::string::npos) return "";
  return s.substr(a, s.find_last_not_of(" \t\r") - a + 1);
}

}  // namespace

bool ParseHardware(const std::string& text, const std::string& where, Hardware* hw,
                   std::string* error) {
  std::map<std::string, double*> numbers = {
      {"hbm_gbps", &hw->hbm_gbps},
      {"gemm_tflops_small", &hw->gemm_tflops_small},
      {"gemm_tflops_medium", &hw->gemm_tflops_medium},
      {"gemm_tflops_large", &hw->gemm_tflops_large},
      {"peak_tflops", &hw->peak_tflops},
      {"intra_busbw_gbps", &hw->intra_busbw_gbps},
      {"intra_latency_us", &hw->intra_latency_us},
      {"inter_busbw_gbps", &hw->inter_busbw_gbps},
      {"inter_latency_us", &hw->inter_latency_us},
      {"intra_p2p_gbps", &hw->intra_p2p_gbps},
      {"inter_p2p_gbps", &hw->inter_p2p_gbps},
      {"kernel_us", &hw->kernel_us},
  };
  std::map<std::string, bool> seen;
  std::istringstream in(text);
  std::string line;
  for (int no = 1; std::getline(in, line); ++no) {
    line = Trim(line.substr(0, line.find('#')));
    if (line.empty()) continue;
    const std::string at = where + ":" + std::to_string(no) + ": ";
    const size_t eq = line.find('=');
    if (eq == std::string::npos) {
      *error = at + "expected key = value, got '" + line + "'";
      return false;
    }
    const std::string key = Trim(line.substr(0, eq)), value = Trim(line.substr(eq + 1));
    if (seen[key]) {
      *error = at + "'" + key + "' given twice";
      return false;
    }
    seen[key] = true;
    if (key == "name") {
      hw->name = value;
      continue;
    }
    if (key == "all_reduce") {
      if (value != "ring" && value != "tree") {
        *error = at + "all_reduce must be ring or tree, got '" + value + "'";
        return false;
      }
      hw->all_reduce = value == "ring" ? Algo::kRing : Algo::kTree;
      continue;
    }
    char* end = nullptr;
    const double v = std::strtod(value.c_str(), &end);
    const bool number = !value.empty() && end != nullptr && *end == '\0';
    if (key == "host_cores") {
      if (!number || v < 0 || v != static_cast<int>(v)) {
        *error = at + "host_cores must be a whole number >= 0, got '" + value + "'";
        return false;
      }
      hw->host_cores = static_cast<int>(v);
      continue;
    }
    auto it = numbers.find(key);
    if (it == numbers.end()) {
      *error = at + "unknown key '" + key + "'";
      return false;
    }
    // Latencies and the launch cost may be 0; rates must be positive (they divide).
    const bool may_be_zero = key.find("_us") != std::string::npos;
    if (!number || v < 0 || (v == 0 && !may_be_zero)) {
      *error = at + key + " must be a " + (may_be_zero ? "number >= 0" : "positive number") +
               ", got '" + value + "'";
      return false;
    }
    *it->second = v;
  }
  std::string missing;
  for (const char* key : {"name", "all_reduce", "host_cores"})
    if (!seen[key]) missing += std::string(missing.empty() ? "" : ", ") + key;
  for (const auto& [key, ptr] : numbers)
    if (!seen[key]) missing += (missing.empty() ? "" : ", ") + key;
  if (!missing.empty()) {
    *error = where + ": missing hardware field(s): " + missing;
    return false;
  }
  return true;
}

bool ReadHardware(const std::string& path, Hardware* hw, std::string* error) {
  std::ifstream f(path);
  if (!f) {
    *error = path + ": cannot open the hardware file";
    return false;
  }
  std::stringstream text;
  text << f.rdbuf();
  return ParseHardware(text.str(), path, hw, error);
}

}  // namespace mdopt_sim
