#include "step_sim.h"

#include <algorithm>
#include <map>
#include <utility>

#include "comm/traffic.h"
#include "kernels/common/grad_presence.h"
#include "../scale/plan_model.h"

namespace mdopt_sim {
namespace {

using mdopt::BucketPlan;
using mdopt::Layout;
using mdopt::ParamEntry;
using mdopt::SlotPlan;
using mdopt::kernels::NsForm;

mdopt::DataType ParamType(const BucketPlan& b) {
  return b.param_dtype == mdopt::Dtype::kF32 ? mdopt::DataType::kF32 : mdopt::DataType::kBf16;
}
int ParamBytes(const BucketPlan& b) { return b.param_dtype == mdopt::Dtype::kF32 ? 4 : 2; }

// A matrix whose rows get the finishing pass: a sphere to project on or gains to step.
bool Finishes(const ParamEntry& p) {
  return p.rule.sphere != mdopt::kernels::Sphere::kNone || p.rule.gains != mdopt::kernels::Gains::kNone;
}

}  // namespace

double NsFlops(int64_t m, int64_t n, int steps, NsForm form) {
  const double s = static_cast<double>(std::min(m, n)), l = static_cast<double>(std::max(m, n));
  const double K = steps;
  // docs/ARCHITECTURE.md, Newton-Schulz: per iteration X X^T (s^2 l, symmetric: half a GEMM),
  // A^2 (s^3) and B X (2 s^2 l); the Gram form A_0 once, 4K - 3 products of s x s halves and
  // O = Q X (2 s^2 l). ns_form=auto takes Gram where l >= 2 s.
  const bool gram = form == NsForm::kGram || (form == NsForm::kAuto && l >= 2 * s);
  return gram ? 3 * s * s * l + (4 * K - 3) * s * s * s : K * (3 * s * s * l + s * s * s);
}

double GemmRate(const Hardware& hw, int64_t s) {
  return s < 1024 ? hw.gemm_tflops_small : s < 4096 ? hw.gemm_tflops_medium : hw.gemm_tflops_large;
}

int64_t RankBytesSent(const mdopt::ShardPlan& plan, const std::vector<ParamEntry>& params,
                      const SimOptions& o, int rank) {
  const int N = plan.world;
  if (N <= 1) return 0;
  // The finite check: one all-reduce of the check record (sums of squares and gradient
  // presence per param).
  int64_t bytes = mdopt::AllReduceTraffic(
      mdopt::kernels::CheckRecordLength(static_cast<int64_t>(params.size())), N,
      mdopt::DataType::kF64);
  const mdopt::DataType grad = o.grad_comm_bf16 ? mdopt::DataType::kBf16 : mdopt::DataType::kF32;
  const int64_t ns_elem = o.ns_comm_bf16 ? 2 : 4;
  std::vector<int64_t> counts(static_cast<size_t>(N));
  for (const BucketPlan& b : plan.buckets) {
    if (plan.equal_segments) {
      // Every rank's count of a window is the same, so the windows together send what one
      // call over the whole (padded) segment would: comm/traffic.h's formulas in closed form,
      // O(1) per bucket where the windows can number millions.
      const int64_t g = o.grad_comm_bf16 ? 2 : 4;
      if (!o.grads_reduced) bytes += (N - 1) * b.longest * g;
      bytes += (N - 1) * b.longest * ParamBytes(b);
    } else {
      for (int w = 0; w < b.Windows(); ++w) {
        b.WindowCounts(w, N, counts.data());
        if (!o.grads_reduced) bytes += mdopt::ReduceScatterTraffic(counts, rank, grad);
        bytes += mdopt::AllGatherTraffic(counts, rank, ParamType(b));
      }
    }
    int64_t record = 0;
    for (int k : b.slots) {
      const SlotPlan& s = plan.slots[k];
      record += s.cross + s.radial;
      if (!s.muon || s.layout != Layout::kRows) continue;
      // The NS gather (a block to the owner) and scatter (the owner's blocks back).
      if (rank != s.owner) {
        bytes += s.Rows(rank) * s.n * ns_elem;
      } else {
        bytes += (s.m - s.Rows(rank)) * s.n * ns_elem;
      }
    }
    if (record > 0) bytes += mdopt::AllReduceTraffic(record, N, mdopt::DataType::kF64);
  }
  return bytes;
}

double PlayWaves(const std::vector<BucketCost>& bk, const std::vector<double>& rs_ready, double start,
                 double check_all_reduce, bool deferred, int ranks, double* compute, double* comm) {
  const size_t B = bk.size();
  const size_t R = static_cast<size_t>(std::max(ranks, 1));
  std::vector<double> now(R, start), busy(R, 0.0);
  double comm_free = 0, comm_busy = 0;
  // In-order queues: an op starts when its queue is free and what it reads is ready.
  auto run = [&](double ready, double d) {  // the same op on every rank
    for (size_t r = 0; r < R; ++r) {
      now[r] = std::max(now[r], ready) + d;
      busy[r] += d;
    }
  };
  auto last = [&] { return *std::max_element(now.begin(), now.end()); };
  auto issue = [&](double d) {  // a collective every rank starts: after the last one does
    const double ready = last();
    if (d <= 0) return ready;
    comm_free = std::max(comm_free, ready) + d;
    comm_busy += d;
    return comm_free;
  };
  std::vector<double> rs_end(B), gathered(B), scattered(B), summed(B), weights(B);
  double free_rs = 0;  // the reduce-scatters are issued during backward, in bucket order
  for (size_t b = 0; b < B; ++b) {
    if (bk[b].reduce_scatter <= 0) {
      rs_end[b] = rs_ready[b];
      continue;
    }
    free_rs = std::max(free_rs, rs_ready[b]) + bk[b].reduce_scatter;
    rs_end[b] = free_rs;
    comm_busy += bk[b].reduce_scatter;
  }
  comm_free = free_rs;
  for (size_t b = 0; b < B; ++b) run(rs_end[b], bk[b].check);
  run(issue(check_all_reduce), 0.0);  // ApplyCheck waits for the verdict
  const int stages = 5;
  for (int wave = 0; wave < static_cast<int>(B) + stages - 1; ++wave) {
    for (int stage = 0; stage < stages; ++stage) {
      const int b = wave - stage;
      if (b < 0 || b >= static_cast<int>(B)) continue;
      const BucketCost& c = bk[b];
      switch (stage) {
        case 0:
          run(0.0, c.pass1);
          gathered[b] = c.gather > 0 ? issue(c.gather) : 0.0;
          break;
        case 1:
          // Only the owners compute; every rank's later work is ordered after the gather.
          run(gathered[b], 0.0);
          for (const auto& [owner, t] : c.ns_owners) {
            now[owner] += t;
            busy[owner] += t;
          }
          scattered[b] = c.scatter > 0 ? issue(c.scatter) : 0.0;
          break;
        case 2:
          run(scattered[b], c.pass2);
          summed[b] = c.cross > 0 ? issue(c.cross) : 0.0;
          break;
        case 3:
          run(summed[b], c.finish);
          weights[b] = deferred || c.all_gather <= 0 ? 0.0 : issue(c.all_gather);
          break;
        case 4:
          if (!deferred) run(weights[b], c.unpack);
          break;
      }
    }
  }
  // gather=deferred: mdopt_gather_params all-gathers bucket by bucket after the step.
  if (deferred) {
    for (size_t b = 0; b < B; ++b) run(issue(bk[b].all_gather), bk[b].unpack);
  }
  *compute = *std::max_element(busy.begin(), busy.end());
  *comm = comm_busy;
  return std::max(last(), comm_free) - start;
}

StepEstimate SimulateStep(const mdopt::ShardPlan& plan, const std::vector<ParamEntry>& params,
                          const Hardware& machine, const SimOptions& o) {
  const int N = plan.world;
  const Topology& topo = o.topo;
  StepEstimate est;
  const size_t B = plan.buckets.size();
  est.buckets.resize(B);
  // Ranks sharing cores (host_cores > 0: CPU ranks oversubscribing them) compute at a share,
  // and communicate at a share too: shared-memory transports copy with those same cores.
  const double share = machine.host_cores > 0 && N > machine.host_cores
                           ? static_cast<double>(machine.host_cores) / N
                           : 1.0;
  Hardware hw = machine;
  for (double* bw : {&hw.intra_busbw_gbps, &hw.inter_busbw_gbps, &hw.intra_p2p_gbps, &hw.inter_p2p_gbps})
    *bw *= share;
  const double hbm = hw.hbm_gbps * 1e9 * share;
  const double launch = hw.kernel_us * 1e-6;
  const double trainer = hw.peak_tflops * 1e12 * o.mfu;
  const double grad_wire = o.grads_reduced || N == 1 ? 0.0 : o.grad_comm_bf16 ? 2.0 : 4.0;
  const double ns_elem = o.ns_comm_bf16 ? 2.0 : 4.0;
  // Of an owner's N - 1 peers, these many share its node (their blocks come over NVLink).
  const double intra_frac = N <= 1 ? 1.0 : static_cast<double>(std::min(N, topo.per_node) - 1) / (N - 1);
  std::vector<int64_t> counts(static_cast<size_t>(N));
  double active_total = 0, bytes_mean = 0;
  std::vector<double> owner_flops(static_cast<size_t>(N), 0.0);
  for (size_t bi = 0; bi < B; ++bi) {
    const BucketPlan& bp = plan.buckets[bi];
    BucketCost& c = est.buckets[bi];
    const double wb = ParamBytes(bp);
    const double copy = wb == 2 ? 2.0 : 0.0;  // bf16 weights: the model copy each W write makes
    // Collectives, window by window.
    int64_t window_elems = 0;
    // A window's time at its mean segment: a ring moves (N - 1) / N of the whole window
    // through every link, whether the segments are equal (NCCL) or not (MPI's v-collectives).
    auto window = [&](double sum, double times) {
      window_elems += static_cast<int64_t>(sum * times);
      const double seg = sum / N;
      if (N > 1 && grad_wire > 0) c.reduce_scatter += times * ReduceScatterTime(hw, topo, seg * grad_wire);
      if (N > 1) c.all_gather += times * AllGatherTime(hw, topo, seg * wb);
      bytes_mean += N > 1 ? times * (N - 1.0) / N * sum * (grad_wire + wb) : 0.0;
    };
    if (plan.equal_segments) {
      // Equal counts: W - 1 full windows and the rest (O(1), the windows may be millions).
      const int64_t W = bp.Windows(), last = bp.longest - (W - 1) * bp.window;
      if (W > 1) window(static_cast<double>(bp.window) * N, W - 1.0);
      window(static_cast<double>(last) * N, 1.0);
    } else {
      for (int w = 0; w < bp.Windows(); ++w) {
        bp.WindowCounts(w, N, counts.data());
        int64_t sum = 0;
        for (int64_t x : counts) sum += x;
        window(static_cast<double>(sum), 1.0);
      }
    }
    // The elementwise passes, on the rank with the longest segment, in the proportions of
    // the bucket's kinds of matrix (docs/mdopt-sim.md, "Elementwise passes").
    double all = 0, muon = 0, adam = 0, fin = 0, active = 0;
    std::map<int, double> ns_time, ns_flops, ns_in;
    std::map<std::pair<int, std::pair<int64_t, int64_t>>, int> shapes;
    double most_sent = 0;
    int64_t record = 0;
    for (int k : bp.slots) {
      const SlotPlan& s = plan.slots[k];
      const ParamEntry& p = params[s.param];
      const double e = static_cast<double>(s.m) * s.n;
      all += e;
      (s.muon ? muon : adam) += e;
      if (Finishes(p)) fin += e;
      active += p.experts > 1 ? e * std::min<double>(o.moe_top_k, p.experts) / p.experts : e;
      record += s.cross + s.radial;
      if (!s.muon) continue;
      const int owner = N > 1 ? s.owner : 0;
      const double f = NsFlops(s.m, s.n, p.rule.ns_steps, o.ns_form);
      const bool first = shapes[{owner, {s.m, s.n}}]++ == 0;
      const double launches = (o.ns_batched && !first) ? 0.0 : 3.0 * p.rule.ns_steps * launch;
      ns_time[owner] += f / (GemmRate(hw, std::min(s.m, s.n)) * 1e12 * share) + launches;
      ns_flops[owner] += f;
      owner_flops[static_cast<size_t>(owner)] += f;
      if (s.layout == Layout::kRows && N > 1) {
        ns_in[owner] += static_cast<double>(s.m - s.Rows(owner)) * s.n * ns_elem;
        most_sent += static_cast<double>(s.block_rows) * s.n * ns_elem;
        bytes_mean += 2.0 * (s.m - s.Rows(owner)) * s.n * ns_elem / N;
      }
    }
    const double mine = N > 1 && all > 0 ? static_cast<double>(bp.longest) / all : 1.0;
    const double grad_read = grad_wire > 0 ? grad_wire : 4.0;
    c.check = launch + mine * all * grad_read / hbm;
    c.pass1 = launch + mine * (muon * 20.0 + adam * (28.0 + copy)) / hbm;
    c.pass2 = muon > 0 ? launch + mine * muon * (12.0 + copy) / hbm : 0.0;
    c.finish = launch + mine * fin * (8.0 + copy) / hbm + (N > 1 ? mine * all * 2 * wb / hbm : 0.0);
    c.unpack = N > 1 ? launch + window_elems * 2 * wb / hbm : 0.0;
    for (const auto& [owner, t] : ns_time) {
      c.ns_owners.emplace_back(owner, t);
      c.newton_schulz = std::max(c.newton_schulz, t);
      c.ns_flops = std::max(c.ns_flops, ns_flops[owner]);
    }
    double most_in = 0;
    for (const auto& kv : ns_in) most_in = std::max(most_in, kv.second);
    const double worst = std::max(most_in, most_sent);
    c.gather = PointToPointTime(hw, topo, worst * intra_frac, worst * (1 - intra_frac));
    c.scatter = c.gather;
    if (N > 1 && record > 0) {
      c.cross = AllReduceTime(hw, topo, 8.0 * record);
      bytes_mean += static_cast<double>(mdopt::AllReduceTraffic(record, N, mdopt::DataType::kF64));
    }
    c.backward = 4.0 * active * o.tokens_per_gpu / trainer;
    active_total += active;
  }
  const int64_t check_len = mdopt::kernels::CheckRecordLength(static_cast<int64_t>(params.size()));
  bytes_mean += static_cast<double>(mdopt::AllReduceTraffic(check_len, N, mdopt::DataType::kF64));
  const double check = AllReduceTime(hw, topo, 8.0 * static_cast<double>(check_len));

  // The trainer's backward releases the buckets in order (buckets are in reverse
  // registration order, the order backward produces gradients).
  std::vector<double> ready(B, 0.0);
  double t = 0;
  if (o.with_backward) {
    for (size_t b = 0; b < B; ++b) ready[b] = (t += est.buckets[b].backward);
    est.forward_backward = 6.0 * active_total * o.tokens_per_gpu / trainer;
  }
  est.step = PlayWaves(est.buckets, ready, t, check, o.gather_deferred, N, &est.compute,
                       &est.comm_total);
  est.exposed_comm = std::max(0.0, est.step - est.compute);
  est.iteration = est.forward_backward + est.step;
  est.bytes_mean = bytes_mean;
  est.ns_flops_max = *std::max_element(owner_flops.begin(), owner_flops.end());

  // The ranks worth a look (as mdopt-scale): first, most state, most NS, last.
  std::vector<double> state, ns;
  plan.Loads(&state, &ns);
  auto argmax = [](const std::vector<double>& v) {
    return static_cast<int>(std::max_element(v.begin(), v.end()) - v.begin());
  };
  std::vector<int> sample = {0, argmax(state), argmax(ns), N - 1};
  std::sort(sample.begin(), sample.end());
  sample.erase(std::unique(sample.begin(), sample.end()), sample.end());
  for (int r : sample) {
    est.state_max = std::max(est.state_max, mdopt_tools::StateOf(plan, params, r).state +
                                                mdopt_tools::StateOf(plan, params, r).replicated);
    est.bytes_max = std::max(est.bytes_max, static_cast<double>(RankBytesSent(plan, params, o, r)));
  }
  return est;
}

}  // namespace mdopt_sim
