// Checkpoints (DESIGN.md section 5): a directory holding `manifest.txt` (format version,
// world size, engine, step, groups, params and shapes, and the name, size and CRC-32C of
// every rank file, itself closed by its own CRC-32C) and one binary
// `rank-NNNNN.<crc32c>.state` per rank with that rank's state arrays. Rank files are named
// by content and written first, the manifest is renamed into place last, and rank files of
// earlier saves are removed after it: a save that dies half-way leaves the previous
// checkpoint loadable. Loading checks everything before it changes anything.
#ifndef MDOPT_DIST_OPT_CHECKPOINT_H_
#define MDOPT_DIST_OPT_CHECKPOINT_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "comm/communicator.h"
#include "dist_opt/engine.h"
#include "dist_opt/param_registry.h"

namespace mdopt {

inline constexpr int kCheckpointFormatVersion = 1;

// What a checkpoint describes and what a loading optimizer expects.
struct CheckpointLayout {
  std::string engine;  // "fast" | "reference"
  int world_size = 1;
  int64_t step = 0;
  const std::vector<Group>* groups = nullptr;
  const std::vector<ParamEntry>* params = nullptr;
};

// Writes this rank's state and (rank 0) the manifest. All errors are DataLoss (IO_ERROR).
absl::Status SaveCheckpoint(const std::string& dir, const CheckpointLayout& layout,
                            Engine* engine, Communicator* comm);

// Verifies the checkpoint against `expected` (format version, engine, world size, params,
// shapes, the state layout of every group, checksums, sizes), then copies it into the
// engine's state, writes the model tensors and returns the step count it holds. On any
// error nothing has changed. Errors are DataLoss (IO_ERROR).
absl::Status LoadCheckpoint(const std::string& dir, const CheckpointLayout& expected,
                            Engine* engine, Communicator* comm, int64_t* step);

// "rank-00000.1a2b3c4d.state": the rank and the CRC-32C of the file's bytes.
std::string RankFileName(int rank, uint32_t crc);
bool IsRankFileName(const std::string& name, int rank);

}  // namespace mdopt

#endif  // MDOPT_DIST_OPT_CHECKPOINT_H_
