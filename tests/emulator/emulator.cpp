// Runtime of the host emulation (cuda_emulation.h) and a C API for the tests:
// emu_fwd / emu_bwd run launch_add_norm_fwd / launch_add_norm_bwd of csrc/kernels on
// host memory, through the real launch plans of dispatch.cu.
#include <ucontext.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <vector>

#include "add_norm.h"

namespace emu {

// The threads of a block are cooperative fibers (ucontext) on the calling OS thread:
// each runs until it reaches a barrier, then the next one runs. Deterministic, and
// fast enough to emulate 1024-thread blocks on a 2-core machine.
dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace {
int g_sm_count = 3;                  // few SMs: persistent kernels loop over many rows
int g_max_smem = 227 * 1024;         // opt-in shared memory per block (H100)
int g_device = 0;                    // device attributes are cached per device index
constexpr size_t kSmemFloats = (228 * 1024) / 4 + 1024;  // + canary words
constexpr size_t kStackBytes = 256 * 1024;
std::vector<float> g_smem(kSmemFloats);

struct Fiber {
  ucontext_t context;
  bool done = false;
};

// Fiber stacks, allocated once (uninitialised) and reused by every block.
char* fiber_stack(int t) {
  static std::vector<std::unique_ptr<char[]>> stacks(1024);
  if (!stacks[t]) stacks[t].reset(new char[kStackBytes]);
  return stacks[t].get();
}

struct Block {
  std::vector<Fiber> fibers;
  ucontext_t scheduler;
  int current = 0;
  const std::function<void()>* body = nullptr;
  // Barrier state: a generation counter per barrier (block, and each warp).
  int block_arrived = 0, block_generation = 0;
  std::vector<int> warp_arrived, warp_generation;
  std::vector<double> warp_values;
};
Block* g_block = nullptr;
bool g_error = false;  // a launch the hardware would refuse

void yield_to_scheduler() {
  Block& b = *g_block;
  swapcontext(&b.fibers[b.current].context, &b.scheduler);
}

void wait_barrier(int& arrived, int& generation, int count) {
  if (++arrived == count) {
    arrived = 0;
    ++generation;
    return;
  }
  const int gen = generation;
  while (generation == gen) yield_to_scheduler();
}

void fiber_main() {
  Block& b = *g_block;
  (*b.body)();
  b.fibers[b.current].done = true;
  // returning resumes uc_link (the scheduler)
}
}  // namespace

void syncthreads() {
  Block& b = *g_block;
  wait_barrier(b.block_arrived, b.block_generation, static_cast<int>(b.fibers.size()));
}

double shfl_xor(double v, int lane_mask, int width) {
  Block& b = *g_block;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane_mask >= width || width > 32) g_error = true;
  b.warp_values[warp * 32 + lane] = v;
  wait_barrier(b.warp_arrived[warp], b.warp_generation[warp], 32);
  const double out = b.warp_values[warp * 32 + (lane ^ lane_mask)];
  wait_barrier(b.warp_arrived[warp], b.warp_generation[warp], 32);
  return out;
}

cudaError_t run_grid(dim3 grid, dim3 block, size_t smem, const std::function<void()>& body) {
  const int threads = static_cast<int>(block.x * block.y * block.z);
  if (grid.y != 1 || grid.z != 1 || block.y != 1 || block.z != 1 || threads > 1024 ||
      threads % 32 != 0 || grid.x == 0 || static_cast<int64_t>(smem) > g_max_smem) {
    return cudaErrorInvalidConfiguration;
  }
  // Poison shared memory: a kernel that reads what it never wrote sees NaN; the canary
  // words past the requested size must survive.
  std::fill(g_smem.begin(), g_smem.end(), std::numeric_limits<float>::quiet_NaN());
  const size_t used = (smem + 3) / 4;
  for (size_t i = used; i < g_smem.size(); ++i) g_smem[i] = -12345.0f;
  blockDim = block;
  gridDim = grid;
  for (unsigned bx = 0; bx < grid.x; ++bx) {
    Block b;
    b.body = &body;
    b.fibers.resize(threads);
    b.warp_arrived.assign(threads / 32, 0);
    b.warp_generation.assign(threads / 32, 0);
    b.warp_values.assign(threads, 0.0);
    g_block = &b;
    blockIdx = dim3(bx, 0, 0);
    for (int t = 0; t < threads; ++t) {
      Fiber& f = b.fibers[t];
      getcontext(&f.context);
      f.context.uc_stack.ss_sp = fiber_stack(t);
      f.context.uc_stack.ss_size = kStackBytes;
      f.context.uc_link = &b.scheduler;
      makecontext(&f.context, fiber_main, 0);
    }
    // Round-robin until every fiber has finished.
    for (int remaining = threads; remaining > 0;) {
      remaining = 0;
      for (int t = 0; t < threads; ++t) {
        if (b.fibers[t].done) continue;
        b.current = t;
        threadIdx = dim3(t, 0, 0);
        swapcontext(&b.scheduler, &b.fibers[t].context);
        if (!b.fibers[t].done) ++remaining;
      }
    }
    g_block = nullptr;
  }
  for (size_t i = used; i < g_smem.size(); ++i) {
    if (g_smem[i] != -12345.0f) return cudaErrorIllegalAddress;  // wrote past its shared memory
  }
  return g_error ? cudaErrorInvalidValue : cudaSuccess;
}

cudaError_t get_device(int* device) {
  *device = g_device;
  return cudaSuccess;
}

cudaError_t device_attribute(int* value, cudaDeviceAttr attr, int) {
  *value = attr == cudaDevAttrMultiProcessorCount ? g_sm_count : g_max_smem;
  return cudaSuccess;
}

cudaError_t func_set_attribute(const void*, cudaFuncAttribute, int value) {
  return value <= g_max_smem ? cudaSuccess : cudaErrorInvalidValue;
}

cudaError_t occupancy(int* ctas, const void*, int, size_t) {
  *ctas = 1;
  return cudaSuccess;
}

// Host-compiled kernels have no static shared memory to report (their __shared__
// arrays are statics); the real size only matters for the fit check on hardware.
cudaError_t func_attributes(cudaFuncAttributes* attr, const void*) {
  *attr = cudaFuncAttributes{};
  return cudaSuccess;
}

cudaError_t get_last_error() { return cudaSuccess; }

}  // namespace emu

namespace residual_fused {
float* dynamic_smem() { return emu::g_smem.data(); }
}  // namespace residual_fused

using residual_fused::AddNormBwdParams;
using residual_fused::AddNormFwdParams;
using residual_fused::DType;

extern "C" {

// A device with `sm_count` SMs and `max_smem` bytes of opt-in shared memory per block.
// dispatch.cu caches attributes per device index, so each configuration gets its own.
void emu_configure(int device, int sm_count, int max_smem) {
  emu::g_device = device;
  emu::g_sm_count = sm_count;
  emu::g_max_smem = max_smem;
}

int emu_fwd(int64_t rows, int hidden, int is_rms_norm, double eps, const void* x,
            int64_t x_row_stride, int x_dtype, const void* residual, int64_t residual_row_stride,
            int residual_dtype, const void* weight, int weight_dtype, const void* bias,
            int bias_dtype, void* y, void* residual_out, int residual_out_dtype, void* rstd) {
  AddNormFwdParams p;
  p.rows = rows;
  p.hidden = hidden;
  p.is_rms_norm = is_rms_norm;
  p.eps = eps;
  p.x = x;
  p.x_row_stride = x_row_stride;
  p.x_dtype = static_cast<DType>(x_dtype);
  p.residual = residual;
  p.residual_row_stride = residual_row_stride;
  p.residual_dtype = static_cast<DType>(residual_dtype);
  p.weight = weight;
  p.weight_dtype = static_cast<DType>(weight_dtype);
  p.bias = bias;
  p.bias_dtype = static_cast<DType>(bias_dtype);
  p.y = y;
  p.residual_out = residual_out;
  p.residual_out_dtype = static_cast<DType>(residual_out_dtype);
  p.rstd = rstd;
  emu::g_error = false;
  return static_cast<int>(residual_fused::launch_add_norm_fwd(p, nullptr));
}

int emu_bwd(int64_t rows, int hidden, int is_rms_norm, int memory_efficient, const void* dy,
            int64_t dy_row_stride, int dy_dtype, const void* dresidual_out,
            int64_t dresidual_out_row_stride, int dresidual_out_dtype, const void* saved,
            int64_t saved_row_stride, int saved_dtype, const void* rstd, const void* weight,
            int weight_dtype, const void* bias, int bias_dtype, void* dx, void* dresidual,
            int dresidual_dtype, void* dweight, void* dbias) {
  AddNormBwdParams p;
  p.rows = rows;
  p.hidden = hidden;
  p.is_rms_norm = is_rms_norm;
  p.memory_efficient = memory_efficient;
  p.dy = dy;
  p.dy_row_stride = dy_row_stride;
  p.dy_dtype = static_cast<DType>(dy_dtype);
  p.dresidual_out = dresidual_out;
  p.dresidual_out_row_stride = dresidual_out_row_stride;
  p.dresidual_out_dtype = static_cast<DType>(dresidual_out_dtype);
  p.saved = saved;
  p.saved_row_stride = saved_row_stride;
  p.saved_dtype = static_cast<DType>(saved_dtype);
  p.rstd = rstd;
  p.weight = weight;
  p.weight_dtype = static_cast<DType>(weight_dtype);
  p.bias = bias;
  p.bias_dtype = static_cast<DType>(bias_dtype);
  p.dx = dx;
  p.dresidual = dresidual;
  p.dresidual_dtype = static_cast<DType>(dresidual_dtype);
  p.dweight = dweight;
  p.dbias = dbias;
  // Workspace as the torch glue allocates it, poisoned with NaN.
  const int64_t partial_rows = residual_fused::add_norm_bwd_partial_rows(p);
  const size_t words = static_cast<size_t>(partial_rows) * hidden;
  std::vector<double> dw(words, std::nan("")), db(words, std::nan(""));
  std::vector<float> dwf(words, std::nanf("")), dbf(words, std::nanf(""));
  const bool fp64 = p.dy_dtype == DType::kFloat64;
  if (weight != nullptr) p.dweight_partial = fp64 ? static_cast<void*>(dw.data()) : dwf.data();
  if (bias != nullptr) p.dbias_partial = fp64 ? static_cast<void*>(db.data()) : dbf.data();
  emu::g_error = false;
  return static_cast<int>(residual_fused::launch_add_norm_bwd(p, nullptr));
}

}  // extern "C"
