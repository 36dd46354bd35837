// CUDA forward of the fused pool mixer: statistics (split over many blocks, merged in a
// fixed order) then one apply pass that writes y.  See kernels.cuh.
// Per call: 3 launches; allocations: y, mean, rstd (host.cpp) and one workspace.
#include <torch/library.h>

#include "kernels.cuh"

namespace fused_poolformer {
namespace cuda_kernels {
namespace {

// Writes mean and rstd, (N, G) in acc_t.  Chunks of 2048 elements per block, or 512 when
// 2048 would leave most multiprocessors idle (batch 1 at a late stage).
template <typename scalar_t, typename acc_t>
void group_statistics(const ForwardProblem& p, cudaStream_t stream) {
  const MixerShape& s = p.shape;
  const int64_t plane = s.H * s.W;
  StatsGeometry sg{};
  sg.G = s.G, sg.Cg = s.Cg, sg.C = s.C, sg.plane = plane;
  sg.M = s.group_numel();
  sg.contiguous_groups = !s.channels_last || s.G == 1;
  constexpr int kLargePerThread = 8, kSmallPerThread = 2;
  const int64_t groups = s.N * s.G;
  const int64_t large_blocks =
      groups * ((sg.M + kThreads * kLargePerThread - 1) / (kThreads * kLargePerThread));
  const bool small = large_blocks < 2 * device_info(p.x.device().index()).multiprocessors;
  sg.chunk = int64_t(kThreads) * (small ? kSmallPerThread : kLargePerThread);
  sg.blocks_per_group = (sg.M + sg.chunk - 1) / sg.chunk;
  const int64_t blocks = groups * sg.blocks_per_group;
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(),
              "pool_mixer (CUDA): input too large for one grid (", blocks, " blocks)");

  at::Tensor partials = at::empty({blocks * 3}, p.mean.options());
  auto* welford = reinterpret_cast<WelfordData<acc_t>*>(partials.mutable_data_ptr<acc_t>());
  const scalar_t* xp = p.x.const_data_ptr<scalar_t>();
  if (small) {
    group_stats_kernel<scalar_t, acc_t, kSmallPerThread>
        <<<static_cast<unsigned int>(blocks), kThreads, 0, stream>>>(xp, sg, welford);
  } else {
    group_stats_kernel<scalar_t, acc_t, kLargePerThread>
        <<<static_cast<unsigned int>(blocks), kThreads, 0, stream>>>(xp, sg, welford);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const auto finalize_blocks = static_cast<unsigned int>((groups + kThreads - 1) / kThreads);
  finalize_stats_kernel<acc_t><<<finalize_blocks, kThreads, 0, stream>>>(
      welford, groups, sg.blocks_per_group, static_cast<acc_t>(p.eps),
      p.mean.mutable_data_ptr<acc_t>(), p.rstd.mutable_data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
void forward_kernels(const ForwardProblem& p) {
  using acc_t = at::opmath_type<scalar_t>;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  group_statistics<scalar_t, acc_t>(p, stream);
  const TileGeometry g = make_tile_geometry(p.x, p.shape, kApply, sizeof(acc_t));
  TileArgs<scalar_t, acc_t> args{};
  args.x = p.x.const_data_ptr<scalar_t>();
  args.out = p.y.mutable_data_ptr<scalar_t>();
  args.params = p.params;
  args.mean_ng = p.mean.const_data_ptr<acc_t>();
  args.rstd_ng = p.rstd.const_data_ptr<acc_t>();
  launch_tile_kernel<scalar_t, acc_t, kApply>(g, p.shape.channels_last, args, stream);
}

void launch_forward(const ForwardProblem& p) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.x.scalar_type(),
                                  "pool_mixer_forward_cuda", [&] { forward_kernels<scalar_t>(p); });
}

ForwardResult pool_mixer_forward_cuda(const at::Tensor& x, const OptionalTensor& weight,
                                      const OptionalTensor& bias,
                                      const OptionalTensor& layer_scale,
                                      const OptionalTensor& res_scale,
                                      const OptionalTensor& sample_scale, int64_t num_groups,
                                      int64_t pool_size, double eps) {
  return run_forward(x, weight, bias, layer_scale, res_scale, sample_scale, num_groups,
                     pool_size, eps, at::kCUDA, &launch_forward);
}

}  // namespace
}  // namespace cuda_kernels

TORCH_LIBRARY_IMPL(fused_poolformer, CUDA, m) {
  m.impl("pool_mixer_forward", &cuda_kernels::pool_mixer_forward_cuda);
}

}  // namespace fused_poolformer
