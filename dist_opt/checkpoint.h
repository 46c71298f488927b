// Checkpoints at any rank count (docs/ABI.md, mdopt_save / mdopt_load): a directory holding
// `manifest.json` (checkpoint_manifest.h) and one content-named rank file per saving rank
// (rank_file.h) with the state arrays of the slots that rank holds, row-indexed arrays
// tagged with the global rows they cover. Rank files are written first, streamed, under
// temporary names, then renamed; rank 0 writes the manifest last (the commit point); rank
// files of earlier saves are removed after it. A load at any rank count reads, for each of
// its slots, the rows it needs from whichever rank files hold them (and no other file),
// checks every chunk of them first, and changes the live state only when every rank
// succeeded, then reads them again into the state one array at a time. Both calls are
// collective: every rank returns the same status.
#ifndef MDOPT_DIST_OPT_CHECKPOINT_H_
#define MDOPT_DIST_OPT_CHECKPOINT_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "comm/communicator.h"
#include "dist_opt/checkpoint_manifest.h"
#include "dist_opt/engine.h"
#include "dist_opt/param_registry.h"

namespace mdopt {

// What a checkpoint describes and what a loading optimizer expects.
struct CheckpointLayout {
  std::string engine;  // "fast" | "reference"
  int world_size = 1;
  int64_t step = 0;
  const std::vector<Group>* groups = nullptr;
  const std::vector<ParamEntry>* params = nullptr;
};

// Collective. Writes this rank's file and (rank 0) the manifest. Memory beyond the live
// state: one write buffer (kWriteBufferBytes) and the index. All errors are DataLoss
// (IO_ERROR), the same on every rank.
absl::Status SaveCheckpoint(const std::string& dir, const CheckpointLayout& layout,
                            Engine* engine, Communicator* comm);

// Collective. Verifies the checkpoint against `expected` (format version, engine, params,
// shapes, the state layout of every group, sizes, checksums) and reads every chunk of this
// rank's rows, checking its CRC, one chunk in memory at a time; only when every rank
// succeeded it reads them again from the files it holds open, one state array at a time,
// into the engine's state, sets each param's step count (a checkpoint without them: every
// count = the step), writes the model tensors and returns the step count. Memory
// beyond the live state: the largest of this rank's state arrays, the open files' indexes.
// The checkpoint may come from any rank count and either layout. On any error in the check
// on any rank nothing has changed on any rank, and every rank returns the same error
// (DataLoss). (Rank files are never rewritten in place, so the second read sees the bytes
// the first checked; only a failing disk can fail it, and then the state is partly loaded.)
absl::Status LoadCheckpoint(const std::string& dir, const CheckpointLayout& expected,
                            Engine* engine, Communicator* comm, int64_t* step);

}  // namespace mdopt

#endif  // MDOPT_DIST_OPT_CHECKPOINT_H_
