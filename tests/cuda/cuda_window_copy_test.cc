// The CUDA backend's copies between the model tensors and a bucket's collective windows
// (PackGrads, PackWeights, UnpackWeights per CommChunk), element by element, and its finite
// check of an expert stack split over two buckets.
//
// The copies are checked twice: against the spans applied on the host (BlockOf for each rank
// block of a strided span, the window's map from Window), bit for bit, and against what each
// rank's segment holds at each position of the window, built from the layout alone (so that
// the spans this test writes are themselves right). The layout has a row block larger than
// one copy piece, row blocks that end in padding (the last ranks' rows run out), owned parts
// on some ranks only, and windows that cut row blocks and owned parts; once with uneven
// segments and once with equal ones (tail padding, never packed).
//
// Every test skips, with the CUDA runtime's reason, where no GPU is usable.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <ostream>
#include <string>
#include <vector>

#include "cuda_test_util.h"
#include "kernels/backend.h"
#include "kernels/backend_factory.h"
#include "kernels/common/bf16.h"
#include "kernels/common/segment_map.h"

namespace mdopt {
namespace {

using kernels::BackendConfig;
using kernels::Base;
using kernels::BucketDesc;
using kernels::CommChunk;
using kernels::CopySpan;
using kernels::Dtype;
using kernels::OwnedPart;
using kernels::ParamDesc;
using kernels::ParamPointers;
using kernels::SegmentMap;
using kernels::SegmentView;
using kernels::SlotDesc;
using kernels::SpanBlock;
using kernels::StepBackend;

constexpr int kWorld = 5, kMe = 2;

// A rows-layout matrix: every rank's block of `per_rank` rows at `off` in the rows part.
struct RowMat {
  int64_t m, n, per_rank, off = 0;
  int64_t block() const { return per_rank * n; }
};
// A whole matrix in one rank's owned part.
struct OwnMat {
  int rank;
  int64_t m, n;
};

struct Layout {
  std::vector<RowMat> rows;
  std::vector<OwnMat> owned;  // by rank, in segment order within a rank
  int64_t rows_len = 0;
  SegmentMap full;            // the whole segments
  std::vector<std::vector<int64_t>> own_at;  // per owned matrix: its param, its offset in its rank's owned part
};

int64_t ParamOfRow(size_t i) { return static_cast<int64_t>(i); }

Layout MakeLayout(bool equal) {
  Layout l;
  // A block of 16,800 elements (two copy pieces); blocks whose last ranks hold fewer rows or
  // none (padding).
  l.rows = {{18, 4200, 4}, {13, 7, 3}, {4, 10, 1}, {9, 5, 2}};
  for (RowMat& r : l.rows) {
    r.off = l.rows_len;
    l.rows_len += r.block();
  }
  l.owned = {{1, 3, 10}, {1, 2, 4}, {2, 3, 4}, {3, 17, 1}};
  l.full.rows = l.rows_len;
  int64_t before = 0;
  std::vector<int64_t> in_rank(kWorld, 0);
  for (size_t i = 0; i < l.owned.size(); ++i) {
    const OwnMat& o = l.owned[i];
    l.own_at.push_back({static_cast<int64_t>(l.rows.size() + i), in_rank[o.rank]});
    in_rank[o.rank] += o.m * o.n;
  }
  for (int r = 0; r < kWorld; ++r) {
    if (in_rank[r] == 0) continue;
    l.full.owned.push_back(OwnedPart{r, in_rank[r], before});
    before += in_rank[r];
  }
  if (equal) {
    int64_t longest = 0;
    for (int r = 0; r < kWorld; ++r) longest = std::max(longest, l.full.view().Real(r));
    l.full.equal = longest + 5;
  }
  return l;
}

// The window [begin, begin + len) of the layout's segments with the spans a planner would
// write for it.
CommChunk MakeWindow(const Layout& l, int64_t begin, int64_t len, bool equal) {
  CommChunk ch;
  ch.seg_begin = begin;
  std::vector<OwnedPart> parts(l.full.owned.size());
  const SegmentView w = kernels::Window(l.full.view(), begin, len, parts.data());
  ch.map.rows = w.rows;
  ch.map.equal = w.equal;
  ch.map.owned.assign(w.owned, w.owned + w.owned_count);
  ch.total = kernels::TotalOf(ch.map.view(), kWorld);
  const SegmentView v = ch.map.view();
  const int64_t end = begin + len;
  for (size_t i = 0; i < l.rows.size(); ++i) {
    const RowMat& r = l.rows[i];
    const int64_t lo = std::max(r.off, begin), hi = std::min(r.off + r.block(), end);
    if (lo >= hi) continue;
    CopySpan s;
    s.param = ParamOfRow(i);
    s.tensor_offset = lo - r.off;
    s.buffer_offset = lo - begin;
    s.count = hi - lo;
    s.blocks = kWorld;
    s.block_stride = r.block();
    s.tensor_end = r.m * r.n;
    ch.grad_pack.push_back(s);
    s.skip_rank = kMe;
    ch.weight_unpack.push_back(s);
    // This rank's own block: a plain span, its padding after the real rows.
    CopySpan own;
    own.param = s.param;
    own.tensor_offset = kMe * r.block() + (lo - r.off);
    own.buffer_offset = v.Start(kMe) + (lo - begin);
    own.count = std::clamp<int64_t>(r.m * r.n - own.tensor_offset, 0, hi - lo);
    own.pad = hi - lo - own.count;
    ch.weight_pack.push_back(own);
  }
  for (size_t i = 0; i < l.owned.size(); ++i) {
    const OwnMat& o = l.owned[i];
    const int64_t at = l.rows_len + l.own_at[i][1];
    const int64_t lo = std::max(at, begin), hi = std::min(at + o.m * o.n, end);
    if (lo >= hi) continue;
    CopySpan s;
    s.param = l.own_at[i][0];
    s.tensor_offset = lo - at;
    s.buffer_offset = v.Start(o.rank) + (lo - begin);
    s.count = hi - lo;
    // With equal segments, rank 1's last matrix also zeroes its tail padding in the window
    // (a plain span's pad): allowed, and it runs the plain padding path.
    const bool last_of_rank = i + 1 == l.owned.size() || l.owned[i + 1].rank != o.rank;
    if (equal && o.rank == 1 && last_of_rank) s.pad = v.Len(1) - (hi - begin);
    ch.grad_pack.push_back(s);
    if (o.rank == kMe) {
      ch.weight_pack.push_back(s);
    } else {
      s.pad = 0;
      ch.weight_unpack.push_back(s);
    }
  }
  return ch;
}

// Each rank's segment as the layout defines it: position -> (param, element), or padding.
struct Elem {
  int64_t param = -1, elem = 0;  // param -1: padding (zero when packed)
};
Elem SegmentAt(const Layout& l, int r, int64_t s) {
  if (s < l.rows_len) {
    for (size_t i = 0; i < l.rows.size(); ++i) {
      const RowMat& m = l.rows[i];
      if (s < m.off || s >= m.off + m.block()) continue;
      const int64_t e = r * m.block() + (s - m.off);
      return e < m.m * m.n ? Elem{ParamOfRow(i), e} : Elem{};
    }
  }
  for (size_t i = 0; i < l.owned.size(); ++i) {
    const OwnMat& o = l.owned[i];
    const int64_t at = l.rows_len + l.own_at[i][1];
    if (o.rank == r && s >= at && s < at + o.m * o.n) return Elem{l.own_at[i][0], s - at};
  }
  return Elem{-1, -1};  // beyond the rank's real data: tail padding
}

// Host tensors as bytes of their dtype; values read and written as f32 (bf16 converted).
struct Tensor {
  Dtype d;
  std::vector<uint8_t> bytes;
  size_t size() const { return bytes.size() / (d == Dtype::kF32 ? 4 : 2); }
};
uint32_t Bits(const Tensor& t, int64_t e) {
  if (t.d == Dtype::kF32) {
    uint32_t v;
    std::memcpy(&v, t.bytes.data() + 4 * e, 4);
    return v;
  }
  uint16_t v;
  std::memcpy(&v, t.bytes.data() + 2 * e, 2);
  return v;
}
// Element e of `from` written into `to` at f, converted as the backend converts.
void Move(const Tensor& from, int64_t e, Tensor* to, int64_t f) {
  if (from.d == to->d) {
    const size_t b = from.d == Dtype::kF32 ? 4 : 2;
    std::memcpy(to->bytes.data() + b * f, from.bytes.data() + b * e, b);
  } else if (from.d == Dtype::kBf16) {
    const float v = kernels::Bf16ToFloat(static_cast<uint16_t>(Bits(from, e)));
    std::memcpy(to->bytes.data() + 4 * f, &v, 4);
  } else {
    float v;
    std::memcpy(&v, from.bytes.data() + 4 * e, 4);
    const uint16_t h = kernels::FloatToBf16(v);
    std::memcpy(to->bytes.data() + 2 * f, &h, 2);
  }
}
void Zero(Tensor* t, int64_t f) {
  const size_t b = t->d == Dtype::kF32 ? 4 : 2;
  std::memset(t->bytes.data() + b * f, 0, b);
}
Tensor Random(Dtype d, int64_t count, uint64_t seed) {
  const std::vector<double> v = testing::RandomNormal(static_cast<size_t>(count), seed);
  Tensor t{d, std::vector<uint8_t>(static_cast<size_t>(count) * (d == Dtype::kF32 ? 4 : 2))};
  for (int64_t e = 0; e < count; ++e) {
    const float f = static_cast<float>(v[e]);
    if (d == Dtype::kF32) {
      std::memcpy(t.bytes.data() + 4 * e, &f, 4);
    } else {
      const uint16_t h = kernels::FloatToBf16(f);
      std::memcpy(t.bytes.data() + 2 * e, &h, 2);
    }
  }
  return t;
}
Tensor Filled(Dtype d, int64_t count, uint8_t byte) {
  return Tensor{d, std::vector<uint8_t>(static_cast<size_t>(count) * (d == Dtype::kF32 ? 4 : 2), byte)};
}

// The spans applied on the host: tensors -> staging (padding zeroed) or back (skipped).
void PackOnHost(const std::vector<CopySpan>& spans, const SegmentView& map,
                const std::vector<Tensor>& tensors, Tensor* staging) {
  for (const CopySpan& c : spans) {
    std::vector<SpanBlock> blocks;
    if (c.blocks == 0) {
      blocks.push_back({c.tensor_offset, c.buffer_offset, c.count, c.pad});
    } else {
      for (int r = 0; r < c.blocks; ++r)
        if (r != c.skip_rank) blocks.push_back(kernels::BlockOf(c, map, r));
    }
    for (const SpanBlock& b : blocks) {
      for (int64_t e = 0; e < b.real; ++e) Move(tensors[c.param], b.tensor + e, staging, b.buffer + e);
      for (int64_t e = 0; e < b.pad; ++e) Zero(staging, b.buffer + b.real + e);
    }
  }
}
void UnpackOnHost(const std::vector<CopySpan>& spans, const SegmentView& map, const Tensor& staging,
                  std::vector<Tensor>* tensors) {
  for (const CopySpan& c : spans) {
    for (int r = 0; r < std::max(c.blocks, 1); ++r) {
      if (c.blocks > 0 && r == c.skip_rank) continue;
      const SpanBlock b = c.blocks > 0 ? kernels::BlockOf(c, map, r)
                                       : SpanBlock{c.tensor_offset, c.buffer_offset, c.count, 0};
      for (int64_t e = 0; e < b.real; ++e) Move(staging, b.buffer + e, &(*tensors)[c.param], b.tensor + e);
    }
  }
}

std::vector<uint8_t> Download(const void* dev, size_t bytes) {
  std::vector<uint8_t> out(bytes);
  cudaMemcpy(out.data(), dev, bytes, cudaMemcpyDeviceToHost);
  return out;
}

// The first element where two tensors' bits differ, or -1.
int64_t FirstDifference(const Tensor& a, const Tensor& b) {
  for (size_t e = 0; e < a.size(); ++e)
    if (Bits(a, static_cast<int64_t>(e)) != Bits(b, static_cast<int64_t>(e))) return static_cast<int64_t>(e);
  return -1;
}

struct Case {
  bool equal;
  Dtype grad, param;
  bool comm_bf16;
};

void PrintTo(const Case& c, std::ostream* os) {
  *os << (c.equal ? "equal" : "uneven") << " segments, " << (c.grad == Dtype::kBf16 ? "bf16" : "f32")
      << " grads, " << (c.comm_bf16 ? "bf16" : "f32") << " comm, "
      << (c.param == Dtype::kBf16 ? "bf16" : "f32") << " params";
}

class CudaWindowCopies : public ::testing::TestWithParam<Case> {};

TEST_P(CudaWindowCopies, PackAndUnpackEveryWindowAsTheSpansSay) {
  MDOPT_SKIP_WITHOUT_GPU();
  const Case& tc = GetParam();
  const Layout l = MakeLayout(tc.equal);
  const SegmentView full = l.full.view();
  int64_t longest = 0;
  for (int r = 0; r < kWorld; ++r) longest = std::max(longest, full.Len(r));
  // Windows that cut the large block's neighbour, the owned parts and the tail.
  const std::vector<int64_t> cuts = {0, 16830, 16845, 16860, longest};

  BackendConfig cfg;
  cfg.sharded = true;
  cfg.grads_segmented = true;
  cfg.grad_comm_bf16 = tc.comm_bf16;
  BucketDesc b;
  b.param_dtype = tc.param;
  b.seg = full.Len(kMe);
  auto add_param = [&](int64_t m, int64_t n) {
    ParamDesc p;
    p.name = "p" + std::to_string(cfg.params.size());
    p.n = n;
    p.param_dtype = tc.param;
    p.grad_dtype = tc.grad;
    p.rule.base = Base::kAdamW;
    SlotDesc s;
    s.param = static_cast<int64_t>(cfg.params.size());
    s.m = m;
    b.slots.push_back(static_cast<int>(cfg.slots.size()));
    cfg.slots.push_back(s);
    cfg.params.push_back(p);
  };
  for (const RowMat& r : l.rows) add_param(r.m, r.n);
  for (const OwnMat& o : l.owned) add_param(o.m, o.n);
  b.end_param = static_cast<int64_t>(cfg.params.size());
  cfg.check_len = 2 * b.end_param;  // sums of squares, then presence
  for (size_t c = 0; c + 1 < cuts.size(); ++c)
    b.chunks.push_back(MakeWindow(l, cuts[c], cuts[c + 1] - cuts[c], tc.equal));
  cfg.buckets.push_back(b);

  std::vector<Tensor> grads, weights;
  std::vector<std::unique_ptr<testing::DeviceVec<uint8_t>>> dg, dw;
  std::vector<ParamPointers> ptrs;
  for (size_t i = 0; i < cfg.params.size(); ++i) {
    const int64_t count = cfg.slots[i].m * cfg.params[i].n;  // one slot per param
    grads.push_back(Random(tc.grad, count, 100 + i));
    weights.push_back(Random(tc.param, count, 200 + i));
    dg.push_back(std::make_unique<testing::DeviceVec<uint8_t>>());
    dw.push_back(std::make_unique<testing::DeviceVec<uint8_t>>());
    dg.back()->Upload(grads.back().bytes);
    dw.back()->Upload(weights.back().bytes);
    ptrs.push_back({dw.back()->get(), dg.back()->get()});
  }
  auto made = kernels::MakeBackend({"cuda:0", 0});
  ASSERT_TRUE(made.ok()) << made.status();
  std::unique_ptr<StepBackend> gpu = *std::move(made);
  gpu->Enter();
  ASSERT_TRUE(gpu->Setup(cfg, ptrs).ok());
  const kernels::BucketBuffers buf = gpu->Buffers(0);
  const Dtype comm = tc.comm_bf16 ? Dtype::kBf16 : Dtype::kF32;

  for (size_t c = 0; c < b.chunks.size(); ++c) {
    SCOPED_TRACE("window " + std::to_string(c));
    const CommChunk& ch = b.chunks[c];
    const SegmentView v = ch.map.view();
    ASSERT_EQ(ch.total, kernels::TotalOf(v, kWorld));

    // Gradients: every rank's part of the window. Positions no span writes keep the sentinel.
    Tensor want = Filled(comm, ch.total, 0x5a);
    cudaMemcpy(buf.grad_send, want.bytes.data(), want.bytes.size(), cudaMemcpyHostToDevice);
    PackOnHost(ch.grad_pack, v, grads, &want);
    gpu->PackGrads(0, static_cast<int>(c));
    cudaDeviceSynchronize();
    const Tensor got{comm, Download(buf.grad_send, want.bytes.size())};
    EXPECT_EQ(FirstDifference(got, want), -1) << "PackGrads against the spans on the host";
    // ... and against the segments themselves, at every real position of every rank.
    for (int r = 0; r < kWorld; ++r) {
      for (int64_t x = 0; x < v.Real(r); ++x) {
        const Elem e = SegmentAt(l, r, ch.seg_begin + x);
        ASSERT_GE(e.elem, 0) << "rank " << r << " position " << x << " is beyond its data";
        Tensor one = Filled(comm, 1, 0);
        if (e.param >= 0) Move(grads[e.param], e.elem, &one, 0);
        ASSERT_EQ(Bits(got, v.Start(r) + x), Bits(one, 0)) << "rank " << r << " position " << x;
      }
    }

    // Weights: this rank's part.
    Tensor wwant = Filled(tc.param, ch.total, 0x5a);
    cudaMemcpy(buf.weights, wwant.bytes.data(), wwant.bytes.size(), cudaMemcpyHostToDevice);
    PackOnHost(ch.weight_pack, v, weights, &wwant);
    gpu->PackWeights(0, static_cast<int>(c));
    cudaDeviceSynchronize();
    const Tensor wgot{tc.param, Download(buf.weights, wwant.bytes.size())};
    EXPECT_EQ(FirstDifference(wgot, wwant), -1) << "PackWeights";
    for (int64_t x = 0; x < v.Real(kMe); ++x) {
      const Elem e = SegmentAt(l, kMe, ch.seg_begin + x);
      Tensor one = Filled(tc.param, 1, 0);
      if (e.param >= 0) Move(weights[e.param], e.elem, &one, 0);
      ASSERT_EQ(Bits(wgot, v.Start(kMe) + x), Bits(one, 0)) << "own position " << x;
    }

    // The all-gathered weights back into the other ranks' rows and matrices.
    const Tensor gathered = Random(tc.param, ch.total, 300 + c);
    cudaMemcpy(buf.weights, gathered.bytes.data(), gathered.bytes.size(), cudaMemcpyHostToDevice);
    UnpackOnHost(ch.weight_unpack, v, gathered, &weights);
    gpu->UnpackWeights(0, static_cast<int>(c));
    cudaDeviceSynchronize();
    for (size_t i = 0; i < weights.size(); ++i) {
      const Tensor t{tc.param, dw[i]->Download()};
      EXPECT_EQ(FirstDifference(t, weights[i]), -1) << "UnpackWeights, param " << i;
    }
  }
  gpu->Leave();
}

std::vector<Case> Cases() {
  std::vector<Case> out;
  for (bool equal : {false, true}) {
    out.push_back({equal, Dtype::kF32, Dtype::kF32, false});
    out.push_back({equal, Dtype::kBf16, Dtype::kBf16, false});  // bf16 grads widened to f32
    out.push_back({equal, Dtype::kBf16, Dtype::kBf16, true});
    out.push_back({equal, Dtype::kF32, Dtype::kF32, true});     // f32 grads rounded to bf16
  }
  return out;
}

INSTANTIATE_TEST_SUITE_P(Layouts, CudaWindowCopies, ::testing::ValuesIn(Cases()),
                         [](const ::testing::TestParamInfo<Case>& i) {
                           const Case& c = i.param;
                           return std::string(c.equal ? "equal" : "uneven") +
                                  (c.grad == Dtype::kBf16 ? "_bf16g" : "_f32g") +
                                  (c.comm_bf16 ? "_bf16comm" : "_f32comm") +
                                  (c.param == Dtype::kBf16 ? "_bf16p" : "_f32p");
                         });

// An expert stack split over two buckets by experts, its slots interleaved with another
// param's: the first bucket sets the param's check value, the second adds to it, every step.
TEST(CudaWindowCheck, SplitExpertStackSumsOverItsBuckets) {
  MDOPT_SKIP_WITHOUT_GPU();
  BackendConfig cfg;
  const int64_t experts = 4, m = 8, n = 16, ym = 5, yn = 7;
  for (int i = 0; i < 2; ++i) {
    ParamDesc p;
    p.name = i == 0 ? "stack" : "other";
    p.experts = i == 0 ? experts : 1;
    p.n = i == 0 ? n : yn;
    p.rule.base = Base::kAdamW;
    cfg.params.push_back(p);
  }
  // Slots 0-3: the stack's experts; slot 4: the other param. Bucket 0 holds experts 0 and 1
  // with the other param between them, bucket 1 experts 2 and 3.
  std::vector<int64_t> seg(2, 0);
  auto slot = [&](int64_t param, int64_t e, int bucket) {
    const ParamDesc& p = cfg.params[param];
    const int64_t pm = param == 0 ? m : ym;
    SlotDesc s;
    s.param = param;
    s.bucket = bucket;
    s.m = pm;
    s.tensor_offset = e * pm * p.n;
    s.rows = pm;
    s.holds = true;
    s.accounts = true;
    s.seg_offset = seg[bucket];
    seg[bucket] += pm * p.n;
    cfg.slots.push_back(s);
  };
  for (int64_t e = 0; e < experts; ++e) slot(0, e, e < 2 ? 0 : 1);
  slot(1, 0, 0);
  BucketDesc b0, b1;
  b0.slots = {0, 4, 1};
  b0.first_param = 0;
  b0.end_param = 2;
  b0.seg = seg[0];
  b1.slots = {2, 3};
  b1.first_param = 0;
  b1.end_param = 1;
  b1.seg = seg[1];
  cfg.buckets = {b0, b1};
  cfg.check_len = 4;  // 2 params: sums of squares, then presence

  std::vector<std::unique_ptr<testing::DeviceVec<float>>> dw, dg;
  std::vector<ParamPointers> ptrs;
  for (const ParamDesc& p : cfg.params) {
    const size_t count = static_cast<size_t>(p.experts * (&p == &cfg.params[0] ? m : ym) * p.n);
    dw.push_back(std::make_unique<testing::DeviceVec<float>>(count));
    dg.push_back(std::make_unique<testing::DeviceVec<float>>(count));
    const std::vector<double> w = testing::RandomNormal(count, 5 + ptrs.size());
    dw.back()->Upload(std::vector<float>(w.begin(), w.end()));
    ptrs.push_back({dw.back()->get(), dg.back()->get()});
  }
  auto made = kernels::MakeBackend({"cuda:0", 0});
  ASSERT_TRUE(made.ok()) << made.status();
  std::unique_ptr<StepBackend> gpu = *std::move(made);
  gpu->Enter();
  ASSERT_TRUE(gpu->Setup(cfg, ptrs).ok());
  for (int step = 0; step < 2; ++step) {
    std::vector<double> want;
    for (size_t i = 0; i < cfg.params.size(); ++i) {
      const std::vector<double> g = testing::RandomNormal(dg[i]->size(), 50 + 10 * step + i, 1.0 + step);
      const std::vector<float> gf(g.begin(), g.end());
      cudaMemcpy(dg[i]->get(), gf.data(), gf.size() * sizeof(float), cudaMemcpyHostToDevice);
      double sq = 0.0;
      for (double x : g) sq += static_cast<double>(static_cast<float>(x)) * static_cast<float>(x);
      want.push_back(sq);
    }
    ASSERT_TRUE(gpu->BindParams(0, ptrs).ok());
    gpu->BeginStep({{1e-3, 1e-3}});
    gpu->CheckFinite(0);
    gpu->CheckFinite(1);
    cudaDeviceSynchronize();
    std::vector<double> got(2);
    cudaMemcpy(got.data(), gpu->check_record(), 2 * sizeof(double), cudaMemcpyDeviceToHost);
    for (size_t i = 0; i < 2; ++i)
      EXPECT_NEAR(got[i], want[i], 1e-12 * want[i]) << "param " << i << ", step " << step;
  }
  gpu->Leave();
}

}  // namespace
}  // namespace mdopt
