// One rank's file of a checkpoint (format 2): the state arrays of every slot the rank holds,
// written streamed through a fixed buffer, and read back by row range.
//
//   header   36 bytes: magic "MDOPTRK2", endian mark, format version, rank, world size,
//            step, CRC-32C of those 32 bytes
//   data     every array's bytes, back to back, cut into chunks of about kChunkBytes
//   index    binary: the array count, then per array its slot (param, expert), name,
//            kind (rows: the global rows [row0, row1) of a row-indexed array, `width`
//            elements each; matrix: one per-matrix array), element size, count, offset,
//            elements per chunk, chunk count and the CRC-32C of every chunk
//   trailer  28 bytes: index offset, index size, index CRC-32C, the CRC-32C of every byte
//            before the trailer (the file's identity, which the manifest and the file name
//            carry), CRC-32C of those 24 bytes
// A reader checks the trailer, header and index, then reads only the chunks covering the
// rows it needs, checking each chunk's CRC as it reads.
#ifndef MDOPT_DIST_OPT_RANK_FILE_H_
#define MDOPT_DIST_OPT_RANK_FILE_H_

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <tuple>
#include <vector>

#include "absl/status/status.h"

namespace mdopt {

inline constexpr int kRankFileVersion = 2;
// Chunk of an array with its own CRC: the granularity of a reader's row-range reads.
inline constexpr int64_t kChunkBytes = int64_t{256} << 10;
// The writer's buffer: peak memory of a save beyond the live state and the index.
inline constexpr size_t kWriteBufferBytes = size_t{1} << 20;

// An array to write. Its elements are read chunk by chunk through `read` (elements [first,
// first + count) into `dst`), so that state in a device's memory is staged through one
// chunk of host memory at a time.
struct RankFileArray {
  int64_t param = 0, expert = 0;
  std::string name;
  bool rows = false;         // row-indexed: (row1 - row0) rows of `width` elements
  int64_t row0 = 0, row1 = 0, width = 1;
  int elem_size = 4;
  int64_t count = 0;
  std::function<absl::Status(int64_t first, int64_t count, void* dst)> read;
};

struct RankFileHeader {
  int rank = 0, world = 1;
  int64_t step = 0;
};

// What a finished rank file is: its final name, size and identity CRC.
struct WrittenRankFile {
  std::string name;
  uint64_t bytes = 0;
  uint32_t crc = 0;
};

// Writes dir/<temporary>, fsyncs, renames it to its content name RankFileName(rank, crc) and
// fsyncs the directory. Memory beyond `arrays`: kWriteBufferBytes, one chunk and the index.
absl::Status WriteRankFile(const std::string& dir, const RankFileHeader& header,
                           const std::vector<RankFileArray>& arrays, WrittenRankFile* out);

// An array as the index describes it.
struct IndexedArray {
  std::string name;
  bool rows = false;
  int64_t row0 = 0, row1 = 0, width = 1;
  int elem_size = 4;
  int64_t count = 0;
  uint64_t offset = 0;
  int64_t chunk_elems = 1;
  std::vector<uint32_t> chunk_crc;
};

class RankFileReader {
 public:
  RankFileReader() = default;
  ~RankFileReader();
  RankFileReader(const RankFileReader&) = delete;
  RankFileReader& operator=(const RankFileReader&) = delete;

  // Opens dir/name and checks it against what the manifest says of it (size, identity CRC)
  // and the header's fields, then reads and checks the index.
  absl::Status Open(const std::string& path, uint64_t bytes, uint32_t crc,
                    const RankFileHeader& expected);

  // nullptr when the file holds no such array.
  const IndexedArray* Find(int64_t param, int64_t expert, const std::string& name) const;

  // Copies elements [begin, end) of `a` to dst, reading the chunks that cover them and
  // checking their CRCs.
  absl::Status Read(const IndexedArray& a, int64_t begin, int64_t end, char* dst);

  const std::string& path() const { return path_; }

 private:
  absl::Status Damaged(const std::string& what) const;
  absl::Status ReadAt(uint64_t offset, size_t n, char* dst) const;

  int fd_ = -1;
  std::string path_;
  uint64_t size_ = 0;
  std::map<std::tuple<int64_t, int64_t, std::string>, IndexedArray> arrays_;
  std::vector<char> chunk_;  // one chunk, reused
};

// "rank-00000.1a2b3c4d.state": the rank and the identity CRC of the file.
std::string RankFileName(int rank, uint32_t crc);
// Whether `name` is a rank file name; sets *rank.
bool ParseRankFileName(const std::string& name, int* rank);
// The name a rank file is written under before it is renamed to its content name.
std::string TempRankFileName(int rank);
// Whether `name` is a rank file name or a TempRankFileName; sets *rank.
bool ParseRankFileOrTempName(std::string name, int* rank);

}  // namespace mdopt

#endif  // MDOPT_DIST_OPT_RANK_FILE_H_
