// CPU backward of the fused pool mixer: one pass of per-task sums of D * dy and x * dy,
// fixed-order folds into S[n, g] and the parameter gradients, then one pass that writes
// dx.  Helpers and the traversal are described in kernels.h; formulas in docs/math.md.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "kernels.h"

namespace fused_poolformer {
namespace cpu {
namespace {

// ---------------------------------------------------------------------------------------
// Backward, pass 1: per task, the sums of D * dy and x * dy for every channel it touches.
// NCHW tasks keep one vector of lanes (one channel), channels_last tasks one value per
// channel; `accumulator_width` says which.

template <typename acc_t>
inline int64_t accumulator_width(const Geometry<acc_t>& g) {
  return g.channels_last ? g.C : kLanes<acc_t>;
}

template <typename scalar_t, typename acc_t, bool kCL>
void backward_sums(const Geometry<acc_t>& g, const scalar_t* x, const scalar_t* dy,
                   const acc_t* mean_nc, acc_t* partial_d, acc_t* partial_x) {
  using Vec = Vectorized<acc_t>;
  const int64_t width = accumulator_width(g);
  for_each_task(g, [&](int64_t plane, int64_t chunk, int64_t h_begin, int64_t h_end,
                       RowScratch<acc_t>& scratch) {
    const scalar_t* xp = x + plane * g.plane_numel();
    const scalar_t* dyp = dy + plane * g.plane_numel();
    const acc_t* shift = mean_nc + plane_factor_offset(g, plane);
    acc_t* acc_d = partial_d + (plane * g.chunks + chunk) * width;
    acc_t* acc_x = partial_x + (plane * g.chunks + chunk) * width;
    std::fill(acc_d, acc_d + width, acc_t(0));
    std::fill(acc_x, acc_x + width, acc_t(0));
    auto centered = [&](int64_t h, int64_t o, int64_t lanes, int64_t c, int64_t) {
      return load<acc_t>(xp + h * g.L + o, lanes) - per_channel<kCL>(shift, c, lanes);
    };
    auto emit = [&](int64_t h, const HorizontalSum<acc_t>& box) {
      const Vec inv_h(g.inv_h[h]);
      // NCHW: one channel per plane, so the row's sums stay in registers.
      Vec row_d(acc_t(0)), row_x(acc_t(0));
      for_each_chunk<kCL>(g, [&](int64_t o, int64_t lanes, int64_t c, int64_t w) {
        const Vec xv = load<acc_t>(xp + h * g.L + o, lanes);
        const Vec grad = load<acc_t>(dyp + h * g.L + o, lanes);
        const Vec d = box(o, lanes) * inv_h * per_position<kCL>(g, w, lanes) -
                      (xv - per_channel<kCL>(shift, c, lanes));
        const Vec dd = first_lanes(d * grad, lanes), xd = first_lanes(xv * grad, lanes);
        if constexpr (kCL) {
          store(acc_d + c, load<acc_t>(acc_d + c, lanes) + dd, lanes);
          store(acc_x + c, load<acc_t>(acc_x + c, lanes) + xd, lanes);
        } else {
          row_d += dd;
          row_x += xd;
        }
      });
      if constexpr (!kCL) {
        store(acc_d, load<acc_t>(acc_d, kLanes<acc_t>) + row_d, kLanes<acc_t>);
        store(acc_x, load<acc_t>(acc_x, kLanes<acc_t>) + row_x, kLanes<acc_t>);
      }
    };
    box_sum_rows<kCL>(g, h_begin, h_end, scratch, centered, emit);
  });
}

// Folds the task partials into per-(n, c) sums, in a fixed order.
template <typename acc_t>
std::vector<acc_t> per_channel_sums(const Geometry<acc_t>& g, const std::vector<acc_t>& partial) {
  const int64_t width = accumulator_width(g);
  std::vector<acc_t> out(g.N * g.C, acc_t(0));
  for (int64_t plane = 0; plane < g.planes; ++plane) {
    for (int64_t chunk = 0; chunk < g.chunks; ++chunk) {
      const acc_t* p = partial.data() + (plane * g.chunks + chunk) * width;
      if (g.channels_last) {
        for (int64_t c = 0; c < g.C; ++c) out[plane * g.C + c] += p[c];
      } else {
        acc_t s = 0;
        for (int64_t i = 0; i < width; ++i) s += p[i];
        out[plane] += s;
      }
    }
  }
  return out;
}

// ---------------------------------------------------------------------------------------
// Backward, pass 2: dx = res * dy + coef * (P^T dy - dy) - corr * (x - mean), where
// P^T dy is the box sum of dy / cnt (the adjoint of the pool) and corr = rstd^3 / M * S.

template <typename scalar_t, typename acc_t, bool kCL>
void backward_dx(const Geometry<acc_t>& g, const scalar_t* x, const scalar_t* dy, scalar_t* dx,
                 const acc_t* mean_nc, const acc_t* coef_nc, const acc_t* corr_nc,
                 const acc_t* res_c) {
  using Vec = Vectorized<acc_t>;
  for_each_task(g, [&](int64_t plane, int64_t, int64_t h_begin, int64_t h_end,
                       RowScratch<acc_t>& scratch) {
    const int64_t offset = plane * g.plane_numel();
    const int64_t f = plane_factor_offset(g, plane);
    const acc_t* res = res_c + plane_channel(g, plane);
    // The adjoint of the pool spreads dy / cnt over the window: box sums of dy / cnt, with
    // cnt = cnt_h * cnt_w.  1/cnt_h goes in per row; 1/cnt_w is shared by a column, so it
    // scales the column sum once.
    auto spread = [&](int64_t h, int64_t o, int64_t lanes, int64_t, int64_t) {
      return load<acc_t>(dy + offset + h * g.L + o, lanes) * Vec(g.inv_h[h]);
    };
    auto per_column = [&](Vec v, int64_t lanes, int64_t w) {
      return v * per_position<kCL>(g, w, lanes);
    };
    auto emit = [&](int64_t h, const HorizontalSum<acc_t>& box) {
      for_each_chunk<kCL>(g, [&](int64_t o, int64_t lanes, int64_t c, int64_t) {
        const int64_t at = offset + h * g.L + o;
        const Vec grad = load<acc_t>(dy + at, lanes);
        const Vec xc = load<acc_t>(x + at, lanes) - per_channel<kCL>(mean_nc + f, c, lanes);
        const Vec out = per_channel<kCL>(res, c, lanes) * grad +
                        per_channel<kCL>(coef_nc + f, c, lanes) * (box(o, lanes) - grad) -
                        per_channel<kCL>(corr_nc + f, c, lanes) * xc;
        store_output(dx + at, out, lanes, g.stream_outputs);
      });
    };
    box_sum_rows<kCL>(g, h_begin, h_end, scratch, spread, emit, per_column);
  });
}


// ---------------------------------------------------------------------------------------
// The launcher.

template <typename scalar_t>
void backward_kernel(const BackwardProblem& p) {
  using acc_t = at::opmath_type<scalar_t>;
  const MixerShape& s = p.shape;
  const int64_t N = s.N, C = s.C, G = s.G;
  const scalar_t* x = p.x.const_data_ptr<scalar_t>();
  const scalar_t* dy = p.grad_y.const_data_ptr<scalar_t>();
  const acc_t* rstd = p.rstd.const_data_ptr<acc_t>();
  const auto f = channel_factors<scalar_t, acc_t>(s, p.params, p.mean.const_data_ptr<acc_t>(), rstd);
  const auto g = make_geometry<acc_t>(s, std::is_same_v<scalar_t, float>);

  std::vector<acc_t> partial_d(g.tasks() * accumulator_width(g));
  std::vector<acc_t> partial_x(partial_d.size());
  with_layout(s.channels_last, [&](auto channels_last) {
    backward_sums<scalar_t, acc_t, decltype(channels_last)::value>(
        g, x, dy, f.mean.data(), partial_d.data(), partial_x.data());
  });
  const auto d = per_channel_sums(g, partial_d), xs = per_channel_sums(g, partial_x);

  // S[n, g] = sum over the group of a * D * dy; T[c] = sum_n rstd * sample_scale *
  // sum(D * dy); sum(x * dy) per channel -- in a fixed order.
  std::vector<acc_t> group_s(N * G, acc_t(0)), channel_t(C, acc_t(0)), channel_xdy(C, acc_t(0));
  for (int64_t n = 0; n < N; ++n) {
    const acc_t sample = p.params.sample_factor<scalar_t, acc_t>(n);
    for (int64_t c = 0; c < C; ++c) {
      const int64_t nc = n * C + c, ng = n * G + c / s.Cg;
      group_s[ng] += p.params.channel_factor<scalar_t, acc_t>(c) * sample * d[nc];
      channel_t[c] += rstd[ng] * sample * d[nc];
      channel_xdy[c] += xs[nc];
    }
  }
  for (int64_t c = 0; c < C; ++c) {
    p.grads.write<scalar_t, acc_t>(p.params, c, channel_t[c], channel_xdy[c]);
  }
  if (!p.grad_x.defined()) return;

  // corr = rstd^3 / M * S, per (n, c).
  std::vector<acc_t> corr(N * C);
  const acc_t inv_numel = acc_t(1) / static_cast<acc_t>(s.group_numel());
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t c = 0; c < C; ++c) {
      const int64_t ng = n * G + c / s.Cg;
      corr[n * C + c] = rstd[ng] * rstd[ng] * rstd[ng] * group_s[ng] * inv_numel;
    }
  }
  with_layout(s.channels_last, [&](auto channels_last) {
    backward_dx<scalar_t, acc_t, decltype(channels_last)::value>(
        g, x, dy, p.grad_x.mutable_data_ptr<scalar_t>(), f.mean.data(), f.coef.data(),
        corr.data(), f.res.data());
  });
}

void launch_backward(const BackwardProblem& p) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.x.scalar_type(),
                                  "pool_mixer_backward_cpu", [&] { backward_kernel<scalar_t>(p); });
}

BackwardResult pool_mixer_backward_cpu(const at::Tensor& grad_y, const at::Tensor& x,
                                       const at::Tensor& mean, const at::Tensor& rstd,
                                       const OptionalTensor& weight, const OptionalTensor& bias,
                                       const OptionalTensor& layer_scale,
                                       const OptionalTensor& res_scale,
                                       const OptionalTensor& sample_scale, int64_t num_groups,
                                       int64_t pool_size, double eps,
                                       std::array<bool, 5> output_mask) {
  return run_backward(grad_y, x, mean, rstd, weight, bias, layer_scale, res_scale, sample_scale,
                      num_groups, pool_size, eps, output_mask, at::kCPU, &launch_backward);
}

}  // namespace
}  // namespace cpu

TORCH_LIBRARY_IMPL(fused_poolformer, CPU, m) {
  m.impl("pool_mixer_backward", &cpu::pool_mixer_backward_cpu);
}

}  // namespace fused_poolformer
