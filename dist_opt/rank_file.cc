#include "dist_opt/rank_file.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "dist_opt/crc32c.h"
#include "dist_opt/file_io.h"

namespace mdopt {
namespace {

constexpr char kMagic[8] = {'M', 'D', 'O', 'P', 'T', 'R', 'K', '2'};
constexpr uint32_t kEndianMark = 0x01020304u;
constexpr size_t kHeaderBytes = 36;
constexpr size_t kTrailerBytes = 28;

absl::Status IoError(absl::string_view what) { return absl::DataLossError(what); }

template <typename T>
void PutAt(char* p, size_t* at, T v) {
  std::memcpy(p + *at, &v, sizeof v);
  *at += sizeof v;
}
template <typename T>
T GetAt(const char* p, size_t* at) {
  T v;
  std::memcpy(&v, p + *at, sizeof v);
  *at += sizeof v;
  return v;
}

// Appends to a file through a fixed buffer, keeping the CRC-32C of everything written.
class StreamWriter {
 public:
  StreamWriter(int fd, std::string path) : fd_(fd), path_(std::move(path)) {
    buf_.reserve(kWriteBufferBytes);
  }
  absl::Status Write(const void* data, size_t n) {
    crc_ = Crc32c(crc_, data, n);
    const char* p = static_cast<const char*>(data);
    while (n > 0) {
      const size_t take = std::min(n, kWriteBufferBytes - buf_.size());
      buf_.insert(buf_.end(), p, p + take);
      p += take;
      n -= take;
      bytes_ += take;
      if (buf_.size() == kWriteBufferBytes) {
        if (absl::Status s = Flush(); !s.ok()) return s;
      }
    }
    return absl::OkStatus();
  }
  absl::Status Flush() {
    size_t done = 0;
    while (done < buf_.size()) {
      const ssize_t w = ::write(fd_, buf_.data() + done, buf_.size() - done);
      if (w < 0) {
        if (errno == EINTR) continue;
        return ErrnoError("cannot write", path_);
      }
      done += static_cast<size_t>(w);
    }
    buf_.clear();
    return absl::OkStatus();
  }
  uint32_t crc() const { return crc_; }
  uint64_t bytes() const { return bytes_; }

 private:
  int fd_;
  std::string path_;
  std::vector<char> buf_;
  uint32_t crc_ = 0;
  uint64_t bytes_ = 0;
};

int64_t ChunkElems(const RankFileArray& a) {
  const int64_t per = std::max<int64_t>(1, kChunkBytes / a.elem_size);
  if (!a.rows) return per;
  // Whole rows per chunk, so that a row range maps onto whole chunks plus two partial ones.
  return std::max<int64_t>(1, per / a.width) * a.width;
}

// Header, arrays, index, trailer; *identity: the CRC-32C of every byte before the trailer.
absl::Status WriteBody(StreamWriter& w, const RankFileHeader& h,
                       const std::vector<RankFileArray>& arrays, uint32_t* identity) {
  char head[kHeaderBytes];
  size_t at = 0;
  std::memcpy(head, kMagic, sizeof kMagic);
  at += sizeof kMagic;
  PutAt<uint32_t>(head, &at, kEndianMark);
  PutAt<uint32_t>(head, &at, kRankFileVersion);
  PutAt<uint32_t>(head, &at, static_cast<uint32_t>(h.rank));
  PutAt<uint32_t>(head, &at, static_cast<uint32_t>(h.world));
  PutAt<int64_t>(head, &at, h.step);
  PutAt<uint32_t>(head, &at, Crc32c(0, head, at));
  if (absl::Status s = w.Write(head, sizeof head); !s.ok()) return s;

  // The index is binary, not JSON: building and freeing it must only ever fail as a
  // std::bad_alloc the caller can catch (a JSON tree frees itself with allocations).
  std::string text;
  auto put = [&](auto v) { text.append(reinterpret_cast<const char*>(&v), sizeof v); };
  put(static_cast<uint64_t>(arrays.size()));
  size_t most = 0;
  for (const RankFileArray& a : arrays)
    most = std::max(most, static_cast<size_t>(std::min(ChunkElems(a), a.count) * a.elem_size));
  std::vector<char> chunk_buf(most);
  for (const RankFileArray& a : arrays) {
    const int64_t chunk = ChunkElems(a);
    const uint64_t offset = w.bytes();
    put(a.param);
    put(a.expert);
    put(static_cast<uint16_t>(a.name.size()));
    text.append(a.name);
    put(static_cast<uint8_t>(a.rows ? 1 : 0));
    put(a.row0);
    put(a.row1);
    put(a.width);
    put(static_cast<uint32_t>(a.elem_size));
    put(a.count);
    put(offset);
    put(chunk);
    put(static_cast<uint64_t>(a.count == 0 ? 0 : (a.count + chunk - 1) / chunk));
    for (int64_t e = 0; e < a.count; e += chunk) {
      const int64_t elems = std::min(chunk, a.count - e);
      const size_t n = static_cast<size_t>(elems * a.elem_size);
      if (absl::Status s = a.read(e, elems, chunk_buf.data()); !s.ok()) return s;
      put(Crc32c(0, chunk_buf.data(), n));
      if (absl::Status s = w.Write(chunk_buf.data(), n); !s.ok()) return s;
    }
  }
  const uint64_t index_offset = w.bytes();
  if (absl::Status s = w.Write(text.data(), text.size()); !s.ok()) return s;
  char tail[kTrailerBytes];
  at = 0;
  PutAt<uint64_t>(tail, &at, index_offset);
  PutAt<uint64_t>(tail, &at, text.size());
  PutAt<uint32_t>(tail, &at, Crc32c(0, text.data(), text.size()));
  *identity = w.crc();
  PutAt<uint32_t>(tail, &at, *identity);
  PutAt<uint32_t>(tail, &at, Crc32c(0, tail, at));
  if (absl::Status s = w.Write(tail, sizeof tail); !s.ok()) return s;
  return w.Flush();
}

}  // namespace

std::string RankFileName(int rank, uint32_t crc) {
  return absl::StrFormat("rank-%05d.%08x.state", rank, crc);
}

std::string TempRankFileName(int rank) { return absl::StrFormat("rank-%05d.state.tmp", rank); }

bool ParseRankFileOrTempName(std::string name, int* rank) {
  if (name.size() > 4 && name.compare(name.size() - 4, 4, ".tmp") == 0) {
    name.resize(name.size() - 4);
    // rank-NNNNN.state (the temporary of a rank file being written)
    if (name.size() == 16 && name.compare(0, 5, "rank-") == 0 && name.compare(10, 6, ".state") == 0) {
      return absl::SimpleAtoi(name.substr(5, 5), rank);
    }
  }
  return ParseRankFileName(name, rank);
}

bool ParseRankFileName(const std::string& name, int* rank) {
  // rank-NNNNN.XXXXXXXX.state
  if (name.size() != 25 || name.compare(0, 5, "rank-") != 0 || name[10] != '.' ||
      name.compare(19, 6, ".state") != 0) {
    return false;
  }
  uint32_t crc = 0;
  return absl::SimpleAtoi(name.substr(5, 5), rank) && absl::SimpleHexAtoi(name.substr(11, 8), &crc);
}

absl::Status WriteRankFile(const std::string& dir, const RankFileHeader& header,
                           const std::vector<RankFileArray>& arrays, WrittenRankFile* out) {
  const std::string tmp = dir + "/" + TempRankFileName(header.rank);
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return ErrnoError("cannot create", tmp);
  StreamWriter w(fd, tmp);
  uint32_t identity = 0;
  absl::Status s = WriteBody(w, header, arrays, &identity);
  if (s.ok() && ::fsync(fd) != 0) s = ErrnoError("cannot fsync", tmp);
  if (::close(fd) != 0 && s.ok()) s = ErrnoError("cannot close", tmp);
  if (!s.ok()) {
    ::unlink(tmp.c_str());
    return s;
  }
  const std::string name = RankFileName(header.rank, identity);
  const std::string path = dir + "/" + name;
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    absl::Status e = ErrnoError("cannot rename into place", path);
    ::unlink(tmp.c_str());
    return e;
  }
  FsyncDir(dir);
  *out = {name, w.bytes(), identity};
  return absl::OkStatus();
}

RankFileReader::~RankFileReader() {
  if (fd_ >= 0) ::close(fd_);
}

absl::Status RankFileReader::Damaged(const std::string& what) const {
  return IoError(absl::StrCat("'", path_, "' fails its checksum (damaged file: ", what, ")"));
}

absl::Status RankFileReader::ReadAt(uint64_t offset, size_t n, char* dst) const {
  size_t done = 0;
  while (done < n) {
    const ssize_t r = ::pread(fd_, dst + done, n - done, static_cast<off_t>(offset + done));
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) return ErrnoError("cannot read", path_);
    if (r == 0) return IoError(absl::StrCat("'", path_, "' is truncated (it shrank while being read)"));
    done += static_cast<size_t>(r);
  }
  return absl::OkStatus();
}

absl::Status RankFileReader::Open(const std::string& path, uint64_t bytes, uint32_t crc,
                                  const RankFileHeader& want) {
  path_ = path;
  fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd_ < 0) return ErrnoError("cannot open", path);
  struct stat st;
  if (::fstat(fd_, &st) != 0) return ErrnoError("cannot stat", path);
  size_ = static_cast<uint64_t>(st.st_size);
  if (size_ != bytes) {
    return IoError(absl::StrCat("'", path, "' has ", size_, " bytes, the manifest says ", bytes,
                                " (truncated or replaced)"));
  }
  if (size_ < kHeaderBytes + kTrailerBytes) return IoError(absl::StrCat("'", path, "' is truncated"));

  char tail[kTrailerBytes];
  if (absl::Status s = ReadAt(size_ - kTrailerBytes, sizeof tail, tail); !s.ok()) return s;
  size_t at = 0;
  const uint64_t index_offset = GetAt<uint64_t>(tail, &at);
  const uint64_t index_bytes = GetAt<uint64_t>(tail, &at);
  const uint32_t index_crc = GetAt<uint32_t>(tail, &at);
  const uint32_t identity = GetAt<uint32_t>(tail, &at);
  const uint32_t tail_crc = GetAt<uint32_t>(tail, &at);
  if (Crc32c(0, tail, 24) != tail_crc) return Damaged("trailer");
  if (identity != crc) {
    return IoError(absl::StrCat("'", path, "' is not the file the manifest names (it holds the "
                                "state of another save)"));
  }
  if (index_offset < kHeaderBytes || index_offset + index_bytes + kTrailerBytes != size_) {
    return Damaged("trailer points outside the file");
  }

  char head[kHeaderBytes];
  if (absl::Status s = ReadAt(0, sizeof head, head); !s.ok()) return s;
  at = 32;
  if (Crc32c(0, head, 32) != GetAt<uint32_t>(head, &at)) return Damaged("header");
  at = sizeof kMagic;
  if (std::memcmp(head, kMagic, sizeof kMagic) != 0) {
    return IoError(absl::StrCat("'", path, "' is not an mdopt rank file of format version ", kRankFileVersion));
  }
  const uint32_t endian = GetAt<uint32_t>(head, &at);
  const uint32_t version = GetAt<uint32_t>(head, &at);
  const uint32_t rank = GetAt<uint32_t>(head, &at);
  const uint32_t world = GetAt<uint32_t>(head, &at);
  const int64_t step = GetAt<int64_t>(head, &at);
  if (endian != kEndianMark) return IoError(absl::StrCat("'", path, "' was written on a host of the other byte order"));
  if (version != kRankFileVersion || rank != static_cast<uint32_t>(want.rank) ||
      world != static_cast<uint32_t>(want.world) || step != want.step) {
    return IoError(absl::StrCat("'", path, "' disagrees with its manifest (version, rank, world size or step)"));
  }

  std::string text(static_cast<size_t>(index_bytes), '\0');
  if (absl::Status s = ReadAt(index_offset, text.size(), text.data()); !s.ok()) return s;
  if (Crc32c(0, text.data(), text.size()) != index_crc) return Damaged("index");
  auto bad = [&](const std::string& why) {
    return IoError(absl::StrCat("'", path, "' has a malformed index: ", why));
  };
  size_t pos = 0;
  auto get = [&](auto* v) {
    if (pos + sizeof *v > text.size()) return false;
    std::memcpy(v, text.data() + pos, sizeof *v);
    pos += sizeof *v;
    return true;
  };
  uint64_t n = 0;
  if (!get(&n)) return bad("no array count");
  for (uint64_t k = 0; k < n; ++k) {
    IndexedArray a;
    int64_t param = 0, expert = 0;
    uint16_t name_len = 0;
    uint8_t rows = 0;
    uint32_t elem = 0;
    uint64_t chunks = 0;
    if (!get(&param) || !get(&expert) || !get(&name_len) || pos + name_len > text.size()) {
      return bad(absl::StrCat("entry ", k, " is cut short"));
    }
    a.name.assign(text.data() + pos, name_len);
    pos += name_len;
    if (!get(&rows) || !get(&a.row0) || !get(&a.row1) || !get(&a.width) || !get(&elem) ||
        !get(&a.count) || !get(&a.offset) || !get(&a.chunk_elems) || !get(&chunks) ||
        chunks > (text.size() - pos) / sizeof(uint32_t)) {
      return bad(absl::StrCat("entry ", k, " ('", a.name, "') is cut short"));
    }
    a.rows = rows != 0;
    a.elem_size = static_cast<int>(elem);
    a.chunk_crc.resize(static_cast<size_t>(chunks));
    for (uint32_t& c : a.chunk_crc) get(&c);
    const int64_t want_chunks = a.chunk_elems > 0 ? (a.count + a.chunk_elems - 1) / a.chunk_elems : -1;
    if ((a.elem_size != 4 && a.elem_size != 8) || a.count < 0 || a.chunk_elems <= 0 ||
        want_chunks != static_cast<int64_t>(chunks) || a.offset < kHeaderBytes ||
        a.offset + static_cast<uint64_t>(a.count) * static_cast<uint64_t>(a.elem_size) > index_offset ||
        (a.rows && (a.width <= 0 || a.row1 < a.row0 || (a.row1 - a.row0) * a.width != a.count))) {
      return bad(absl::StrCat("array '", a.name, "' is inconsistent"));
    }
    auto key = std::make_tuple(param, expert, a.name);
    arrays_[std::move(key)] = std::move(a);
  }
  if (pos != text.size()) return bad("trailing bytes");
  return absl::OkStatus();
}

const IndexedArray* RankFileReader::Find(int64_t param, int64_t expert, const std::string& name) const {
  auto it = arrays_.find(std::make_tuple(param, expert, name));
  return it == arrays_.end() ? nullptr : &it->second;
}

absl::Status RankFileReader::Read(const IndexedArray& a, int64_t begin, int64_t end, char* dst) {
  const size_t es = static_cast<size_t>(a.elem_size);
  for (int64_t c = begin / a.chunk_elems; c * a.chunk_elems < end; ++c) {
    const int64_t c0 = c * a.chunk_elems, c1 = std::min(a.count, c0 + a.chunk_elems);
    const size_t n = static_cast<size_t>(c1 - c0) * es;
    chunk_.resize(n);
    if (absl::Status s = ReadAt(a.offset + static_cast<uint64_t>(c0) * es, n, chunk_.data()); !s.ok()) return s;
    if (Crc32c(0, chunk_.data(), n) != a.chunk_crc[static_cast<size_t>(c)]) {
      return Damaged(absl::StrCat("array '", a.name, "', chunk ", c));
    }
    const int64_t lo = std::max(begin, c0), hi = std::min(end, c1);
    std::memcpy(dst, chunk_.data() + static_cast<size_t>(lo - c0) * es, static_cast<size_t>(hi - lo) * es);
    dst += static_cast<size_t>(hi - lo) * es;
  }
  return absl::OkStatus();
}

}  // namespace mdopt
