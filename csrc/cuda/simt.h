// The execution model the CUDA kernels are written against, so that the same kernel source
// compiles twice:
//
//   * by nvcc, where every call below is the CUDA built-in it names (threadIdx.x,
//     __syncthreads, __shfl_down_sync, dynamic shared memory, 128-bit global accesses), and
//   * by a plain C++ compiler with FPM_SIMT_EMULATE defined, where simt_emulator.h runs each block's
//     threads as cooperative fibers on the CPU: barriers and warp shuffles are real
//     synchronisation points, shared memory is a per-block buffer filled with NaN, and every
//     global access is checked against the buffers the caller registered (bounds, alignment
//     of vector accesses, writes to read-only inputs).  tests/test_cuda_emulated.py runs the
//     kernels this way against the reference on machines without a GPU.
//
// Kernels use one-dimensional blocks of kThreads threads and one-dimensional grids.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#if defined(__CUDACC__)
#include <cuda_runtime.h>

#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
#define FPM_DEVICE __device__ __forceinline__
#define FPM_HD __host__ __device__ __forceinline__
// kMinBlocks: blocks per multiprocessor the register budget must allow (plan.h assumes it).
#define FPM_KERNEL(kMinBlocks) __global__ void __launch_bounds__(::fused_poolformer::simt::kThreads, kMinBlocks)
#elif defined(FPM_SIMT_EMULATE)
#define FPM_DEVICE inline
#define FPM_HD inline
#define FPM_KERNEL(kMinBlocks) void
#else
#error "simt.h: compile with nvcc, or define FPM_SIMT_EMULATE for the CPU emulator"
#endif

namespace fused_poolformer {
namespace simt {

constexpr int kThreads = 256;
constexpr int kWarpSize = 32;
constexpr int kWarps = kThreads / kWarpSize;

// A register-held group of V consecutive elements; 16 bytes for the vector accesses.
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

// n / d and n % d for a fixed d by multiply-high and shift (Granlund-Montgomery, as
// ATen's IntDivider), valid for n, d < 2^31.  Built on the host for launch constants.
struct FastDivmod {
  uint32_t divisor = 1;
  uint32_t multiplier = 1;
  uint32_t shift = 0;

  FastDivmod() = default;
  explicit FastDivmod(uint32_t d) : divisor(d) {
    shift = d <= 1 ? 0 : 32 - static_cast<uint32_t>(__builtin_clz(d - 1));  // 2^shift >= d
    multiplier = static_cast<uint32_t>(((uint64_t(1) << 32) * ((uint64_t(1) << shift) - d)) / d + 1);
  }
  FPM_HD uint32_t div(uint32_t n) const {
#if defined(__CUDA_ARCH__)
    const uint32_t t = __umulhi(n, multiplier);
#else
    const uint32_t t = static_cast<uint32_t>((uint64_t(n) * multiplier) >> 32);
#endif
    return (t + n) >> shift;
  }
  FPM_HD void divmod(uint32_t n, int& quotient, int& remainder) const {
    const uint32_t q = div(n);
    quotient = static_cast<int>(q);
    remainder = static_cast<int>(n - q * divisor);
  }
};

}  // namespace simt
}  // namespace fused_poolformer

#if defined(FPM_SIMT_EMULATE)
#include "simt_emulator.h"
#endif

namespace fused_poolformer {
namespace simt {

#if !defined(FPM_SIMT_EMULATE)

using Stream = cudaStream_t;
inline Stream to_stream(void* handle) { return static_cast<Stream>(handle); }

FPM_DEVICE int thread_index() { return static_cast<int>(threadIdx.x); }
FPM_DEVICE unsigned block_index() { return blockIdx.x; }
FPM_DEVICE void sync_block() { __syncthreads(); }
template <typename T>
FPM_DEVICE T shfl_down(T value, int delta) {
  return __shfl_down_sync(0xffffffffu, value, delta);
}
FPM_DEVICE unsigned char* dynamic_shared_memory() {
  extern __shared__ __align__(16) unsigned char fpm_dynamic_smem[];
  return fpm_dynamic_smem;
}

// Global accesses.  The vector forms go through uint4 (uint2, ...) so that nvcc emits one
// LDG.E.128 / STG.E.128 whatever the element type.
template <int Bytes>
struct RawWord;
template <> struct RawWord<16> { using type = uint4; };
template <> struct RawWord<8> { using type = uint2; };
template <> struct RawWord<4> { using type = uint32_t; };
template <> struct RawWord<2> { using type = uint16_t; };

template <typename T>
FPM_DEVICE T load_global(const T* p) {
  return *p;
}
template <typename T>
FPM_DEVICE void store_global(T* p, T value) {
  *p = value;
}
template <int V, typename T>
FPM_DEVICE Pack<T, V> load_global_vector(const T* p) {
  using Raw = typename RawWord<sizeof(Pack<T, V>)>::type;
  const Raw raw = *reinterpret_cast<const Raw*>(p);
  Pack<T, V> out;
  memcpy(&out, &raw, sizeof(out));
  return out;
}
template <int V, typename T>
FPM_DEVICE void store_global_vector(T* p, const Pack<T, V>& value) {
  using Raw = typename RawWord<sizeof(Pack<T, V>)>::type;
  Raw raw;
  memcpy(&raw, &value, sizeof(raw));
  *reinterpret_cast<Raw*>(p) = raw;
}

inline void check_cuda(cudaError_t status, const char* what) {
  if (status != cudaSuccess) {
    throw std::runtime_error(std::string("pool_mixer (CUDA): ") + what + ": " + cudaGetErrorString(status));
  }
}

// Raises a kernel's dynamic shared-memory limit on the current device (once per size).
inline void allow_shared_bytes(const void* kernel, size_t bytes) {
  static std::mutex mutex;
  static std::map<std::pair<const void*, int>, size_t> allowed;
  int device = 0;
  check_cuda(cudaGetDevice(&device), "cudaGetDevice");
  std::lock_guard<std::mutex> lock(mutex);
  size_t& current = allowed[{kernel, device}];
  if (current >= bytes) return;
  check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)),
             "cudaFuncSetAttribute");
  current = bytes;
}

// Launches kernel<<<grid, kThreads, smem_bytes, stream>>>(args...).
template <typename... KernelArgs, typename... Args>
inline void launch(void (*kernel)(KernelArgs...), unsigned grid, size_t smem_bytes, Stream stream,
                   Args&&... args) {
  if (smem_bytes > 48 * 1024) allow_shared_bytes(reinterpret_cast<const void*>(kernel), smem_bytes);
  kernel<<<grid, kThreads, smem_bytes, stream>>>(std::forward<Args>(args)...);
  check_cuda(cudaGetLastError(), "kernel launch");
}

#endif  // !FPM_SIMT_EMULATE

FPM_DEVICE int lane_index() { return thread_index() % kWarpSize; }
FPM_DEVICE int warp_index() { return thread_index() / kWarpSize; }

// A typed window of the block's dynamic shared memory.  The emulator checks every index
// against the window and the alignment of every vector access.
template <typename T>
struct SharedArray {
  T* data = nullptr;
  int size = 0;

  FPM_DEVICE T& operator[](int i) const {
#if defined(FPM_SIMT_EMULATE)
    emu::check_shared(data, size, i, 1, sizeof(T));
#endif
    return data[i];
  }
  template <int V>
  FPM_DEVICE Pack<T, V> load(int i) const {
#if defined(FPM_SIMT_EMULATE)
    emu::check_shared(data, size, i, V, sizeof(Pack<T, V>));
#endif
    return *reinterpret_cast<const Pack<T, V>*>(data + i);
  }
  template <int V>
  FPM_DEVICE void store(int i, const Pack<T, V>& value) const {
#if defined(FPM_SIMT_EMULATE)
    emu::check_shared(data, size, i, V, sizeof(Pack<T, V>));
#endif
    *reinterpret_cast<Pack<T, V>*>(data + i) = value;
  }
};

// Carves consecutive 16-byte-aligned arrays out of the dynamic shared memory; the host
// computes the same layout (SharedLayout in plan.h) to size the launch.
struct SharedCarver {
  unsigned char* base;
  int offset = 0;  // bytes

  template <typename T>
  FPM_DEVICE SharedArray<T> take(int count) {
    SharedArray<T> a;
    a.data = reinterpret_cast<T*>(base + offset);
    a.size = count;
    offset += (count * static_cast<int>(sizeof(T)) + 15) / 16 * 16;
    return a;
  }
};

}  // namespace simt
}  // namespace fused_poolformer
