// The next row fetched while this one is computed: asynchronous global-to-shared copies
// (cp.async, sm_80 and newer) into a ring of two shared-memory stages. Used by the
// forward and backward rows kernels with st=2 (a stage holds every row group of the
// CTA) and the cluster kernels at 16 elements per thread (a stage holds the CTA's
// slice).
//
// One idea: each thread copies exactly the 16-byte vectors it later reads (its
// register layout's chunks, laid out as in global memory), so it only ever waits for
// its own copies (cp.async.wait_group) and no barrier guards a stage. Row r + 1's
// copies are committed as one group before row r's stage is read; "all but the newest
// group done" then means row r has landed. A thread re-fills a stage only after it
// has consumed every value it read from it (its registers), so a stage is never
// overwritten under a reader. Under tools/emulator the three copy primitives are
// provided by cuda_emulation.h (a copy is performed when its wait retires it; reading
// its destination before that reads poison).
#pragma once

#include "rows.cuh"

namespace residual_fused {

#ifndef RESIDUAL_FUSED_HOST_EMULATION
// Starts copying 16 bytes from global `src` to shared `dst` (both 16-byte aligned)
// without waiting; the copy belongs to the thread's next committed group.
__device__ __forceinline__ void async_copy16(void* dst, const void* src) {
  const unsigned shared = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(shared), "l"(src) : "memory");
}
// Closes the thread's current group of copies.
__device__ __forceinline__ void async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
// Waits until at most N of the thread's committed groups are still in flight; what
// the completed ones wrote is then visible to this thread.
template <int N>
__device__ __forceinline__ void async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}
#endif

// Bytes one row (or slice) of `len` elements of a tensor takes in a stage, 16-byte
// aligned; an absent tensor (null) takes none.
__host__ __device__ inline int ring_row_bytes(const void* ptr, DType t, int len) {
  return ptr == nullptr ? 0 : (len * dtype_size(t) + 15) / 16 * 16;
}

// Starts copying this thread's chunks of one row (`len` elements of `size` bytes,
// VEC * size a multiple of 16) from global `src` to the stage's row at `dst`. Chunks
// past `len` are not copied (and never read).
template <int CHUNKS, int VEC>
__device__ __forceinline__ void fetch_chunks(unsigned char* dst, const void* src, int size,
                                             const RowLayout<CHUNKS, VEC>& rl, int len) {
  const unsigned char* const from = static_cast<const unsigned char*>(src);
#pragma unroll
  for (int c = 0; c < CHUNKS; ++c) {
    const int col = rl.col0 + c * rl.stride;
    if (col < len) {
      for (int b = 0; b < VEC * size; b += 16) async_copy16(dst + col * size + b, from + col * size + b);
    }
  }
}

}  // namespace residual_fused
