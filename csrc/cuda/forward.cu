// CUDA forward of the fused pool mixer for the four dtypes: the statistics pass, then one
// apply pass that merges the statistics in its prologue and writes y (kernels.cuh,
// launch.h).  No ATen here: operators.cpp calls these launchers.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "launch.h"

namespace fused_poolformer {
namespace cuda_kernels {

#define FPM_INSTANTIATE_FORWARD(scalar_t, acc_t)                                                        \
  template void run_forward_kernels<scalar_t, acc_t>(const ForwardCall<scalar_t, acc_t>&, const DeviceLimits&, \
                                                     void*, const WorkspaceAllocator&);                      \
  template size_t forward_workspace_bytes<scalar_t, acc_t>(const MixerShape&, const DeviceLimits&);
FPM_FOR_EACH_DTYPE(FPM_INSTANTIATE_FORWARD)

}  // namespace cuda_kernels
}  // namespace fused_poolformer
