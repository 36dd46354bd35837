// The CPU launchers: what csrc/cpu/operators.cpp hands the shared host prologue (host.h).
// Each dispatches on x's dtype and runs its passes with at::parallel_for; they allocate only
// small scratch buffers of their own.
#pragma once

#include "../host.h"

namespace fused_poolformer {
namespace cpu {

// Statistics, then the apply pass (forward.cpp).
void launch_forward(const ForwardProblem& p);

// The sums pass, the folds, then the dx pass (backward.cpp).
void launch_backward(const BackwardProblem& p);

}  // namespace cpu
}  // namespace fused_poolformer
