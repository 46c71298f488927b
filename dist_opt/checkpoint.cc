#include "dist_opt/checkpoint.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>

#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "dist_opt/crc32c.h"
#include "mdopt/mdopt.h"

namespace mdopt {
namespace {

constexpr char kManifestName[] = "manifest.txt";
constexpr char kManifestMagic[] = "mdopt-checkpoint-format";
constexpr char kRankMagic[8] = {'M', 'D', 'O', 'P', 'T', 'R', 'K', '1'};
constexpr uint32_t kEndianMark = 0x01020304u;

absl::Status IoError(absl::string_view what) { return absl::DataLossError(what); }

absl::Status Errno(absl::string_view what, const std::string& path) {
  return IoError(absl::StrCat(what, " '", path, "': ", std::strerror(errno)));
}

const char* DtypeName(Dtype d) { return d == Dtype::kF32 ? "f32" : "bf16"; }

// Writes `data` to dir/name through dir/name.tmp: write, fsync, rename, fsync the directory.
absl::Status WriteAtomically(const std::string& dir, const std::string& name,
                             const std::string& data) {
  const std::string path = dir + "/" + name;
  const std::string tmp = path + ".tmp";
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return Errno("cannot create", tmp);
  size_t done = 0;
  while (done < data.size()) {
    const ssize_t w = ::write(fd, data.data() + done, data.size() - done);
    if (w < 0) {
      if (errno == EINTR) continue;
      absl::Status s = Errno("cannot write", tmp);
      ::close(fd);
      ::unlink(tmp.c_str());
      return s;
    }
    done += static_cast<size_t>(w);
  }
  if (::fsync(fd) != 0) {
    absl::Status s = Errno("cannot fsync", tmp);
    ::close(fd);
    ::unlink(tmp.c_str());
    return s;
  }
  if (::close(fd) != 0) return Errno("cannot close", tmp);
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    absl::Status s = Errno("cannot rename into place", path);
    ::unlink(tmp.c_str());
    return s;
  }
  const int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {
    ::fsync(dfd);
    ::close(dfd);
  }
  return absl::OkStatus();
}

// POSIX reads into a buffer sized from fstat: unlike iostreams, which swallow std::bad_alloc
// into a short read, a failed allocation here reaches the caller as out of memory.
absl::Status ReadFile(const std::string& path, std::string* out) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return Errno("cannot open", path);
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    absl::Status s = Errno("cannot stat", path);
    ::close(fd);
    return s;
  }
  std::string data;
  try {
    data.resize(static_cast<size_t>(st.st_size));
  } catch (...) {
    ::close(fd);
    throw;
  }
  size_t done = 0;
  while (done < data.size()) {
    const ssize_t r = ::read(fd, data.data() + done, data.size() - done);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) {
      absl::Status s = r < 0 ? Errno("cannot read", path)
                             : IoError(absl::StrCat("'", path, "' shrank while being read"));
      ::close(fd);
      return s;
    }
    done += static_cast<size_t>(r);
  }
  ::close(fd);
  *out = std::move(data);
  return absl::OkStatus();
}

template <typename T>
void Put(std::string* out, T v) {
  out->append(reinterpret_cast<const char*>(&v), sizeof v);
}

// Bounds-checked reads from a rank file.
class Reader {
 public:
  Reader(const std::string& data, std::string path) : data_(data), path_(std::move(path)) {}
  template <typename T>
  absl::Status Get(T* v) {
    if (pos_ + sizeof(T) > data_.size()) return Truncated();
    std::memcpy(v, data_.data() + pos_, sizeof(T));
    pos_ += sizeof(T);
    return absl::OkStatus();
  }
  absl::Status Bytes(size_t n, const char** p) {
    if (n > data_.size() - pos_) return Truncated();
    *p = data_.data() + pos_;
    pos_ += n;
    return absl::OkStatus();
  }
  size_t pos() const { return pos_; }

 private:
  absl::Status Truncated() const { return IoError(absl::StrCat("'", path_, "' is truncated")); }
  const std::string& data_;
  std::string path_;
  size_t pos_ = 0;
};

std::string GroupLine(const Group& g) { return absl::StrCat("group ", g.name, " ", CanonicalSpec(g.spec)); }

std::string ParamLine(const ParamEntry& p, const std::vector<Group>& groups) {
  return absl::StrCat("param ", p.name, " ", groups[p.group].name, " ", p.ndim, " ", p.shape[0],
                      " ", p.shape[1], " ", p.shape[2], " ", DtypeName(p.param_dtype), " ",
                      DtypeName(p.grad_dtype));
}

// Group keys that decide the layout and meaning of the state; other hyperparameters (lr,
// betas, ...) may change between save and load.
std::string StateLayoutOf(const GroupSpec& g) {
  const kernels::UpdateRule& r = g.rule;
  return absl::StrCat("base=", ToString(r.base), " sphere=", ToString(r.sphere),
                      " gains=", ToString(r.gains), " gain_param=", ToString(r.gain_param));
}

std::string BuildRankFile(const CheckpointLayout& l, Engine* engine, int rank) {
  std::string out;
  out.append(kRankMagic, sizeof kRankMagic);
  Put<uint32_t>(&out, kEndianMark);
  Put<uint32_t>(&out, kCheckpointFormatVersion);
  Put<uint32_t>(&out, static_cast<uint32_t>(rank));
  Put<uint32_t>(&out, static_cast<uint32_t>(l.world_size));
  Put<int64_t>(&out, l.step);
  Put<uint64_t>(&out, l.params->size());
  for (size_t i = 0; i < l.params->size(); ++i) {
    const ParamEntry& p = (*l.params)[i];
    for (int64_t e = 0; e < p.experts; ++e) {
      const std::vector<StateArray> arrays = engine->State(static_cast<int64_t>(i), e);
      Put<uint64_t>(&out, i);
      Put<uint64_t>(&out, static_cast<uint64_t>(e));
      Put<uint32_t>(&out, static_cast<uint32_t>(arrays.size()));
      for (const StateArray& a : arrays) {
        Put<uint16_t>(&out, static_cast<uint16_t>(a.name.size()));
        out.append(a.name);
        Put<uint8_t>(&out, static_cast<uint8_t>(a.elem_size));
        Put<int64_t>(&out, a.count);
        out.append(static_cast<const char*>(a.data), static_cast<size_t>(a.bytes()));
      }
    }
  }
  Put<uint32_t>(&out, Crc32c(0, out.data(), out.size()));
  return out;
}

struct ManifestRankFile {
  std::string name;
  uint64_t bytes = 0;
  uint32_t crc = 0;
};

struct Manifest {
  std::string engine;
  int world_size = 0;
  int64_t step = 0;
  std::vector<std::string> group_lines, param_lines;
  std::vector<ManifestRankFile> rank_files;
};

absl::Status ParseManifest(const std::string& text, const std::string& path, Manifest* m) {
  auto bad = [&](absl::string_view why) {
    return IoError(absl::StrCat("manifest '", path, "' is malformed: ", why));
  };
  // The version comes first, so that a newer format is named as such rather than as damage.
  const size_t eol = text.find('\n');
  if (eol == std::string::npos) return bad("no header line");
  std::vector<std::string> head = absl::StrSplit(text.substr(0, eol), ' ');
  int version = 0;
  if (head.size() != 2 || head[0] != kManifestMagic || !absl::SimpleAtoi(head[1], &version)) {
    return IoError(absl::StrCat("'", path, "' is not an mdopt checkpoint manifest"));
  }
  if (version != kCheckpointFormatVersion) {
    return IoError(absl::StrCat("checkpoint '", path, "' has format version ", version,
                                "; this build reads version ", kCheckpointFormatVersion));
  }
  // The last line holds the CRC of everything before it.
  const size_t last = text.rfind("manifest_crc32c ");
  if (last == std::string::npos) return bad("no manifest_crc32c line (truncated?)");
  uint32_t want = 0;
  std::string crc_text = text.substr(last + std::strlen("manifest_crc32c "));
  if (!crc_text.empty() && crc_text.back() == '\n') crc_text.pop_back();
  if (!absl::SimpleHexAtoi(crc_text, &want)) return bad("unreadable manifest_crc32c");
  if (Crc32c(0, text.data(), last) != want) {
    return IoError(absl::StrCat("manifest '", path, "' fails its checksum (damaged file)"));
  }
  for (absl::string_view line : absl::StrSplit(absl::string_view(text).substr(0, last), '\n', absl::SkipEmpty())) {
    std::vector<std::string> f = absl::StrSplit(line, ' ');
    if (f[0] == kManifestMagic) continue;
    if (f[0] == "engine" && f.size() == 2) {
      m->engine = f[1];
    } else if (f[0] == "world_size" && f.size() == 2 && absl::SimpleAtoi(f[1], &m->world_size)) {
    } else if (f[0] == "step" && f.size() == 2 && absl::SimpleAtoi(f[1], &m->step)) {
    } else if (f[0] == "abi_version" && f.size() == 2) {
    } else if (f[0] == "group") {
      m->group_lines.emplace_back(line);
    } else if (f[0] == "param") {
      m->param_lines.emplace_back(line);
    } else if (f[0] == "rank_file" && f.size() == 5) {
      ManifestRankFile r;
      int rank = 0;
      if (!absl::SimpleAtoi(f[1], &rank) || rank != static_cast<int>(m->rank_files.size()) ||
          !absl::SimpleAtoi(f[3], &r.bytes) || !absl::SimpleHexAtoi(f[4], &r.crc)) {
        return bad(absl::StrCat("bad line '", line, "'"));
      }
      r.name = f[2];
      m->rank_files.push_back(r);
    } else {
      return bad(absl::StrCat("unexpected line '", line, "'"));
    }
  }
  if (m->world_size < 1 || static_cast<int>(m->rank_files.size()) != m->world_size) {
    return bad("world_size does not match the rank files listed");
  }
  return absl::OkStatus();
}

// A state array as found in a rank file, pointing into the file's bytes.
struct LoadedArray {
  std::string name;
  int elem_size = 0;
  int64_t count = 0;
  const char* data = nullptr;
};

}  // namespace

std::string RankFileName(int rank, uint32_t crc) {
  return absl::StrFormat("rank-%05d.%08x.state", rank, crc);
}

bool IsRankFileName(const std::string& name, int rank) {
  const std::string prefix = absl::StrFormat("rank-%05d.", rank);
  if (name.size() != prefix.size() + 8 + 6 || name.compare(0, prefix.size(), prefix) != 0) return false;
  uint32_t crc = 0;
  return absl::SimpleHexAtoi(name.substr(prefix.size(), 8), &crc) &&
         name.compare(prefix.size() + 8, 6, ".state") == 0;
}

absl::Status SaveCheckpoint(const std::string& dir, const CheckpointLayout& l, Engine* engine,
                            Communicator* comm) {
  if (l.world_size != 1) {
    // Several ranks need rank files of row blocks and a manifest with the shard plan, and a
    // load that reshards; this version writes single-rank checkpoints only.
    return absl::UnimplementedError(
        "mdopt_save at several ranks is not supported in this version (checkpoints are "
        "single-rank; mdopt_get_state gathers the state at any rank count)");
  }
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) return IoError(absl::StrCat("cannot create directory '", dir, "': ", ec.message()));
  const int rank = comm->rank();
  const std::string rank_data = BuildRankFile(l, engine, rank);
  // The CRC of the body, which the file's trailer also holds. (Not the CRC of the whole
  // file: a CRC over data followed by its own CRC is the same constant for every file.)
  const uint32_t rank_crc = Crc32c(0, rank_data.data(), rank_data.size() - 4);
  // Named by content, so that a save over an existing checkpoint never replaces the files
  // the old manifest names: until the new manifest is renamed into place the old
  // checkpoint stays whole and loadable.
  const std::string rank_name = RankFileName(rank, rank_crc);
  if (absl::Status s = WriteAtomically(dir, rank_name, rank_data); !s.ok()) return s;
  std::string m = absl::StrCat(kManifestMagic, " ", kCheckpointFormatVersion, "\n");
  absl::StrAppend(&m, "abi_version ", MDOPT_ABI_VERSION, "\n");
  absl::StrAppend(&m, "engine ", l.engine, "\n");
  absl::StrAppend(&m, "world_size ", l.world_size, "\n");
  absl::StrAppend(&m, "step ", l.step, "\n");
  for (const Group& g : *l.groups) absl::StrAppend(&m, GroupLine(g), "\n");
  for (const ParamEntry& p : *l.params) absl::StrAppend(&m, ParamLine(p, *l.groups), "\n");
  absl::StrAppend(&m, "rank_file 0 ", rank_name, " ", rank_data.size(), " ",
                  absl::StrFormat("%08x", rank_crc), "\n");
  absl::StrAppend(&m, "manifest_crc32c ", absl::StrFormat("%08x", Crc32c(0, m.data(), m.size())), "\n");
  if (absl::Status s = WriteAtomically(dir, kManifestName, m); !s.ok()) return s;
  // The new checkpoint is in place; this rank's files of earlier saves into this directory
  // (and temporaries of saves that died) are no longer named by any manifest.
  for (const auto& entry : std::filesystem::directory_iterator(dir, ec)) {
    std::string name = entry.path().filename().string();
    if (name == rank_name) continue;
    if (name.size() > 4 && name.compare(name.size() - 4, 4, ".tmp") == 0) name.resize(name.size() - 4);
    if (IsRankFileName(name, rank)) std::filesystem::remove(entry.path(), ec);
  }
  return absl::OkStatus();
}

absl::Status LoadCheckpoint(const std::string& dir, const CheckpointLayout& want, Engine* engine,
                            Communicator* comm, int64_t* step) {
  const std::string manifest_path = dir + "/" + kManifestName;
  std::string text;
  if (absl::Status s = ReadFile(manifest_path, &text); !s.ok()) return s;
  Manifest m;
  if (absl::Status s = ParseManifest(text, manifest_path, &m); !s.ok()) return s;

  auto mismatch = [&](absl::string_view what) {
    return IoError(absl::StrCat("checkpoint '", dir, "' does not match this optimizer: ", what));
  };
  if (m.engine != want.engine) {
    return mismatch(absl::StrCat("it was written by kernels=", m.engine, ", this optimizer uses kernels=", want.engine));
  }
  if (m.world_size != want.world_size) {
    return mismatch(absl::StrCat("it was written by ", m.world_size, " ranks, this run has ",
                                 want.world_size, " (resharding needs the distributed backend)"));
  }
  // Groups: same names, same state layout.
  if (m.group_lines.size() != want.groups->size()) {
    return mismatch(absl::StrCat(m.group_lines.size(), " groups, this optimizer has ", want.groups->size()));
  }
  for (size_t g = 0; g < want.groups->size(); ++g) {
    const Group& ours = (*want.groups)[g];
    const std::string& line = m.group_lines[g];
    std::vector<std::string> f = absl::StrSplit(line, absl::MaxSplits(' ', 2));
    if (f.size() != 3 || f[1] != ours.name) {
      return mismatch(absl::StrCat("group ", g, " is '", f.size() > 1 ? f[1] : "", "', expected '", ours.name, "'"));
    }
    absl::StatusOr<GroupSpec> theirs = ParseGroupSpec(f[2]);
    if (!theirs.ok()) return mismatch(absl::StrCat("group '", ours.name, "': ", theirs.status().message()));
    if (StateLayoutOf(*theirs) != StateLayoutOf(ours.spec)) {
      return mismatch(absl::StrCat("group '", ours.name, "' was saved with ", StateLayoutOf(*theirs),
                                   ", this optimizer has ", StateLayoutOf(ours.spec)));
    }
  }
  if (m.param_lines.size() != want.params->size()) {
    return mismatch(absl::StrCat(m.param_lines.size(), " params, this optimizer has ", want.params->size()));
  }
  for (size_t i = 0; i < want.params->size(); ++i) {
    const std::string ours = ParamLine((*want.params)[i], *want.groups);
    if (m.param_lines[i] != ours) {
      return mismatch(absl::StrCat("param ", i, " is '", m.param_lines[i], "', expected '", ours, "'"));
    }
  }

  // This rank's file: size, checksum (manifest and trailer), then structure.
  const int rank = comm->rank();
  const ManifestRankFile& rf = m.rank_files[rank];
  if (!IsRankFileName(rf.name, rank)) {
    return IoError(absl::StrCat("manifest '", manifest_path, "' names rank file '", rf.name,
                                "', which is not an mdopt rank file name"));
  }
  const std::string path = dir + "/" + rf.name;
  std::string data;
  if (absl::Status s = ReadFile(path, &data); !s.ok()) return s;
  if (data.size() != rf.bytes) {
    return IoError(absl::StrCat("'", path, "' has ", data.size(), " bytes, the manifest says ",
                                rf.bytes, " (truncated or replaced)"));
  }
  uint32_t trailer = 0;
  if (data.size() >= 4) std::memcpy(&trailer, data.data() + data.size() - 4, 4);
  const uint32_t body_crc = data.size() >= 4 ? Crc32c(0, data.data(), data.size() - 4) : 0;
  if (data.size() < 4 || body_crc != trailer || body_crc != rf.crc) {
    return IoError(absl::StrCat("'", path, "' fails its checksum (damaged file)"));
  }
  Reader r(data, path);
  const char* magic = nullptr;
  uint32_t endian = 0, version = 0, file_rank = 0, file_world = 0;
  int64_t file_step = 0;
  uint64_t nparams = 0;
  for (absl::Status s : {r.Bytes(sizeof kRankMagic, &magic), r.Get(&endian), r.Get(&version),
                         r.Get(&file_rank), r.Get(&file_world), r.Get(&file_step), r.Get(&nparams)}) {
    if (!s.ok()) return s;
  }
  if (std::memcmp(magic, kRankMagic, sizeof kRankMagic) != 0) return IoError(absl::StrCat("'", path, "' is not an mdopt rank file"));
  if (endian != kEndianMark) return IoError(absl::StrCat("'", path, "' was written on a host of the other byte order"));
  if (version != kCheckpointFormatVersion || file_rank != static_cast<uint32_t>(rank) ||
      file_world != static_cast<uint32_t>(m.world_size) || file_step != m.step ||
      nparams != want.params->size()) {
    return IoError(absl::StrCat("'", path, "' disagrees with its manifest"));
  }

  // Pair every array in the file with the live one it restores.
  std::vector<std::pair<StateArray, LoadedArray>> plan;
  for (size_t i = 0; i < want.params->size(); ++i) {
    const ParamEntry& p = (*want.params)[i];
    for (int64_t e = 0; e < p.experts; ++e) {
      uint64_t index = 0, expert = 0;
      uint32_t count = 0;
      for (absl::Status s : {r.Get(&index), r.Get(&expert), r.Get(&count)})
        if (!s.ok()) return s;
      const std::vector<StateArray> live = engine->State(static_cast<int64_t>(i), e);
      if (index != i || expert != static_cast<uint64_t>(e) || count != live.size()) {
        return mismatch(absl::StrCat("state of param '", p.name, "' has another layout"));
      }
      for (const StateArray& a : live) {
        LoadedArray la;
        uint16_t name_len = 0;
        uint8_t elem = 0;
        const char* name = nullptr;
        for (absl::Status s : {r.Get(&name_len), r.Bytes(name_len, &name), r.Get(&elem), r.Get(&la.count)})
          if (!s.ok()) return s;
        la.name.assign(name, name_len);
        la.elem_size = elem;
        if (la.name != a.name || la.elem_size != a.elem_size || la.count != a.count) {
          return mismatch(absl::StrCat("param '", p.name, "': array '", la.name, "' (", la.count,
                                       " x ", la.elem_size, " bytes) where '", a.name, "' (",
                                       a.count, " x ", a.elem_size, " bytes) was expected"));
        }
        if (absl::Status s = r.Bytes(static_cast<size_t>(a.bytes()), &la.data); !s.ok()) return s;
        plan.emplace_back(a, std::move(la));
      }
    }
  }
  if (r.pos() + 4 != data.size()) return IoError(absl::StrCat("'", path, "' has trailing bytes"));

  // Everything checked: commit.
  for (const auto& [live, loaded] : plan) std::memcpy(live.data, loaded.data, static_cast<size_t>(live.bytes()));
  if (absl::Status s = engine->WriteModels(); !s.ok()) return s;
  *step = m.step;
  return absl::OkStatus();
}

}  // namespace mdopt
