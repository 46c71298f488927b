// The POSIX file operations of checkpoints, apart from the formats (checkpoint_manifest.h,
// rank_file.h) that decide what goes into the files. Every error is DataLoss (IO_ERROR)
// reading "<what> '<path>': <strerror>", as mdopt_save and mdopt_load report them.
#ifndef MDOPT_DIST_OPT_FILE_IO_H_
#define MDOPT_DIST_OPT_FILE_IO_H_

#include <string>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"

namespace mdopt {

// DataLoss "<what> '<path>': <strerror(errno)>", for the errno just set.
absl::Status ErrnoError(absl::string_view what, const std::string& path);

// Whether nothing is at path (stat says ENOENT); false on any other stat error too.
bool IsMissing(const std::string& path);

// The whole of a (small) file.
absl::Status ReadWholeFile(const std::string& path, std::string* out);

// Writes data to dir/name through dir/name.tmp: write, fsync, rename, fsync the directory.
// On failure the temporary is removed and dir/name is as it was.
absl::Status WriteFileAtomically(const std::string& dir, const std::string& name,
                                 const std::string& data);

// Makes a rename into dir durable; best effort (a directory that cannot be opened is left).
void FsyncDir(const std::string& dir);

}  // namespace mdopt

#endif  // MDOPT_DIST_OPT_FILE_IO_H_
