// The manifest of a checkpoint (format 2): `manifest.json`, written by rank 0 last (the
// commit point of a save). Keys:
//   format ("mdopt-checkpoint"), format_version, abi_version, engine, world_size, step,
//   param_steps [per param, its own step count], groups [{name, spec}],
//   params [{name, group, ndim, shape, param_dtype, grad_dtype}],
//   plan {world, slots [{param, expert, m, n, layout, owner, block_rows, bucket}]},
//   rank_files [{rank, name, bytes, crc32c}],
//   crc32c: the CRC-32C (8 hex digits) of the compact dump of every other key.
// Readers ignore keys they do not know (the checksum covers them all), so a later version
// may add fields.
#ifndef MDOPT_DIST_OPT_CHECKPOINT_MANIFEST_H_
#define MDOPT_DIST_OPT_CHECKPOINT_MANIFEST_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "dist_opt/param_registry.h"
#include "dist_opt/rank_file.h"
#include "dist_opt/shard_plan.h"

namespace mdopt {

inline constexpr int kCheckpointFormatVersion = 2;
inline constexpr char kManifestName[] = "manifest.json";
// The format 1 manifest, named so that an old checkpoint is refused by its version.
inline constexpr char kManifestV1Name[] = "manifest.txt";

struct ManifestContent {
  std::string engine;
  int world_size = 1;
  int64_t step = 0;
  const std::vector<Group>* groups = nullptr;
  const std::vector<ParamEntry>* params = nullptr;
  const ShardPlan* plan = nullptr;
  std::vector<WrittenRankFile> rank_files;
  std::vector<int64_t> param_steps;  // one per param
};

// The manifest's text (pretty JSON with its checksum).
std::string ManifestText(const ManifestContent& c);

// A parsed and checked manifest, checked against the loading optimizer.
struct LoadedManifest {
  int world_size = 1;
  int64_t step = 0;
  // One per param. A manifest without param_steps was written when the optimizer kept one
  // count for every param: each param's count is then `step`, what it meant.
  std::vector<int64_t> param_steps;
  std::vector<SlotPlan> slots;  // the plan of the saving run, in slot order
  std::vector<int64_t> first_slot;
  std::vector<WrittenRankFile> rank_files;
};

// Reads dir's manifest and checks it (format version, checksum, engine, groups by name and
// state layout, params, shapes and dtypes, the saved plan against the params). All errors
// are DataLoss naming what is wrong.
absl::Status ReadManifest(const std::string& dir, const std::string& engine,
                          const std::vector<Group>& groups, const std::vector<ParamEntry>& params,
                          LoadedManifest* out);

}  // namespace mdopt

#endif  // MDOPT_DIST_OPT_CHECKPOINT_MANIFEST_H_
