// Entry points of the sm90 (Hopper) backward kernel, not yet in core/backends.h
// (the lead wires them into the dispatcher). Defined in bwd_launch.cu.
#pragma once

#include <cstddef>
#include <string>

#include "steelattn/steelattn.h"

namespace steelattn {

// True when the sm90 backward serves this (validated) call on this device.
bool cuda_sm90_backward_supports(const AttentionParams& p, std::string* why_not);
// Device scratch the call needs (contents on entry do not matter).
size_t cuda_sm90_backward_workspace_bytes(const AttentionParams& p);
// dq, dk, dv of a validated call; `stream` is a cudaStream_t.
Status cuda_sm90_backward(const AttentionParams& p, void* workspace, void* stream);

}  // namespace steelattn
