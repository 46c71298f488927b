// The CUDA runtime emulation of cuda_runtime.h (this folder). Device memory is aligned host
// memory kept in a map (cudaPointerGetAttributes answers from it); streams and events are
// tokens, every operation completes at once. A launch runs its blocks in order; a block's
// threads are fibers run round-robin, each until its next barrier: __syncthreads and each
// half of a warp shuffle are barriers of the whole block, which is what they are when, as
// in mdopt's kernels, every thread of the block reaches them. A fiber switch saves the
// callee-saved registers and the stack pointer (x86-64 System V), a few nanoseconds, where
// swapcontext's signal-mask system call cost a microsecond.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <vector>

#include "cuda_runtime.h"

dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace {

std::mutex g_mu;
std::map<const char*, size_t>* g_device = new std::map<const char*, size_t>();  // base -> bytes
cudaError_t g_last = cudaSuccess;
int g_current = 0;
int64_t g_allocations = 0;

cudaError_t Fail(cudaError_t e) {
  g_last = e;
  return e;
}

}  // namespace

// Saves the callee-saved registers on the current stack, stores the stack pointer in *save,
// switches to the stack `load` and restores its registers.
extern "C" void mdopt_emu_switch(void** save, void* load);
asm(R"(
  .text
  .globl mdopt_emu_switch
  .type mdopt_emu_switch, @function
mdopt_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size mdopt_emu_switch, .-mdopt_emu_switch
)");

namespace {

// The fibers of the block being run.
struct Fiber {
  void* sp = nullptr;
  std::vector<char> stack;
  bool done = false;
};

constexpr size_t kStackBytes = 256 << 10;
void* g_main_sp = nullptr;
std::vector<Fiber>* g_fibers = new std::vector<Fiber>();
const std::function<void()>* g_kernel = nullptr;
unsigned g_running = 0;    // the fiber now running
int64_t g_switches = 0;
double g_shfl[1024];       // one value per thread of the block (a warp shuffle's exchange)

void Yield() {
  ++g_switches;
  mdopt_emu_switch(&(*g_fibers)[g_running].sp, g_main_sp);
}

[[noreturn]] void FiberMain() {
  (*g_kernel)();
  (*g_fibers)[g_running].done = true;
  mdopt_emu_switch(&(*g_fibers)[g_running].sp, g_main_sp);
  std::abort();  // a finished fiber is never switched to again
}

// A fresh stack whose first switch "returns" into FiberMain as if it had been called.
void* FreshStack(Fiber* f) {
  f->stack.resize(kStackBytes);
  uintptr_t top = reinterpret_cast<uintptr_t>(f->stack.data() + f->stack.size()) & ~uintptr_t{15};
  void** sp = reinterpret_cast<void**>(top);
  *--sp = nullptr;                                       // FiberMain's return address (never used)
  *--sp = reinterpret_cast<void*>(&FiberMain);           // where the switch's ret goes
  for (int r = 0; r < 6; ++r) *--sp = nullptr;           // rbp rbx r12 r13 r14 r15
  return sp;
}

}  // namespace

cudaError_t cudaGetLastError() {
  const cudaError_t e = g_last;
  g_last = cudaSuccess;
  return e;
}
const char* cudaGetErrorName(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
    case cudaErrorNoDevice: return "cudaErrorNoDevice";
  }
  return "cudaErrorUnknown";
}
const char* cudaGetErrorString(cudaError_t e) { return cudaGetErrorName(e); }
cudaError_t cudaGetDeviceCount(int* count) {
  *count = 1;
  return cudaSuccess;
}
cudaError_t cudaGetDevice(int* device) {
  *device = g_current;
  return cudaSuccess;
}
cudaError_t cudaSetDevice(int device) {
  if (device != 0) return Fail(cudaErrorInvalidDevice);
  g_current = device;
  return cudaSuccess;
}
cudaError_t cudaGetDeviceProperties(cudaDeviceProp* prop, int) {
  std::snprintf(prop->name, sizeof prop->name, "CUDA emulation on the CPU");
  prop->major = 9;
  prop->minor = 0;
  return cudaSuccess;
}
cudaError_t cudaRuntimeGetVersion(int* v) {
  *v = 13000;
  return cudaSuccess;
}
cudaError_t cudaDriverGetVersion(int* v) {
  *v = 13000;
  return cudaSuccess;
}
// The emulated device's memory: an allocation above it fails as cudaMalloc does on a GPU.
constexpr size_t kDeviceBytes = size_t{8} << 30;

cudaError_t cudaMalloc(void** p, size_t bytes) {
  if (bytes > kDeviceBytes) return Fail(cudaErrorMemoryAllocation);
  // Fresh memory is filled with a pattern, not zeros: code that reads what it never wrote
  // gives NaNs (0xff bytes) rather than a lucky zero.
  const size_t size = ((bytes == 0 ? 1 : bytes) + 255) & ~size_t{255};
  void* q = std::aligned_alloc(256, size);
  if (q == nullptr) return Fail(cudaErrorMemoryAllocation);
  ++g_allocations;
  std::memset(q, 0xff, size);
  std::lock_guard<std::mutex> lock(g_mu);
  (*g_device)[static_cast<const char*>(q)] = size;
  *p = q;
  return cudaSuccess;
}
cudaError_t cudaFree(void* p) {
  if (p == nullptr) return cudaSuccess;
  std::lock_guard<std::mutex> lock(g_mu);
  auto it = g_device->find(static_cast<const char*>(p));
  if (it == g_device->end()) return Fail(cudaErrorInvalidValue);
  g_device->erase(it);
  std::free(p);
  return cudaSuccess;
}
cudaError_t cudaMallocHost(void** p, size_t bytes) {
  ++g_allocations;
  *p = std::aligned_alloc(256, ((bytes == 0 ? 1 : bytes) + 255) & ~size_t{255});
  return *p == nullptr ? Fail(cudaErrorMemoryAllocation) : cudaSuccess;
}
cudaError_t cudaFreeHost(void* p) {
  std::free(p);
  return cudaSuccess;
}
cudaError_t cudaMemGetInfo(size_t* free_bytes, size_t* total_bytes) {
  *free_bytes = kDeviceBytes;
  *total_bytes = kDeviceBytes;
  return cudaSuccess;
}
cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind) {
  if (bytes > 0) std::memmove(dst, src, bytes);
  return cudaSuccess;
}
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind,
                            cudaStream_t) {
  return cudaMemcpy(dst, src, bytes, kind);
}
cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t) {
  std::memset(p, value, bytes);
  return cudaSuccess;
}
cudaError_t cudaStreamCreate(cudaStream_t* s) { return cudaStreamCreateWithFlags(s, 0); }
cudaError_t cudaStreamCreateWithFlags(cudaStream_t* s, unsigned) {
  ++g_allocations;
  *s = reinterpret_cast<cudaStream_t>(new char(1));
  return cudaSuccess;
}
cudaError_t cudaStreamDestroy(cudaStream_t s) {
  delete reinterpret_cast<char*>(s);
  return cudaSuccess;
}
cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
cudaError_t cudaStreamGetDevice(cudaStream_t, int* device) {
  *device = 0;
  return cudaSuccess;
}
cudaError_t cudaStreamWaitEvent(cudaStream_t, cudaEvent_t, unsigned) { return cudaSuccess; }
cudaError_t cudaEventCreateWithFlags(cudaEvent_t* e, unsigned) {
  ++g_allocations;
  *e = reinterpret_cast<cudaEvent_t>(new char(1));
  return cudaSuccess;
}
cudaError_t cudaEventDestroy(cudaEvent_t e) {
  delete reinterpret_cast<char*>(e);
  return cudaSuccess;
}
cudaError_t cudaEventRecord(cudaEvent_t, cudaStream_t) { return cudaSuccess; }
cudaError_t cudaEventSynchronize(cudaEvent_t) { return cudaSuccess; }
cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
cudaError_t cudaPointerGetAttributes(cudaPointerAttributes* attr, const void* p) {
  *attr = cudaPointerAttributes{};
  std::lock_guard<std::mutex> lock(g_mu);
  const char* c = static_cast<const char*>(p);
  auto it = g_device->upper_bound(c);
  if (it != g_device->begin()) {
    --it;
    if (c < it->first + it->second) {
      attr->type = cudaMemoryTypeDevice;
      attr->device = 0;
    }
  }
  return cudaSuccess;
}

void __syncthreads() { Yield(); }

double __shfl_down_sync(unsigned, double v, unsigned offset) {
  const unsigned t = threadIdx.x, lane = t & 31;
  g_shfl[t] = v;
  Yield();  // every thread has written its value
  const double out = lane + offset < 32 ? g_shfl[t + offset] : v;
  Yield();  // every thread has read
  return out;
}

float __shfl_down_sync(unsigned mask, float v, unsigned offset) {
  return static_cast<float>(__shfl_down_sync(mask, static_cast<double>(v), offset));
}

namespace mdopt::emu {

void Launch(dim3 grid, dim3 block, const std::function<void()>& kernel) {
  const unsigned threads = block.x * block.y * block.z;
  if (threads == 0 || threads > 1024 || grid.x == 0 || grid.y == 0 || grid.z == 0 ||
      grid.y > 65535 || grid.z > 65535) {
    g_last = cudaErrorInvalidConfiguration;
    return;
  }
  std::vector<Fiber>& fibers = *g_fibers;
  if (fibers.size() < threads) fibers.resize(threads);
  g_kernel = &kernel;
  gridDim = grid;
  blockDim = block;
  for (unsigned b = 0; b < grid.x * grid.y * grid.z; ++b) {
    blockIdx = dim3(b % grid.x, (b / grid.x) % grid.y, b / (grid.x * grid.y));
    for (unsigned t = 0; t < threads; ++t) {
      fibers[t].sp = FreshStack(&fibers[t]);
      fibers[t].done = false;
    }
    // Round-robin: each pass runs every live thread to its next barrier (or its end).
    for (bool live = true; live;) {
      live = false;
      for (unsigned t = 0; t < threads; ++t) {
        if (fibers[t].done) continue;
        g_running = t;
        threadIdx = dim3(t, 0, 0);
        mdopt_emu_switch(&g_main_sp, fibers[t].sp);
        live = live || !fibers[t].done;
      }
    }
  }
  g_kernel = nullptr;
}

int64_t Switches() { return g_switches; }
int64_t Allocations() { return g_allocations; }

}  // namespace mdopt::emu
