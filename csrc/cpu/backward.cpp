// CPU backward of the fused pool mixer: one pass of per-task sums of D * dy (and x * dy
// when dres_scale is asked for), fixed-order folds into S[n, g] and the parameter
// gradients, then one pass that writes dx.  Helpers and the traversals are described in
// kernels.h; formulas in DESIGN.md section 2.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "kernels.h"

namespace fused_poolformer {
namespace cpu {
namespace {

// ---------------------------------------------------------------------------------------
// Pass 1: per task, the sums of D * dy and x * dy for every (n, c) it touches, written to
// partial_d / partial_x at [chunk][n * C + c] (one chunk for flat planes).

template <typename acc_t>
struct Partials {
  acc_t* d;  // sums of D * dy
  acc_t* x;  // sums of x * dy (nullptr: not asked for)
};

template <bool kXdy, typename scalar_t, typename acc_t>
void sums_strips(const Geometry<acc_t>& g, const scalar_t* x, const scalar_t* dy,
                 const Factors<acc_t>& f, Partials<acc_t> out) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = kLanes<acc_t>;
  const int64_t C = g.C, W = g.W;
  for_each_task(
      g, [&](Scratch& a) { return a.template take<Vec>(strip_scratch_vectors(g)); },
      [&](int64_t t, Vec* col) {
        const StripTask st = strip_task(g, t);
        with_strip_vectors(st.nv, [&](auto nv_const) {
          constexpr int NV = decltype(nv_const)::value;
          auto lanes = [&](int k) { return k == NV - 1 ? st.tail : V; };
          const int64_t base = st.n * g.H * W * C + st.c0;
          const scalar_t* xp = x + base;
          const scalar_t* dyp = dy + base;
          Vec mean[NV], acc_d[NV], acc_x[NV];
          for (int k = 0; k < NV; ++k) {
            mean[k] = load<acc_t>(f.mean + st.n * C + st.c0 + k * V, lanes(k));
            acc_d[k] = acc_x[k] = Vec(acc_t(0));
          }
          auto source = [&](int64_t hh, int64_t w, int k) {
            return load<acc_t>(xp + (hh * W + w) * C + k * V, lanes(k)) - mean[k];
          };
          auto column = [](Vec v, int64_t) { return v; };
          // (Lanes past the strip's channels are never stored: no masking needed.)
          auto emit = [&](int64_t h, int64_t w, const Vec* box) {
            const Vec inv(g.inv_h[h] * g.inv_w[w]);
            for (int k = 0; k < NV; ++k) {
              const int64_t o = (h * W + w) * C + k * V;
              const Vec xv = load<acc_t>(xp + o, lanes(k));
              const Vec grad = load<acc_t>(dyp + o, lanes(k));
              acc_d[k] += (box[k] * inv - (xv - mean[k])) * grad;
              if constexpr (kXdy) acc_x[k] += xv * grad;
            }
          };
          strip_box_sums<NV>(g, st.h_begin, st.h_end, col, source, column, emit);
          const int64_t at = st.chunk * g.N * C + st.n * C + st.c0;
          for (int k = 0; k < NV; ++k) {
            store(out.d + at + k * V, acc_d[k], lanes(k));
            if constexpr (kXdy) store(out.x + at + k * V, acc_x[k], lanes(k));
          }
        });
      });
}

template <bool kXdy, typename scalar_t, typename acc_t>
void sums_planes(const Geometry<acc_t>& g, const scalar_t* x, const scalar_t* dy,
                 const Factors<acc_t>& f, Partials<acc_t> out) {
  using Vec = Vectorized<acc_t>;
  const int64_t HW = g.plane_numel(), planes = g.N * g.C;
  for_each_task(
      g, [&](Scratch& a) { return take_plane_scratch(g, a); },
      [&](int64_t t, const PlaneScratch<acc_t>& s) {
        const int64_t p_end = std::min(planes, (t + 1) * g.planes_per_task);
        for (int64_t plane = t * g.planes_per_task; plane < p_end; ++plane) {
          const scalar_t* xp = x + plane * HW;
          const scalar_t* dyp = dy + plane * HW;
          const Vec mean(f.mean[plane]);
          Vec acc_d(acc_t(0)), acc_x(acc_t(0));
          auto source = [&](int64_t i, int64_t n) {
            return first_lanes(load<acc_t>(xp + i, n) - mean, n);
          };
          auto emit = [&](int64_t i, int64_t n, Vec box) {
            const Vec grad = load<acc_t>(dyp + i, n);
            const Vec d = box * Vec::loadu(g.inv_cnt + i) - Vec::loadu(s.xs + i);
            acc_d += first_lanes(d * grad, n);
            if constexpr (kXdy) acc_x += first_lanes(load<acc_t>(xp + i, n) * grad, n);
          };
          plane_box_sums(g, s, source, emit);
          out.d[plane] = lane_sum(acc_d);
          if constexpr (kXdy) out.x[plane] = lane_sum(acc_x);
        }
      });
}

template <bool kXdy, typename scalar_t, typename acc_t>
void sums_rows(const Geometry<acc_t>& g, const scalar_t* x, const scalar_t* dy,
               const Factors<acc_t>& f, Partials<acc_t> out) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = kLanes<acc_t>;
  const int64_t HW = g.plane_numel(), W = g.W;
  for_each_task(
      g, [&](Scratch& a) { return take_row_scratch(g, a); },
      [&](int64_t t, acc_t* col) {
        const RowTask r = row_task(g, t);
        const scalar_t* xp = x + r.plane * HW;
        const scalar_t* dyp = dy + r.plane * HW;
        const Vec mean(f.mean[r.plane]);
        Vec acc_d(acc_t(0)), acc_x(acc_t(0));
        auto source = [&](int64_t hh, int64_t w, int64_t n) {
          return load<acc_t>(xp + hh * W + w, n) - mean;
        };
        auto column = [](Vec v, int64_t, int64_t) { return v; };
        auto emit = [&](int64_t h, const HorizontalSum<acc_t>& box) {
          const Vec inv_h(g.inv_h[h]);
          for (int64_t w = 0; w < W; w += V) {
            const int64_t n = std::min(V, W - w);
            const Vec xv = load<acc_t>(xp + h * W + w, n);
            const Vec grad = load<acc_t>(dyp + h * W + w, n);
            const Vec d = box(w) * inv_h * load<acc_t>(g.inv_w + w, n) - (xv - mean);
            acc_d += first_lanes(d * grad, n);
            if constexpr (kXdy) acc_x += first_lanes(xv * grad, n);
          }
        };
        row_box_sums(g, r.h_begin, r.h_end, col, source, column, emit);
        const int64_t at = r.chunk * g.N * g.C + r.plane;
        out.d[at] = lane_sum(acc_d);
        if constexpr (kXdy) out.x[at] = lane_sum(acc_x);
      });
}

// ---------------------------------------------------------------------------------------
// Pass 2: dx = res * dy + coef * (P^T dy - dy) - corr * (x - mean), where P^T dy is the box
// sum of dy / cnt (the adjoint of the pool) and corr = rstd^3 / M * S.  1/cnt_h scales each
// source row, 1/cnt_w each column sum (cnt = cnt_h * cnt_w).

template <typename acc_t>
inline Vectorized<acc_t> input_gradient(Vectorized<acc_t> res, Vectorized<acc_t> coef,
                                        Vectorized<acc_t> corr, Vectorized<acc_t> grad,
                                        Vectorized<acc_t> spread, Vectorized<acc_t> xc) {
  return res * grad + coef * (spread - grad) - corr * xc;
}

template <typename scalar_t, typename acc_t>
void dx_strips(const Geometry<acc_t>& g, const scalar_t* x, const scalar_t* dy, scalar_t* dx,
               const Factors<acc_t>& f, const acc_t* corr_nc, bool streaming) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = kLanes<acc_t>;
  const int64_t C = g.C, W = g.W;
  for_each_task(
      g, [&](Scratch& a) { return a.template take<Vec>(strip_scratch_vectors(g)); },
      [&](int64_t t, Vec* col) {
        const StripTask st = strip_task(g, t);
        with_strip_vectors(st.nv, [&](auto nv_const) {
          constexpr int NV = decltype(nv_const)::value;
          auto lanes = [&](int k) { return k == NV - 1 ? st.tail : V; };
          const int64_t base = st.n * g.H * W * C + st.c0;
          const scalar_t* xp = x + base;
          const scalar_t* dyp = dy + base;
          scalar_t* dxp = dx + base;
          Vec mean[NV], coef[NV], res[NV], corr[NV];
          for (int k = 0; k < NV; ++k) {
            const int64_t nc = st.n * C + st.c0 + k * V;
            mean[k] = load<acc_t>(f.mean + nc, lanes(k));
            coef[k] = load<acc_t>(f.coef + nc, lanes(k));
            corr[k] = load<acc_t>(corr_nc + nc, lanes(k));
            res[k] = load<acc_t>(f.res + st.c0 + k * V, lanes(k));
          }
          auto source = [&](int64_t hh, int64_t w, int k) {
            return load<acc_t>(dyp + (hh * W + w) * C + k * V, lanes(k)) * Vec(g.inv_h[hh]);
          };
          auto column = [&](Vec v, int64_t w) { return v * Vec(g.inv_w[w]); };
          auto emit = [&](int64_t h, int64_t w, const Vec* box) {
            for (int k = 0; k < NV; ++k) {
              const int64_t o = (h * W + w) * C + k * V;
              const Vec grad = load<acc_t>(dyp + o, lanes(k));
              const Vec xc = load<acc_t>(xp + o, lanes(k)) - mean[k];
              store_output(dxp + o, input_gradient(res[k], coef[k], corr[k], grad, box[k], xc),
                           lanes(k), streaming);
            }
          };
          strip_box_sums<NV>(g, st.h_begin, st.h_end, col, source, column, emit);
        });
      });
}

template <typename scalar_t, typename acc_t>
void dx_planes(const Geometry<acc_t>& g, const scalar_t* x, const scalar_t* dy, scalar_t* dx,
               const Factors<acc_t>& f, const acc_t* corr_nc, bool streaming) {
  using Vec = Vectorized<acc_t>;
  const int64_t HW = g.plane_numel(), planes = g.N * g.C;
  for_each_task(
      g, [&](Scratch& a) { return take_plane_scratch(g, a); },
      [&](int64_t t, const PlaneScratch<acc_t>& s) {
        const int64_t p_end = std::min(planes, (t + 1) * g.planes_per_task);
        for (int64_t plane = t * g.planes_per_task; plane < p_end; ++plane) {
          const int64_t offset = plane * HW;
          const Vec mean(f.mean[plane]), coef(f.coef[plane]), corr(corr_nc[plane]);
          const Vec res(f.res[plane % g.C]);
          auto source = [&](int64_t i, int64_t n) {
            return first_lanes(load<acc_t>(dy + offset + i, n), n) * Vec::loadu(g.inv_cnt + i);
          };
          auto emit = [&](int64_t i, int64_t n, Vec box) {
            const Vec grad = load<acc_t>(dy + offset + i, n);
            const Vec xc = load<acc_t>(x + offset + i, n) - mean;
            store_output(dx + offset + i, input_gradient(res, coef, corr, grad, box, xc), n,
                         streaming);
          };
          plane_box_sums(g, s, source, emit);
        }
      });
}

template <typename scalar_t, typename acc_t>
void dx_rows(const Geometry<acc_t>& g, const scalar_t* x, const scalar_t* dy, scalar_t* dx,
             const Factors<acc_t>& f, const acc_t* corr_nc, bool streaming) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = kLanes<acc_t>;
  const int64_t HW = g.plane_numel(), W = g.W;
  for_each_task(
      g, [&](Scratch& a) { return take_row_scratch(g, a); },
      [&](int64_t t, acc_t* col) {
        const RowTask r = row_task(g, t);
        const int64_t offset = r.plane * HW;
        const Vec mean(f.mean[r.plane]), coef(f.coef[r.plane]), corr(corr_nc[r.plane]);
        const Vec res(f.res[r.plane % g.C]);
        auto source = [&](int64_t hh, int64_t w, int64_t n) {
          return load<acc_t>(dy + offset + hh * W + w, n) * Vec(g.inv_h[hh]);
        };
        auto column = [&](Vec v, int64_t w, int64_t n) { return v * load<acc_t>(g.inv_w + w, n); };
        auto emit = [&](int64_t h, const HorizontalSum<acc_t>& box) {
          for (int64_t w = 0; w < W; w += V) {
            const int64_t n = std::min(V, W - w), at = offset + h * W + w;
            const Vec grad = load<acc_t>(dy + at, n);
            const Vec xc = load<acc_t>(x + at, n) - mean;
            store_output(dx + at, input_gradient(res, coef, corr, grad, box(w), xc), n,
                         streaming);
          }
        };
        row_box_sums(g, r.h_begin, r.h_end, col, source, column, emit);
      });
}

// ---------------------------------------------------------------------------------------
// The launcher.

template <bool kXdy, typename scalar_t, typename acc_t>
void backward_sums(const Geometry<acc_t>& g, const scalar_t* x, const scalar_t* dy,
                   const Factors<acc_t>& f, Partials<acc_t> out) {
  switch (g.traversal) {
    case Traversal::kStrips: return sums_strips<kXdy>(g, x, dy, f, out);
    case Traversal::kPlanes: return sums_planes<kXdy>(g, x, dy, f, out);
    case Traversal::kRows: return sums_rows<kXdy>(g, x, dy, f, out);
  }
}

template <typename scalar_t>
void backward_kernel(const BackwardProblem& p) {
  using acc_t = at::opmath_type<scalar_t>;
  const MixerShape& s = p.shape;
  const int64_t N = s.N, C = s.C, G = s.G;
  const scalar_t* x = p.x.const_data_ptr<scalar_t>();
  const scalar_t* dy = p.grad_y.const_data_ptr<scalar_t>();
  const acc_t* mean = p.mean.const_data_ptr<acc_t>();
  const acc_t* rstd = p.rstd.const_data_ptr<acc_t>();
  const bool want_xdy = p.grads.res_scale.data != nullptr;
  Geometry<acc_t> g = make_geometry<acc_t>(s);
  const int64_t partial_count = g.partial_chunks() * N * C;

  Workspace ws;
  Factors<acc_t> f;
  Partials<acc_t> partial{};
  acc_t *corr = nullptr, *group_s = nullptr, *channel_t = nullptr, *channel_xdy = nullptr;
  ws.fit([&](Workspace& a) {
    take_tables(g, a);
    f.take(a, s);
    partial.d = a.take<acc_t>(partial_count);
    partial.x = want_xdy ? a.take<acc_t>(partial_count) : nullptr;
    corr = a.take<acc_t>(N * C);
    group_s = a.take<acc_t>(N * G);
    channel_t = a.take<acc_t>(C);
    channel_xdy = a.take<acc_t>(C);
  });
  fill_factors<scalar_t>(f, s, p.params, mean, rstd);

  if (want_xdy) {
    backward_sums<true>(g, x, dy, f, partial);
  } else {
    backward_sums<false>(g, x, dy, f, partial);
  }

  // Fold the chunks (in order) into the first: per-(n, c) sums of D * dy and x * dy.
  for (int64_t chunk = 1; chunk < g.partial_chunks(); ++chunk) {
    for (int64_t i = 0; i < N * C; ++i) {
      partial.d[i] += partial.d[chunk * N * C + i];
      if (want_xdy) partial.x[i] += partial.x[chunk * N * C + i];
    }
  }
  // S[n, g] = sum over the group of a * D * dy; T[c] = sum_n rstd * sample_scale *
  // sum(D * dy); sum(x * dy) per channel -- in a fixed order.
  std::fill(group_s, group_s + N * G, acc_t(0));
  std::fill(channel_t, channel_t + C, acc_t(0));
  std::fill(channel_xdy, channel_xdy + C, acc_t(0));
  for (int64_t n = 0; n < N; ++n) {
    const acc_t sample = p.params.sample_factor<scalar_t, acc_t>(n);
    for (int64_t c = 0; c < C; ++c) {
      const int64_t nc = n * C + c, ng = n * G + c / s.Cg;
      group_s[ng] += f.channel[c] * sample * partial.d[nc];
      channel_t[c] += rstd[ng] * sample * partial.d[nc];
      if (want_xdy) channel_xdy[c] += partial.x[nc];
    }
  }
  if (p.grads.any()) {
    for (int64_t c = 0; c < C; ++c) {
      p.grads.write<scalar_t, acc_t>(p.params, c, channel_t[c], channel_xdy[c]);
    }
  }
  if (!p.grad_x.defined()) return;

  // corr = rstd^3 / M * S, per (n, c).
  const acc_t inv_numel = acc_t(1) / static_cast<acc_t>(s.group_numel());
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t c = 0; c < C; ++c) {
      const int64_t ng = n * G + c / s.Cg;
      corr[n * C + c] = rstd[ng] * rstd[ng] * rstd[ng] * group_s[ng] * inv_numel;
    }
  }
  scalar_t* dx = p.grad_x.mutable_data_ptr<scalar_t>();
  switch (g.traversal) {
    case Traversal::kStrips:
      return dx_strips(g, x, dy, dx, f, corr, can_stream<scalar_t, acc_t>(dx, C));
    case Traversal::kPlanes:
      return dx_planes(g, x, dy, dx, f, corr, can_stream<scalar_t, acc_t>(dx, s.H * s.W));
    case Traversal::kRows:
      return dx_rows(g, x, dy, dx, f, corr, can_stream<scalar_t, acc_t>(dx, s.W));
  }
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
