#include "dist_opt/checkpoint.h"

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <memory>
#include <new>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "dist_opt/checkpoint_manifest.h"
#include "dist_opt/file_io.h"
#include "dist_opt/rank_file.h"

namespace mdopt {
namespace {

absl::Status IoError(absl::string_view what) { return absl::DataLossError(what); }

// How a state array is indexed: row-indexed (one row of `width` elements per matrix row
// this rank holds) or per matrix (column gains and radii, scalar gains, the radius of a
// Frobenius sphere), which every rank holding part of a rows-layout matrix replicates.
void ArrayShape(const std::string& name, const ParamEntry& p, bool* rows, int64_t* width) {
  *rows = true;
  *width = 1;
  if (name == "master" || name == "momentum" || name == "exp_avg" || name == "exp_avg_sq") {
    *width = p.n;
  } else if (name == "row_raw" || name == "row_exp_avg" || name == "row_exp_avg_sq") {
  } else if (name == "radius" && p.rule.sphere == kernels::Sphere::kRow) {
  } else {
    *rows = false;
  }
}

// --- agreeing on one status -------------------------------------------------------------
// Every rank contributes a fixed-size record; all of them then return the first failing
// rank's status, so that a collective call ends the same way everywhere.

constexpr size_t kRecordBytes = 1024;
constexpr size_t kMessageAt = 64, kNameAt = 24, kNameBytes = 32;

struct Record {
  uint8_t bytes[kRecordBytes] = {};
};

void PutStatus(const absl::Status& s, Record* r) {
  r->bytes[0] = s.ok() ? 1 : 0;
  r->bytes[1] = static_cast<uint8_t>(s.code());
  const std::string msg(s.message());
  std::memcpy(r->bytes + kMessageAt, msg.data(), std::min(msg.size(), kRecordBytes - kMessageAt - 1));
}

absl::Status GetStatus(const Record& r, int rank, int world) {
  if (r.bytes[0] == 1) return absl::OkStatus();
  std::string msg(reinterpret_cast<const char*>(r.bytes + kMessageAt));
  if (world > 1) msg = absl::StrCat("rank ", rank, ": ", msg);
  auto code = static_cast<absl::StatusCode>(r.bytes[1]);
  if (code == absl::StatusCode::kOk) code = absl::StatusCode::kDataLoss;
  return absl::Status(code, msg);
}

// All-gathers every rank's record into *all; the first failing rank's status, or OK.
absl::Status Exchange(Communicator* comm, const Record& mine, std::vector<Record>* all) {
  const int world = comm->size();
  all->assign(static_cast<size_t>(world), Record{});
  std::vector<int64_t> counts(static_cast<size_t>(world), static_cast<int64_t>(kRecordBytes));
  absl::StatusOr<RequestPtr> req = comm->AllGather(&mine, all->data(), counts, DataType::kBytes);
  if (!req.ok()) return req.status();
  if (absl::Status s = (*req)->Wait(); !s.ok()) return s;
  for (int q = 0; q < world; ++q)
    if (absl::Status s = GetStatus((*all)[q], q, world); !s.ok()) return s;
  return absl::OkStatus();
}

absl::Status Agree(Communicator* comm, const absl::Status& local) {
  Record mine;
  PutStatus(local, &mine);
  std::vector<Record> all;
  return Exchange(comm, mine, &all);
}

// Runs body, turning a failed allocation into ResourceExhausted, so that a rank out of
// memory still takes part in the status exchange rather than leaving the others waiting.
template <typename F>
absl::Status NoThrow(const char* call, F&& body) {
  try {
    return body();
  } catch (const std::bad_alloc&) {
    return absl::ResourceExhaustedError(absl::StrCat(call, ": out of memory; the optimizer is unchanged"));
  }
}

// --- save ----------------------------------------------------------------------------------

absl::Status SaveLocal(const std::string& dir, const CheckpointLayout& l, Engine* engine, int rank,
                       WrittenRankFile* out) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) return IoError(absl::StrCat("cannot create directory '", dir, "': ", ec.message()));
  const ShardPlan& plan = *engine->plan();
  std::vector<RankFileArray> arrays;
  for (size_t i = 0; i < l.params->size(); ++i) {
    const ParamEntry& p = (*l.params)[i];
    for (int64_t e = 0; e < p.experts; ++e) {
      const SlotPlan& sp = plan.slot(static_cast<int64_t>(i), e);
      const std::vector<StateArray> state = engine->State(static_cast<int64_t>(i), e);
      for (size_t k = 0; k < state.size(); ++k) {
        const StateArray& a = state[k];
        RankFileArray f;
        f.param = static_cast<int64_t>(i);
        f.expert = e;
        f.name = a.name;
        ArrayShape(a.name, p, &f.rows, &f.width);
        f.row0 = f.rows ? sp.RowBegin(rank) : 0;
        f.row1 = f.rows ? sp.RowEnd(rank) : 0;
        f.elem_size = a.elem_size;
        f.count = a.count;
        // Staged a chunk at a time: the live state may be in a device's memory.
        f.read = [engine, i, e, k](int64_t first, int64_t count, void* dst) {
          return engine->ReadState(static_cast<int64_t>(i), e, k, first, count, dst);
        };
        if (f.rows && (f.row1 - f.row0) * f.width != f.count) {
          return absl::InternalError(absl::StrCat("param '", p.name, "': array '", a.name, "' holds ",
                                                  a.count, " elements, not rows [", f.row0, ", ",
                                                  f.row1, ") of ", f.width));
        }
        arrays.push_back(std::move(f));
      }
    }
  }
  return WriteRankFile(dir, RankFileHeader{rank, l.world_size, l.step}, arrays, out);
}

// After the commit: files of earlier saves that no manifest names any more. Each rank
// removes its own; rank 0 also those of ranks this save did not have, and a format 1
// manifest (its rank files are among them).
void RemoveEarlierFiles(const std::string& dir, const std::string& keep, int rank, int world) {
  std::error_code ec;
  std::vector<std::filesystem::path> doomed;
  for (const auto& entry : std::filesystem::directory_iterator(dir, ec)) {
    const std::string name = entry.path().filename().string();
    int r = -1;
    if (name == keep) continue;
    if ((ParseRankFileOrTempName(name, &r) && (r == rank || (rank == 0 && r >= world))) ||
        (rank == 0 && name == kManifestV1Name)) {
      doomed.push_back(entry.path());
    }
  }
  for (const auto& p : doomed) std::filesystem::remove(p, ec);
}

// --- load ----------------------------------------------------------------------------------

// Where the bytes of one live array come from: elements [begin, end) of an array of rank
// file q, landing `at` bytes into the array.
struct Source {
  int q = 0;
  const IndexedArray* array = nullptr;
  int64_t begin = 0, end = 0;
  size_t at = 0;
};

// A live array (param, expert, index in State's order) and where its bytes are in the files.
struct Planned {
  int64_t param = 0, expert = 0;
  size_t array = 0;
  size_t bytes = 0;
  std::vector<Source> sources;
};

// What a load reads, with the rank files it opened. Readers stay open from the check to the
// copy: rank files are never written in place (a save writes new, content-named files and
// unlinks old ones), so the bytes read the second time are those checked the first time.
struct LoadPlan {
  std::vector<std::unique_ptr<RankFileReader>> readers;
  std::vector<Planned> arrays;
  int64_t step = 0;
  std::vector<int64_t> param_steps;  // one per param
};

// Reads the elements of every source of `a`, a chunk of the file at a time, through `read`;
// `dst` (may be null) receives the bytes at the source's place. Checks every chunk's CRC.
absl::Status ReadSources(LoadPlan* lp, const Planned& a, std::vector<char>* scratch, char* dst) {
  for (const Source& s : a.sources) {
    const IndexedArray& ia = *s.array;
    const size_t es = static_cast<size_t>(ia.elem_size);
    // One piece per file chunk, so that no chunk is read twice.
    for (int64_t b = s.begin; b < s.end;) {
      const int64_t e = std::min(s.end, (b / ia.chunk_elems + 1) * ia.chunk_elems);
      char* out = dst != nullptr ? dst + s.at + static_cast<size_t>(b - s.begin) * es : nullptr;
      if (out == nullptr) {
        scratch->resize(static_cast<size_t>(e - b) * es);
        out = scratch->data();
      }
      if (absl::Status st = lp->readers[static_cast<size_t>(s.q)]->Read(ia, b, e, out); !st.ok()) return st;
      b = e;
    }
  }
  return absl::OkStatus();
}

// Plans this rank's reads and checks them: the manifest against the optimizer, every rank
// file it needs (header, index, size, identity), and every chunk it will copy (CRC), holding
// one chunk at a time. Opens only the rank files holding rows this rank now holds.
absl::Status LoadLocal(const std::string& dir, const CheckpointLayout& want, Engine* engine,
                       int rank, LoadPlan* lp) {
  LoadedManifest m;
  if (absl::Status s = ReadManifest(dir, want.engine, *want.groups, *want.params, &m); !s.ok()) return s;
  auto mismatch = [&](absl::string_view what) {
    return IoError(absl::StrCat("checkpoint '", dir, "' does not match this optimizer: ", what));
  };
  // Rank files are opened (and their index checked) when first needed.
  lp->readers.resize(static_cast<size_t>(m.world_size));
  auto reader = [&](int q, RankFileReader** out) -> absl::Status {
    if (lp->readers[q] == nullptr) {
      auto r = std::make_unique<RankFileReader>();
      const WrittenRankFile& f = m.rank_files[q];
      if (absl::Status s = r->Open(dir + "/" + f.name, f.bytes, f.crc, RankFileHeader{q, m.world_size, m.step});
          !s.ok()) {
        return s;
      }
      lp->readers[q] = std::move(r);
    }
    *out = lp->readers[q].get();
    return absl::OkStatus();
  };
  // Finds array `name` of a slot in rank file q and checks it has the shape expected.
  auto find = [&](int q, const ParamEntry& p, int64_t i, int64_t e, const StateArray& a, bool rows,
                  int64_t width, const IndexedArray** out) -> absl::Status {
    RankFileReader* rd = nullptr;
    if (absl::Status s = reader(q, &rd); !s.ok()) return s;
    const IndexedArray* ia = rd->Find(i, e, a.name);
    if (ia == nullptr) {
      return mismatch(absl::StrCat("'", rd->path(), "' holds no '", a.name, "' of param '", p.name,
                                   "'", p.SlotWhere(e)));
    }
    if (ia->rows != rows || ia->elem_size != a.elem_size || (rows && ia->width != width)) {
      return mismatch(absl::StrCat("param '", p.name, "': array '", a.name, "' in '", rd->path(),
                                   "' is ", ia->rows ? "row-indexed" : "per-matrix", " of ",
                                   ia->elem_size, "-byte elements (width ", ia->width, "), expected ",
                                   rows ? "row-indexed" : "per-matrix", " of ", a.elem_size,
                                   "-byte elements (width ", width, ")"));
    }
    *out = ia;
    return absl::OkStatus();
  };

  const ShardPlan& plan = *engine->plan();
  for (size_t pi = 0; pi < want.params->size(); ++pi) {
    const int64_t i = static_cast<int64_t>(pi);
    const ParamEntry& p = (*want.params)[pi];
    for (int64_t e = 0; e < p.experts; ++e) {
      const SlotPlan& now = plan.slot(i, e);
      const SlotPlan& old = m.slots[m.first_slot[pi] + e];
      const int64_t r0 = now.RowBegin(rank), r1 = now.RowEnd(rank);
      const std::vector<StateArray> state = engine->State(i, e);
      for (size_t k = 0; k < state.size(); ++k) {
        const StateArray& a = state[k];
        bool rows = false;
        int64_t width = 1;
        ArrayShape(a.name, p, &rows, &width);
        Planned pl{i, e, k, static_cast<size_t>(a.bytes()), {}};
        const size_t es = static_cast<size_t>(a.elem_size);
        if (rows) {
          int64_t covered = 0;
          for (int q = 0; q < m.world_size && covered < r1 - r0; ++q) {
            const int64_t lo = std::max(r0, old.RowBegin(q)), hi = std::min(r1, old.RowEnd(q));
            if (lo >= hi) continue;
            const IndexedArray* ia = nullptr;
            if (absl::Status s = find(q, p, i, e, a, rows, width, &ia); !s.ok()) return s;
            if (ia->row0 != old.RowBegin(q) || ia->row1 != old.RowEnd(q)) {
              return IoError(absl::StrCat("'", lp->readers[q]->path(), "' holds rows [", ia->row0, ", ",
                                          ia->row1, ") of '", a.name, "' of param '", p.name,
                                          "', its manifest's plan says [", old.RowBegin(q), ", ",
                                          old.RowEnd(q), ")"));
            }
            pl.sources.push_back(Source{q, ia, (lo - ia->row0) * width, (hi - ia->row0) * width,
                                        static_cast<size_t>((lo - r0) * width) * es});
            covered += hi - lo;
          }
          if (covered != r1 - r0 || (r1 - r0) * width != a.count) {
            return IoError(absl::StrCat("checkpoint '", dir, "': rows [", r0, ", ", r1, ") of '", a.name,
                                        "' of param '", p.name, "' are not all in its rank files"));
          }
        } else {
          // Per-matrix arrays: the owner's file alone holds them (owner layout), every file
          // holding rows of the matrix (rows layout). Read from a file this rank reads rows
          // from anyway, its own first, so that no other file is opened for them.
          int q = old.layout == Layout::kOwner ? old.owner : -1;
          auto overlaps = [&](int c) {
            return c < m.world_size && std::max(r0, old.RowBegin(c)) < std::min(r1, old.RowEnd(c));
          };
          auto holds = [&](int c) { return c < m.world_size && old.RowBegin(c) < old.RowEnd(c); };
          if (q < 0 && overlaps(rank)) q = rank;
          for (int c = 0; q < 0 && c < m.world_size; ++c)
            if (overlaps(c)) q = c;
          // This rank holds no rows of the matrix now: its own file, else any holding rows.
          if (q < 0 && holds(rank)) q = rank;
          for (int c = 0; q < 0 && c < m.world_size; ++c)
            if (holds(c)) q = c;
          if (q < 0) q = 0;
          const IndexedArray* ia = nullptr;
          if (absl::Status s = find(q, p, i, e, a, rows, width, &ia); !s.ok()) return s;
          if (ia->count != a.count) {
            return mismatch(absl::StrCat("param '", p.name, "': array '", a.name, "' has ", ia->count,
                                         " elements in the checkpoint, ", a.count, " here"));
          }
          pl.sources.push_back(Source{q, ia, 0, a.count, 0});
        }
        lp->arrays.push_back(std::move(pl));
      }
    }
  }
  // Every chunk this rank will copy, checked now, one chunk in memory at a time.
  std::vector<char> scratch;
  for (const Planned& a : lp->arrays) {
    if (absl::Status s = ReadSources(lp, a, &scratch, nullptr); !s.ok()) return s;
  }
  lp->step = m.step;
  lp->param_steps = m.param_steps;
  return absl::OkStatus();
}

}  // namespace

absl::Status SaveCheckpoint(const std::string& dir, const CheckpointLayout& l, Engine* engine,
                            Communicator* comm) {
  const int rank = comm->rank(), world = comm->size();
  WrittenRankFile mine;
  const absl::Status local = NoThrow("mdopt_save", [&] { return SaveLocal(dir, l, engine, rank, &mine); });

  // Every rank's file (name, size, identity) reaches rank 0, and every rank learns whether
  // any failed. A failed save leaves the files it wrote: content-named, they may be those an
  // earlier manifest names, and are removed by the next save that succeeds.
  Record rec;
  PutStatus(local, &rec);
  if (local.ok()) {
    std::memcpy(rec.bytes + 8, &mine.bytes, sizeof mine.bytes);
    std::memcpy(rec.bytes + 16, &mine.crc, sizeof mine.crc);
    std::memcpy(rec.bytes + kNameAt, mine.name.data(), std::min(mine.name.size(), kNameBytes - 1));
  }
  std::vector<Record> all;
  if (absl::Status s = Exchange(comm, rec, &all); !s.ok()) return s;

  // Rank 0 commits: the manifest is renamed into place last.
  Record outcome;
  if (rank == 0) {
    absl::Status s = NoThrow("mdopt_save", [&] {
      ManifestContent c{l.engine, world, l.step, l.groups, l.params, engine->plan(), {}, {}};
      // Every rank holds the same counts (the skips come from one summed record).
      c.param_steps.resize(l.params->size());
      if (absl::Status s = engine->ReadParamSteps(c.param_steps.data()); !s.ok()) return s;
      for (const Record& r : all) {
        WrittenRankFile f;
        std::memcpy(&f.bytes, r.bytes + 8, sizeof f.bytes);
        std::memcpy(&f.crc, r.bytes + 16, sizeof f.crc);
        f.name = std::string(reinterpret_cast<const char*>(r.bytes + kNameAt));
        c.rank_files.push_back(std::move(f));
      }
      return WriteFileAtomically(dir, kManifestName, ManifestText(c));
    });
    PutStatus(s, &outcome);
  }
  if (world > 1) {
    if (absl::Status s = BroadcastBytes(*comm, absl::MakeSpan(outcome.bytes, kRecordBytes), 0); !s.ok()) return s;
  }
  if (absl::Status s = GetStatus(outcome, 0, world); !s.ok()) return s;
  // The new checkpoint is in place; files of earlier saves are no longer named by any
  // manifest (nor temporaries of saves that died).
  RemoveEarlierFiles(dir, mine.name, rank, world);
  return absl::OkStatus();
}

absl::Status LoadCheckpoint(const std::string& dir, const CheckpointLayout& want, Engine* engine,
                            Communicator* comm, int64_t* step) {
  // Two reads: the first checks everything this rank needs, on every rank, before anything
  // changes; the second copies it into the state one array at a time. Memory beyond the live
  // state: one chunk, then the largest of this rank's state arrays (not the whole state).
  LoadPlan lp;
  std::unique_ptr<char[]> buffer;
  const absl::Status local = NoThrow("mdopt_load", [&] {
    if (absl::Status s = LoadLocal(dir, want, engine, comm->rank(), &lp); !s.ok()) return s;
    size_t most = 0;
    for (const Planned& a : lp.arrays) most = std::max(most, a.bytes);
    buffer.reset(new char[std::max<size_t>(most, 1)]);  // before the agreement: no later bad_alloc
    return absl::OkStatus();
  });
  // Nothing changes unless every rank has all of its rows, checked.
  if (absl::Status s = Agree(comm, local); !s.ok()) return s;
  std::vector<char> unused;
  for (const Planned& a : lp.arrays) {
    // The files are open and were just checked; an error here is the disk failing mid-load.
    if (absl::Status s = ReadSources(&lp, a, &unused, buffer.get()); !s.ok()) {
      return absl::DataLossError(absl::StrCat(s.message(), " (after the checkpoint was checked: the "
                                              "state is partly loaded; load a checkpoint again)"));
    }
    if (absl::Status s = engine->WriteState(a.param, a.expert, a.array, buffer.get()); !s.ok()) return s;
  }
  buffer.reset();
  if (absl::Status s = engine->WriteParamSteps(lp.param_steps.data()); !s.ok()) return s;
  if (absl::Status s = engine->WriteModels(); !s.ok()) return s;
  *step = lp.step;
  return absl::OkStatus();
}

}  // namespace mdopt
