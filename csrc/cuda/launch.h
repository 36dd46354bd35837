// The launch sequences of one forward and one backward call (api.h), shared by the CUDA
// build (forward.cu, backward.cu, backward_dx.cu instantiate them) and the CPU emulator.
//
//   forward   stats_kernel, tile_kernel<kApply>                        2 launches, 1 workspace
//   backward  tile_kernel<kSums>, fold_kernel, tile_kernel<kDx>        3 launches, 1 workspace
#pragma once

#include "api.h"
#include "kernels.cuh"

namespace fused_poolformer {
namespace cuda_kernels {

// One tile kernel launch; the layout is a runtime branch inside the kernel, the pool size 3
// has its own unrolled instantiation.
template <typename scalar_t, typename acc_t, int kMode>
void launch_tiles(const TilePlan& p, const TileArgs<scalar_t, acc_t>& a, simt::Stream stream) {
  simt::launch(p.radius_one ? &tile_kernel<scalar_t, acc_t, true, kMode> : &tile_kernel<scalar_t, acc_t, false, kMode>,
               p.blocks, static_cast<size_t>(p.smem_bytes), stream, p, a);
}

// The forward's one workspace: the statistics kernel's Welford partials per (group, block).
template <typename acc_t>
size_t forward_workspace_bytes_for(const StatsPlan& stats) {
  return sizeof(WelfordData<acc_t>) * static_cast<size_t>(stats.groups * stats.blocks_per_group);
}

template <typename scalar_t, typename acc_t>
size_t forward_workspace_bytes(const MixerShape& s, const DeviceLimits& dev) {
  return forward_workspace_bytes_for<acc_t>(plan_statistics(s, sizeof(scalar_t), dev));
}

template <typename scalar_t, typename acc_t>
void run_forward_kernels(const ForwardCall<scalar_t, acc_t>& call, const DeviceLimits& dev, void* stream_handle,
                         const WorkspaceAllocator& allocate) {
  const simt::Stream stream = simt::to_stream(stream_handle);
  const MixerShape& s = call.shape;
  const StatsPlan stats = plan_statistics(s, sizeof(scalar_t), dev);
  const TilePlan tiles = plan_tiles(s, sizeof(scalar_t), sizeof(acc_t), kApply, kTileBlocksPerSM<scalar_t>, dev);
  auto* partials = static_cast<WelfordData<acc_t>*>(allocate(forward_workspace_bytes_for<acc_t>(stats)));
  simt::launch(&stats_kernel<scalar_t, acc_t>, stats.blocks, stats_smem_bytes<acc_t>(), stream, call.x,
               stats, partials);
  TileArgs<scalar_t, acc_t> a;
  a.x = call.x;
  a.out = call.y;
  a.params = call.params;
  a.partials = partials;
  a.blocks_per_group = stats.blocks_per_group;
  a.eps = static_cast<acc_t>(call.eps);
  a.mean_out = call.mean;
  a.rstd_out = call.rstd;
  launch_tiles<scalar_t, acc_t, kApply>(tiles, a, stream);
}

// The backward's one workspace: partial sums of D * dy and of x * dy per (n, c, slot), then
// S[n, g].
inline size_t backward_partial_numel(const MixerShape& s, const TilePlan& sums) {
  return static_cast<size_t>(s.N * s.C * sums.slots);
}

template <typename acc_t>
size_t backward_workspace_bytes_for(const MixerShape& s, const TilePlan& sums) {
  return sizeof(acc_t) * (2 * backward_partial_numel(s, sums) + static_cast<size_t>(s.N * s.G));
}

template <typename scalar_t, typename acc_t>
TilePlan plan_backward_sums(const MixerShape& s, const DeviceLimits& dev) {
  return plan_tiles(s, sizeof(scalar_t), sizeof(acc_t), kSums, kTileBlocksPerSM<scalar_t>, dev);
}

template <typename scalar_t, typename acc_t>
size_t backward_workspace_bytes(const MixerShape& s, const DeviceLimits& dev) {
  return backward_workspace_bytes_for<acc_t>(s, plan_backward_sums<scalar_t, acc_t>(s, dev));
}

template <typename scalar_t, typename acc_t>
void run_backward_kernels(const BackwardCall<scalar_t, acc_t>& call, const DeviceLimits& dev, void* stream_handle,
                          const WorkspaceAllocator& allocate) {
  const simt::Stream stream = simt::to_stream(stream_handle);
  const MixerShape& s = call.shape;
  if (call.grad_x == nullptr && !call.grads.any()) return;
  const TilePlan sums = plan_backward_sums<scalar_t, acc_t>(s, dev);
  const FoldPlan fold = plan_fold(s, sums.slots);
  const size_t partial_numel = backward_partial_numel(s, sums);
  auto* partial_ddy = static_cast<acc_t*>(allocate(backward_workspace_bytes_for<acc_t>(s, sums)));
  acc_t* partial_xdy = partial_ddy + partial_numel;
  acc_t* s_ng = partial_xdy + partial_numel;

  TileArgs<scalar_t, acc_t> a;
  a.x = call.x;
  a.dy = call.grad_y;
  a.params = call.params;
  a.partial_ddy = partial_ddy;
  a.partial_xdy = partial_xdy;
  launch_tiles<scalar_t, acc_t, kSums>(sums, a, stream);
  simt::launch(&fold_kernel<scalar_t, acc_t>, fold.blocks, fold_smem_bytes<acc_t>(), stream, fold,
               static_cast<const acc_t*>(partial_ddy), static_cast<const acc_t*>(partial_xdy), call.rstd,
               call.params, call.grads, s_ng);
  if (call.grad_x == nullptr) return;
  const TilePlan dx = plan_tiles(s, sizeof(scalar_t), sizeof(acc_t), kDx, kTileBlocksPerSM<scalar_t>, dev);
  a.out = call.grad_x;
  a.mean = call.mean;
  a.rstd = call.rstd;
  a.s_ng = s_ng;
  a.inv_group_numel = acc_t(1) / static_cast<acc_t>(s.group_numel());
  launch_tiles<scalar_t, acc_t, kDx>(dx, a, stream);
}

// The four dtypes the operators dispatch to (half types accumulate in float).
#define FPM_FOR_EACH_DTYPE(MACRO) \
  MACRO(float, float)             \
  MACRO(double, double)           \
  MACRO(c10::Half, float)         \
  MACRO(c10::BFloat16, float)

}  // namespace cuda_kernels
}  // namespace fused_poolformer
