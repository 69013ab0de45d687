// Host-side device facts and the current-device guard every CUDA launcher uses (sm90,
// generic, decode, kv_append).
#pragma once

#include <cuda_runtime.h>

#include <cstdlib>
#include <mutex>

namespace steelattn::cuda_device {

// What the launchers ask of a device, queried once per device (selection asks per call).
// Fields stay 0 when a query fails.
struct DeviceInfo {
  int major = 0, minor = 0, sms = 0, smem_optin = 0;
};

inline DeviceInfo device_info(int dev) {
  static std::mutex mu;
  static DeviceInfo cache[64];
  static bool known[64] = {};
  if (dev < 0 || dev >= 64) return {};
  std::lock_guard<std::mutex> lock(mu);
  if (!known[dev]) {
    DeviceInfo d;
    cudaDeviceGetAttribute(&d.major, cudaDevAttrComputeCapabilityMajor, dev);
    cudaDeviceGetAttribute(&d.minor, cudaDevAttrComputeCapabilityMinor, dev);
    cudaDeviceGetAttribute(&d.sms, cudaDevAttrMultiProcessorCount, dev);
    cudaDeviceGetAttribute(&d.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
    cache[dev] = d;
    known[dev] = true;
  }
  return cache[dev];
}

// Makes `device` current for a launch and restores the caller's device on scope exit.
// The driver's tensor-map encoder (sm90) needs a current context, which a thread that has
// made no runtime call yet does not have (autograd's backward thread on its first call:
// encoding failed with CUDA_ERROR_INVALID_CONTEXT, 201); cudaSetDevice makes the primary
// context current (CUDA >= 12), so it runs once per thread even when `device` is current.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    thread_local int context_ready = -1;
    cudaGetDevice(&prev_);
    if (prev_ != device || context_ready != device) cudaSetDevice(device);
    context_ready = device;
  }
  ~DeviceGuard() {
    int cur = -1;
    cudaGetDevice(&cur);
    if (cur != prev_) cudaSetDevice(prev_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int prev_ = 0;
};

// A launcher's measurement switch (STEELATTN_...): 1 or 0 by the value's first character,
// -1 when unset or anything else. Read per call (a getenv is ~0.1 us), so tests can flip it.
inline int env_switch(const char* name) {
  const char* e = std::getenv(name);
  return e == nullptr ? -1 : e[0] == '1' ? 1 : e[0] == '0' ? 0 : -1;
}

}  // namespace steelattn::cuda_device
