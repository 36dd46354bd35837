// CUDA forward of the fused pool mixer: statistics (split over many blocks, merged in a
// fixed order) then one apply pass that writes y.  See pool_mixer_cuda.cuh.
#include <torch/library.h>

#include "pool_mixer_cuda.cuh"

namespace fused_poolformer {
namespace cuda_kernels {
namespace {

// Writes mean and rstd, (N, G) in acc_t.  Chunks of 2048 elements per block, or 512 when
// 2048 would leave most multiprocessors idle (batch 1 at a late stage).
template <typename scalar_t, typename acc_t>
void group_statistics(const at::Tensor& x, bool channels_last, int64_t num_groups, double eps,
                      at::Tensor& mean, at::Tensor& rstd, cudaStream_t stream) {
  const int64_t N = x.size(0), C = x.size(1), plane = x.size(2) * x.size(3);
  StatsGeometry sg{};
  sg.G = num_groups, sg.Cg = C / num_groups, sg.C = C, sg.plane = plane;
  sg.M = sg.Cg * plane;
  sg.contiguous_groups = !channels_last || num_groups == 1;
  constexpr int kLargePerThread = 8, kSmallPerThread = 2;
  const int64_t groups = N * num_groups;
  const int64_t large_blocks = groups * ((sg.M + kThreads * kLargePerThread - 1) / (kThreads * kLargePerThread));
  const bool small = large_blocks < 2 * device_info(x.device().index()).multiprocessors;
  sg.chunk = int64_t(kThreads) * (small ? kSmallPerThread : kLargePerThread);
  sg.blocks_per_group = (sg.M + sg.chunk - 1) / sg.chunk;
  const int64_t blocks = groups * sg.blocks_per_group;
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(),
              "pool_mixer (CUDA): input too large for one grid (", blocks, " blocks)");

  const auto acc_opts = x.options().dtype(mean.scalar_type());
  at::Tensor partials = at::empty({blocks * 3}, acc_opts);
  auto* welford = reinterpret_cast<WelfordData<acc_t>*>(partials.mutable_data_ptr<acc_t>());
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
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
      welford, groups, sg.blocks_per_group, static_cast<acc_t>(eps),
      mean.mutable_data_ptr<acc_t>(), rstd.mutable_data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pool_mixer_forward_cuda(
    const at::Tensor& x_in, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& layer_scale,
    const std::optional<at::Tensor>& res_scale, const std::optional<at::Tensor>& sample_scale,
    int64_t num_groups, int64_t pool_size, double eps) {
  check_forward_args(x_in, weight, bias, layer_scale, res_scale, sample_scale, num_groups,
                     pool_size, eps);
  TORCH_CHECK(x_in.is_cuda(), "pool_mixer_forward (CUDA kernel): x must be a CUDA tensor");
  const c10::cuda::CUDAGuard device_guard(x_in.device());
  const Layout layout = choose_layout(x_in);
  const bool channels_last = layout == Layout::kChannelsLast;
  const at::Tensor x = in_layout(x_in, layout);
  const int64_t N = x.size(0), C = x.size(1);
  auto y = at::empty_like(x, memory_format(layout));
  const auto stat_opts = x.options().dtype(accumulate_type(x.scalar_type()));
  if (x.numel() == 0) {
    return {y, at::zeros({N, num_groups}, stat_opts),
            at::full({N, num_groups}, 1.0 / std::sqrt(eps), stat_opts)};
  }
  auto mean = at::empty({N, num_groups}, stat_opts);
  auto rstd = at::empty({N, num_groups}, stat_opts);
  const at::Tensor a = mixer_coefficients(x, weight, layer_scale, sample_scale);
  const at::Tensor res = vector_or_ones(res_scale, C, x);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pool_mixer_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    group_statistics<scalar_t, acc_t>(x, channels_last, num_groups, eps, mean, rstd, stream);
    const TileGeometry g =
        make_tile_geometry(x, num_groups, pool_size, channels_last, kApply, sizeof(acc_t));
    TileArgs<scalar_t, acc_t> args{};
    args.x = x.const_data_ptr<scalar_t>();
    args.out = y.mutable_data_ptr<scalar_t>();
    args.a_nc = a.const_data_ptr<acc_t>();
    args.mean_ng = mean.const_data_ptr<acc_t>();
    args.rstd_ng = rstd.const_data_ptr<acc_t>();
    args.res_c = res.const_data_ptr<acc_t>();
    launch_tile_kernel<scalar_t, acc_t, kApply>(g, channels_last, args, stream);
  });
  return {y, mean, rstd};
}

}  // namespace
}  // namespace cuda_kernels

TORCH_LIBRARY_IMPL(fused_poolformer, CUDA, m) {
  m.impl("pool_mixer_forward", &cuda_kernels::pool_mixer_forward_cuda);
}

}  // namespace fused_poolformer
