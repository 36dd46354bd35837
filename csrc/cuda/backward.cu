// CUDA backward of the fused pool mixer: one reduction pass (per-(n, c, tile) sums of
// D * dy and x * dy), small deterministic folds on device, then one pass that writes dx.
// See pool_mixer_cuda.cuh and DESIGN.md section 2.
#include <torch/library.h>

#include "pool_mixer_cuda.cuh"

namespace fused_poolformer {
namespace cuda_kernels {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> pool_mixer_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x_in, const at::Tensor& mean_in,
    const at::Tensor& rstd_in, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& layer_scale, const std::optional<at::Tensor>& res_scale,
    const std::optional<at::Tensor>& sample_scale, int64_t num_groups, int64_t pool_size,
    std::array<bool, 4> output_mask) {
  check_backward_args(grad_y, x_in, mean_in, rstd_in, weight, layer_scale, res_scale,
                      sample_scale, num_groups, pool_size);
  TORCH_CHECK(x_in.is_cuda(), "pool_mixer_backward (CUDA kernel): x must be a CUDA tensor");
  const c10::cuda::CUDAGuard device_guard(x_in.device());
  const Layout layout = choose_layout(x_in);
  const bool channels_last = layout == Layout::kChannelsLast;
  const at::Tensor x = in_layout(x_in, layout);
  const at::Tensor dy = in_layout(grad_y, layout);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t G = num_groups, Cg = C / G;
  const auto acc_opts = x.options().dtype(accumulate_type(x.scalar_type()));
  at::Tensor dx = output_mask[0] ? at::empty_like(x, memory_format(layout)) : empty_gradient(x);
  // T[c] = sum_n rstd * sample_scale * sum(D * dy), sum(x * dy) per channel (DESIGN.md 2).
  at::Tensor channel_t = at::zeros({C}, acc_opts), channel_xdy = at::zeros({C}, acc_opts);
  if (x.numel() > 0) {
    const at::Tensor mean = mean_in.contiguous(), rstd = rstd_in.contiguous();
    const at::Tensor a = mixer_coefficients(x, weight, layer_scale, sample_scale);
    const at::Tensor sample = vector_or_ones(sample_scale, N, x);
    const at::Tensor res = vector_or_ones(res_scale, C, x);
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pool_mixer_backward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      TileArgs<scalar_t, acc_t> args{};
      args.x = x.const_data_ptr<scalar_t>();
      args.dy = dy.const_data_ptr<scalar_t>();
      args.a_nc = a.const_data_ptr<acc_t>();
      args.mean_ng = mean.const_data_ptr<acc_t>();
      args.rstd_ng = rstd.const_data_ptr<acc_t>();
      args.res_c = res.const_data_ptr<acc_t>();

      const TileGeometry sums = make_tile_geometry(x, G, pool_size, channels_last, kSums, sizeof(acc_t));
      at::Tensor partial_d = at::empty({N, C, int64_t(sums.tiles_h) * sums.tiles_w}, acc_opts);
      at::Tensor partial_x = at::empty_like(partial_d);
      args.partial_d = partial_d.mutable_data_ptr<acc_t>();
      args.partial_x = partial_x.mutable_data_ptr<acc_t>();
      launch_tile_kernel<scalar_t, acc_t, kSums>(sums, channels_last, args, stream);

      // Fixed-shape reductions (deterministic on CUDA).
      const at::Tensor d = partial_d.sum(2);                                     // (N, C)
      const at::Tensor group_s = (a * d).reshape({N, G, Cg}).sum(2).contiguous();  // S[n, g]
      channel_t = (per_channel_table(rstd, C) * sample.unsqueeze(1) * d).sum(0);
      channel_xdy = partial_x.sum(2).sum(0);

      if (output_mask[0]) {
        const TileGeometry apply = make_tile_geometry(x, G, pool_size, channels_last, kDx, sizeof(acc_t));
        args.out = dx.mutable_data_ptr<scalar_t>();
        args.s_ng = group_s.const_data_ptr<acc_t>();
        args.inv_group_numel = acc_t(1) / static_cast<acc_t>(Cg * H * W);
        launch_tile_kernel<scalar_t, acc_t, kDx>(apply, channels_last, args, stream);
      }
    });
  }
  return parameter_gradients(dx, x, channel_t, channel_xdy, weight, layer_scale, res_scale,
                             output_mask);
}

}  // namespace
}  // namespace cuda_kernels

TORCH_LIBRARY_IMPL(fused_poolformer, CUDA, m) {
  m.impl("pool_mixer_backward", &cuda_kernels::pool_mixer_backward_cuda);
}

}  // namespace fused_poolformer
