// CUDA backward of the fused pool mixer for the four dtypes: the sums pass, the folds and
// (backward_dx.cu, compiled in parallel) the dx pass (kernels.cuh, launch.h).  No ATen
// here: operators.cpp calls these launchers.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "launch.h"

namespace fused_poolformer {
namespace cuda_kernels {

// The dx kernels are instantiated in backward_dx.cu.
#define FPM_EXTERN_DX(scalar_t, acc_t)                                                      \
  extern template void launch_tiles<scalar_t, acc_t, kDx>(const TilePlan&, const TileArgs<scalar_t, acc_t>&, \
                                                          simt::Stream);
FPM_FOR_EACH_DTYPE(FPM_EXTERN_DX)

#define FPM_INSTANTIATE_BACKWARD(scalar_t, acc_t)                                                         \
  template void run_backward_kernels<scalar_t, acc_t>(const BackwardCall<scalar_t, acc_t>&, const DeviceLimits&, \
                                                      void*, const WorkspaceAllocator&);                      \
  template size_t backward_workspace_bytes<scalar_t, acc_t>(const MixerShape&, const DeviceLimits&);
FPM_FOR_EACH_DTYPE(FPM_INSTANTIATE_BACKWARD)

}  // namespace cuda_kernels
}  // namespace fused_poolformer
