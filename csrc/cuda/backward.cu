// CUDA backward of the fused pool mixer: one reduction pass (per-(n, c, tile) sums of
// D * dy and x * dy), one fold launch (S[n, g] and the parameter gradients, fixed order),
// then one pass that writes dx.  See kernels.cuh and docs/math.md.
// Per call: 3 launches; allocations: the requested gradients (host.cpp) and one workspace.
#include <torch/library.h>

#include "kernels.cuh"

namespace fused_poolformer {
namespace cuda_kernels {
namespace {

template <typename scalar_t>
void backward_kernels(const BackwardProblem& p) {
  using acc_t = at::opmath_type<scalar_t>;
  const MixerShape& s = p.shape;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  TileArgs<scalar_t, acc_t> args{};
  args.x = p.x.const_data_ptr<scalar_t>();
  args.dy = p.grad_y.const_data_ptr<scalar_t>();
  args.params = p.params;
  args.mean_ng = p.mean.const_data_ptr<acc_t>();
  args.rstd_ng = p.rstd.const_data_ptr<acc_t>();

  const TileGeometry sums = make_tile_geometry(p.x, s, kSums, sizeof(acc_t));
  const int64_t slots = int64_t(sums.tiles_h) * sums.tiles_w;
  // One workspace: partial sums of D * dy and x * dy, then S[n, g].
  const int64_t partial_numel = s.N * s.C * slots;
  at::Tensor workspace = at::empty({2 * partial_numel + s.N * s.G}, p.mean.options());
  acc_t* partial_d = workspace.mutable_data_ptr<acc_t>();
  acc_t* partial_x = partial_d + partial_numel;
  acc_t* s_ng = partial_x + partial_numel;
  args.partial_d = partial_d;
  args.partial_x = partial_x;
  launch_tile_kernel<scalar_t, acc_t, kSums>(sums, s.channels_last, args, stream);

  const FoldGeometry fold{s.N, s.C, s.G, s.Cg, slots};
  const int64_t fold_blocks = s.N * s.G + (s.C + kThreads - 1) / kThreads;
  fold_kernel<scalar_t, acc_t><<<static_cast<unsigned int>(fold_blocks), kThreads, 0, stream>>>(
      fold, partial_d, partial_x, args.rstd_ng, p.params, p.grads, s_ng);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  if (!p.grad_x.defined()) return;
  const TileGeometry apply = make_tile_geometry(p.x, s, kDx, sizeof(acc_t));
  args.out = p.grad_x.mutable_data_ptr<scalar_t>();
  args.s_ng = s_ng;
  args.inv_group_numel = acc_t(1) / static_cast<acc_t>(s.group_numel());
  launch_tile_kernel<scalar_t, acc_t, kDx>(apply, s.channels_last, args, stream);
}

void launch_backward(const BackwardProblem& p) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.x.scalar_type(),
                                  "pool_mixer_backward_cuda", [&] { backward_kernels<scalar_t>(p); });
}

BackwardResult pool_mixer_backward_cuda(const at::Tensor& grad_y, const at::Tensor& x,
                                        const at::Tensor& mean, const at::Tensor& rstd,
                                        const OptionalTensor& weight, const OptionalTensor& bias,
                                        const OptionalTensor& layer_scale,
                                        const OptionalTensor& res_scale,
                                        const OptionalTensor& sample_scale, int64_t num_groups,
                                        int64_t pool_size, double eps,
                                        std::array<bool, 5> output_mask) {
  return run_backward(grad_y, x, mean, rstd, weight, bias, layer_scale, res_scale, sample_scale,
                      num_groups, pool_size, eps, output_mask, at::kCUDA, &launch_backward);
}

}  // namespace
}  // namespace cuda_kernels

TORCH_LIBRARY_IMPL(fused_poolformer, CUDA, m) {
  m.impl("pool_mixer_backward", &cuda_kernels::pool_mixer_backward_cuda);
}

}  // namespace fused_poolformer
