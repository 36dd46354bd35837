// The dx kernels of the CUDA backward (launch.h run_backward_kernels launches them), in a
// translation unit of their own so that the backward compiles on two cores in parallel.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "launch.h"

namespace fused_poolformer {
namespace cuda_kernels {

#define FPM_INSTANTIATE_DX(scalar_t, acc_t)                                                         \
  template void launch_tiles<scalar_t, acc_t, kDx>(const TilePlan&, const TileArgs<scalar_t, acc_t>&, \
                                                   simt::Stream);
FPM_FOR_EACH_DTYPE(FPM_INSTANTIATE_DX)

}  // namespace cuda_kernels
}  // namespace fused_poolformer
