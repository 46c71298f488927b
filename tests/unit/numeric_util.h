// Generic helpers for the invariant, cross-check and checkpoint tests: norms, a snapshot of
// everything an optimizer exposes (every mdopt_get_state field plus the model's raw
// bytes) compared bit for bit, and scratch directories and files on disk.
#ifndef MDOPT_TESTS_UNIT_NUMERIC_UTIL_H_
#define MDOPT_TESTS_UNIT_NUMERIC_UTIL_H_

#include <gtest/gtest.h>
#include <stdlib.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <string>
#include <vector>

#include "mdopt/mdopt.h"
#include "nlohmann/json.hpp"
#include "test_util.h"

namespace mdopt::testing {

// Every field mdopt_get_state knows; a param exposes the subset its rule has.
inline const std::vector<std::string>& StateFields() {
  static const auto* f = new std::vector<std::string>{"master",   "direction",   "gain_row",
                                                      "gain_col", "gain_scalar", "radius"};
  return *f;
}

// |a - b| / |b|, or |a - b| when b is 0.
inline double RelErr(double a, double b) {
  return b != 0.0 ? std::abs(a - b) / std::abs(b) : std::abs(a - b);
}

// A field of a param if the param has it (mdopt_get_state answers INVALID_ARGUMENT for a
// field the rule lacks, e.g. gain_row with gains=none); false otherwise.
inline bool TryState(const mdopt_optimizer* opt, int64_t index, const std::string& field,
                     std::vector<double>* out) {
  int64_t n = 0;
  if (mdopt_get_state(opt, index, field.c_str(), nullptr, 0, &n) != MDOPT_SUCCESS) return false;
  out->assign(static_cast<size_t>(n), 0.0);
  return mdopt_get_state(opt, index, field.c_str(), out->data(), n, nullptr) == MDOPT_SUCCESS;
}

// Everything observable of an optimizer and its model tensors.
struct Snapshot {
  // [param] -> field -> values (only the fields the param has)
  std::vector<std::map<std::string, std::vector<double>>> fields;
  // [param] -> the model tensor's raw bytes (f32 or bf16)
  std::vector<std::vector<unsigned char>> model_bytes;
};

inline Snapshot Take(AbiHarness& h) {
  Snapshot s;
  for (size_t i = 0; i < h.size(); ++i) {
    std::map<std::string, std::vector<double>> f;
    for (const std::string& name : StateFields()) {
      std::vector<double> v;
      if (TryState(h.opt(), static_cast<int64_t>(i), name, &v)) f[name] = std::move(v);
    }
    s.fields.push_back(std::move(f));
    Buffers& b = h.buffers(i);
    const unsigned char* p = static_cast<const unsigned char*>(b.param());
    const size_t bytes = b.param_f32.empty() ? b.param_bf16.size() * 2 : b.param_f32.size() * 4;
    s.model_bytes.emplace_back(p, p + bytes);
  }
  return s;
}

// Bit-for-bit equality of two snapshots (doubles compared by their bytes, so that -0.0
// and 0.0 differ and NaN equals itself), reporting the first difference.
inline ::testing::AssertionResult BitwiseEqual(const Snapshot& a, const Snapshot& b) {
  if (a.fields.size() != b.fields.size()) {
    return ::testing::AssertionFailure() << "param counts differ: " << a.fields.size() << " vs "
                                         << b.fields.size();
  }
  for (size_t i = 0; i < a.fields.size(); ++i) {
    if (a.fields[i].size() != b.fields[i].size()) {
      return ::testing::AssertionFailure() << "param " << i << ": different sets of fields";
    }
    for (const auto& [name, va] : a.fields[i]) {
      auto it = b.fields[i].find(name);
      if (it == b.fields[i].end()) {
        return ::testing::AssertionFailure() << "param " << i << ": field " << name << " missing";
      }
      const std::vector<double>& vb = it->second;
      if (va.size() != vb.size()) {
        return ::testing::AssertionFailure() << "param " << i << " " << name << ": lengths "
                                             << va.size() << " vs " << vb.size();
      }
      for (size_t k = 0; k < va.size(); ++k) {
        if (std::memcmp(&va[k], &vb[k], sizeof(double)) != 0) {
          return ::testing::AssertionFailure()
                 << "param " << i << " " << name << "[" << k << "]: " << va[k] << " vs " << vb[k]
                 << " (diff " << va[k] - vb[k] << ")";
        }
      }
    }
    if (a.model_bytes[i] != b.model_bytes[i]) {
      return ::testing::AssertionFailure() << "param " << i << ": model tensors differ";
    }
  }
  return ::testing::AssertionSuccess();
}

// A fresh directory under /tmp (mkdtemp), removed with everything in it on destruction.
class TempDir {
 public:
  TempDir() {
    std::string tmpl = "/tmp/mdopt-test-XXXXXX";
    if (mkdtemp(tmpl.data()) != nullptr) path_ = tmpl;
    EXPECT_FALSE(path_.empty()) << "mkdtemp failed";
  }
  ~TempDir() {
    std::error_code ec;
    if (!path_.empty()) std::filesystem::remove_all(path_, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;

  const std::string& path() const { return path_; }
  std::string Sub(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

inline std::string ReadBytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  EXPECT_TRUE(in.good()) << "cannot open " << path;
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

inline void WriteBytes(const std::string& path, const std::string& data) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(data.data(), static_cast<std::streamsize>(data.size()));
  EXPECT_TRUE(out.good()) << "cannot write " << path;
}

// The file name of a rank's state in a checkpoint directory, as its manifest.json gives it
// ("rank-00000.<crc32c>.state": rank files are named by content).
inline std::string RankFileOf(const std::string& dir, int rank = 0) {
  const nlohmann::json m = nlohmann::json::parse(ReadBytes(dir + "/manifest.json"), nullptr, false);
  const bool ok = m.is_object() && m.contains("rank_files") && m["rank_files"].is_array() &&
                  rank < static_cast<int>(m["rank_files"].size());
  EXPECT_TRUE(ok) << "no rank_files entry " << rank << " in " << dir;
  if (!ok) return "";
  return m["rank_files"][rank]["name"].get<std::string>();
}

// Copies every regular file of one directory into another (created if needed).
inline void CopyDir(const std::string& from, const std::string& to) {
  std::filesystem::create_directories(to);
  for (const auto& e : std::filesystem::directory_iterator(from)) {
    std::filesystem::copy_file(e.path(), to + "/" + e.path().filename().string(),
                               std::filesystem::copy_options::overwrite_existing);
  }
}

// Names of the entries of a directory, sorted.
inline std::vector<std::string> ListDir(const std::string& dir) {
  std::vector<std::string> names;
  for (const auto& e : std::filesystem::directory_iterator(dir))
    names.push_back(e.path().filename().string());
  std::sort(names.begin(), names.end());
  return names;
}

}  // namespace mdopt::testing

#endif  // MDOPT_TESTS_UNIT_NUMERIC_UTIL_H_
