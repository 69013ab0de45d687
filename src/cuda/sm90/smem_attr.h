// The dynamic shared-memory limit of a kernel, raised once per (kernel, device).
// cudaFuncSetAttribute costs 1.5-2 µs of host time per call (measured on the H200
// with torch.profiler); a training step launched it twice. The attribute belongs to
// the function in the device's primary context, so one call per device suffices
// (a cudaDeviceReset would drop it; the library never resets devices).
#pragma once

#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>

namespace steelattn::sm90 {

template <auto Kernel>
cudaError_t raise_smem_limit(int smem_bytes) {
  static std::atomic<uint64_t> done{0};  // bit d: set on device d (ids >= 64 are set every call)
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) dev = 64;
  const uint64_t bit = dev < 64 ? uint64_t{1} << dev : 0;
  if (bit && (done.load(std::memory_order_acquire) & bit)) return cudaSuccess;
  const cudaError_t err = cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes);
  if (err == cudaSuccess && bit) done.fetch_or(bit, std::memory_order_release);
  return err;
}

}  // namespace steelattn::sm90
