// STEELATTN_HD: a function the CUDA kernels call and the host compiles too (the CPU
// backend's copy of the same arithmetic, host unit tests of device-side index math).
#pragma once

#if defined(__CUDACC__)
#define STEELATTN_HD __host__ __device__ __forceinline__
#else
#define STEELATTN_HD inline
#endif
