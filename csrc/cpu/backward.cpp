// CPU backward of the fused pool mixer: one pass of per-task sums of D * dy (and x * dy
// when dres_scale is asked for), fixed-order folds into S[n, g] and the parameter
// gradients, then one pass that writes dx.  Helpers and the traversals are described in
// traversal.h, the formulas in docs/math.md; registration in operators.cpp.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include "api.h"
#include "traversal.h"

namespace fused_poolformer {
namespace cpu {
namespace {

// ---------------------------------------------------------------------------------------
// Pass 1: per work item, the sums of D * dy (and x * dy) for every (n, c) it touches,
// written to ddy / xdy at [chunk][n * C + c] (one chunk for flat planes).

template <typename acc_t>
struct Partials {
  acc_t* ddy;  // sums of D * dy
  acc_t* xdy;  // sums of x * dy (nullptr: not asked for)
};

template <bool kXdy, typename scalar_t, typename acc_t>
struct SumsPass {
  using Vec = Vectorized<acc_t>;
  static constexpr int64_t V = kLanes<acc_t>;
  const WorkSplit<acc_t>& g;
  const scalar_t* x;
  const scalar_t* dy;
  const Factors<acc_t>& f;
  Partials<acc_t> out;

  template <int R>
  void strip(int64_t item, Vec* col) const {
    const StripTask st = strip_task(g, item);
    const int64_t C = g.C, W = g.W;
    const acc_t* inv_h = g.inv_h;
    const acc_t* inv_w = g.inv_w;
    with_strip_shape<acc_t>(st, [&](auto nv_const, auto lanes) FPM_LAMBDA_INLINE {
      constexpr int NV = decltype(nv_const)::value;
      const scalar_t* xp = x + st.offset;
      const scalar_t* dyp = dy + st.offset;
      Vec mean[NV], acc_d[NV], acc_x[NV];
      unrolled<NV>([&](auto k) FPM_LAMBDA_INLINE {
        mean[k] = load<acc_t>(f.mean + st.n * C + st.c0 + k * V, lanes(k));
        acc_d[k] = acc_x[k] = Vec(acc_t(0));
      });
      auto source = [&](int64_t hh) FPM_LAMBDA_INLINE {
        return [&, p = xp + hh * W * C](int64_t w, auto k) FPM_LAMBDA_INLINE {
          return load<acc_t>(p + w * C + k * V, lanes(k)) - mean[k];
        };
      };
      auto column = [](Vec v, int64_t) FPM_LAMBDA_INLINE { return v; };
      // (Lanes past the strip's channels are never stored: no masking needed.)
      auto emit = [&](int64_t h, int64_t w, const Vec* box) FPM_LAMBDA_INLINE {
        // The lines the next output row needs first: its new x window row and its dy row.
        prefetch_strip_line(g, xp, h + g.rh + 1, w, NV * V);
        prefetch_strip_line(g, dyp, h + 1, w, NV * V);
        const Vec inv(inv_h[h] * inv_w[w]);
        unrolled<NV>([&](auto k) FPM_LAMBDA_INLINE {
          const int64_t o = (h * W + w) * C + k * V;
          const Vec xv = load<acc_t>(xp + o, lanes(k));
          const Vec grad = load<acc_t>(dyp + o, lanes(k));
          acc_d[k] += (box[k] * inv - (xv - mean[k])) * grad;
          if constexpr (kXdy) acc_x[k] += xv * grad;
        });
      };
      strip_box_sums<R, NV>(g, st.h_begin, st.h_end, col, source, column, emit);
      const int64_t at = st.chunk * g.N * C + st.n * C + st.c0;
      unrolled<NV>([&](auto k) FPM_LAMBDA_INLINE {
        store(out.ddy + at + k * V, acc_d[k], lanes(k));
        if constexpr (kXdy) store(out.xdy + at + k * V, acc_x[k], lanes(k));
      });
    });
  }

  template <int R>
  void plane(int64_t plane, const PlaneScratch<acc_t>& s) const {
    const int64_t HW = g.plane_numel();
    const scalar_t* xp = x + plane * HW;
    const scalar_t* dyp = dy + plane * HW;
    const Vec mean(f.mean[plane]);
    Vec acc_d(acc_t(0)), acc_x(acc_t(0));
    auto source = [&](int64_t i, int64_t n) FPM_LAMBDA_INLINE {
      return first_lanes(load<acc_t>(xp + i, n) - mean, n);
    };
    auto emit = [&](int64_t i, int64_t n, Vec box) FPM_LAMBDA_INLINE {
      const Vec grad = load<acc_t>(dyp + i, n);
      const Vec d = box * Vec::loadu(g.inv_cnt + i) - Vec::loadu(s.xs + i);
      acc_d += first_lanes(d * grad, n);
      if constexpr (kXdy) acc_x += first_lanes(load<acc_t>(xp + i, n) * grad, n);
    };
    plane_box_sums<R>(g, s, source, emit);
    out.ddy[plane] = lane_sum(acc_d);
    if constexpr (kXdy) out.xdy[plane] = lane_sum(acc_x);
  }

  template <int R>
  void row(int64_t item, acc_t* col) const {
    const RowTask r = row_task(g, item);
    const acc_t* inv_h = g.inv_h;
    const acc_t* inv_w = g.inv_w;
    const int64_t HW = g.plane_numel(), W = g.W;
    const scalar_t* xp = x + r.plane * HW;
    const scalar_t* dyp = dy + r.plane * HW;
    const Vec mean(f.mean[r.plane]);
    Vec acc_d(acc_t(0)), acc_x(acc_t(0));
    auto source = [&](int64_t hh) FPM_LAMBDA_INLINE {
      return [&, p = xp + hh * W](int64_t w, int64_t n) FPM_LAMBDA_INLINE {
        return load<acc_t>(p + w, n) - mean;
      };
    };
    auto column = [](Vec v, int64_t, int64_t) FPM_LAMBDA_INLINE { return v; };
    auto emit = [&](int64_t h, const auto& box) FPM_LAMBDA_INLINE {
      const Vec row_scale(inv_h[h]);
      for (int64_t w = 0; w < W; w += V) {
        const int64_t n = std::min(V, W - w);
        const Vec xv = load<acc_t>(xp + h * W + w, n);
        const Vec grad = load<acc_t>(dyp + h * W + w, n);
        const Vec d = box(w) * row_scale * load<acc_t>(inv_w + w, n) - (xv - mean);
        acc_d += first_lanes(d * grad, n);
        if constexpr (kXdy) acc_x += first_lanes(xv * grad, n);
      }
    };
    row_box_sums<R>(g, r.h_begin, r.h_end, col, source, column, emit);
    const int64_t at = r.chunk * g.N * g.C + r.plane;
    out.ddy[at] = lane_sum(acc_d);
    if constexpr (kXdy) out.xdy[at] = lane_sum(acc_x);
  }
};

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
struct InputGradientPass {
  using Vec = Vectorized<acc_t>;
  static constexpr int64_t V = kLanes<acc_t>;
  const WorkSplit<acc_t>& g;
  const scalar_t* x;
  const scalar_t* dy;
  scalar_t* dx;
  const Factors<acc_t>& f;
  const acc_t* corr_nc;
  bool streaming;

  template <int R>
  void strip(int64_t item, Vec* col) const {
    const bool stream = streaming;
    const StripTask st = strip_task(g, item);
    const int64_t C = g.C, W = g.W;
    const acc_t* inv_h = g.inv_h;
    const acc_t* inv_w = g.inv_w;
    with_strip_shape<acc_t>(st, [&](auto nv_const, auto lanes) FPM_LAMBDA_INLINE {
      constexpr int NV = decltype(nv_const)::value;
      const scalar_t* xp = x + st.offset;
      const scalar_t* dyp = dy + st.offset;
      scalar_t* dxp = dx + st.offset;
      Vec mean[NV], coef[NV], res[NV], corr[NV];
      unrolled<NV>([&](auto k) FPM_LAMBDA_INLINE {
        const int64_t nc = st.n * C + st.c0 + k * V;
        mean[k] = load<acc_t>(f.mean + nc, lanes(k));
        coef[k] = load<acc_t>(f.coef + nc, lanes(k));
        corr[k] = load<acc_t>(corr_nc + nc, lanes(k));
        res[k] = load<acc_t>(f.res + st.c0 + k * V, lanes(k));
      });
      auto source = [&](int64_t hh) FPM_LAMBDA_INLINE {
        return [&, p = dyp + hh * W * C, scale = Vec(inv_h[hh])](int64_t w, auto k) FPM_LAMBDA_INLINE {
          return load<acc_t>(p + w * C + k * V, lanes(k)) * scale;
        };
      };
      auto column = [&](Vec v, int64_t w) FPM_LAMBDA_INLINE { return v * Vec(inv_w[w]); };
      auto emit = [&](int64_t h, int64_t w, const Vec* box) FPM_LAMBDA_INLINE {
        // The lines the next output row needs first: its new dy window row and its x row.
        prefetch_strip_line(g, dyp, h + g.rh + 1, w, NV * V);
        prefetch_strip_line(g, xp, h + 1, w, NV * V);
        unrolled<NV>([&](auto k) FPM_LAMBDA_INLINE {
          const int64_t o = (h * W + w) * C + k * V;
          const Vec grad = load<acc_t>(dyp + o, lanes(k));
          const Vec xc = load<acc_t>(xp + o, lanes(k)) - mean[k];
          store_output(dxp + o, input_gradient(res[k], coef[k], corr[k], grad, box[k], xc),
                       lanes(k), stream);
        });
      };
      strip_box_sums<R, NV>(g, st.h_begin, st.h_end, col, source, column, emit);
    });
  }

  template <int R>
  void plane(int64_t plane, const PlaneScratch<acc_t>& s) const {
    const bool stream = streaming;
    const int64_t offset = plane * g.plane_numel();
    const Vec mean(f.mean[plane]), coef(f.coef[plane]), corr(corr_nc[plane]);
    const Vec res(f.res[plane % g.C]);
    auto source = [&](int64_t i, int64_t n) FPM_LAMBDA_INLINE {
      return first_lanes(load<acc_t>(dy + offset + i, n), n) * Vec::loadu(g.inv_cnt + i);
    };
    auto emit = [&](int64_t i, int64_t n, Vec box) FPM_LAMBDA_INLINE {
      const Vec grad = load<acc_t>(dy + offset + i, n);
      const Vec xc = load<acc_t>(x + offset + i, n) - mean;
      store_output(dx + offset + i, input_gradient(res, coef, corr, grad, box, xc), n, stream);
    };
    plane_box_sums<R>(g, s, source, emit);
  }

  template <int R>
  void row(int64_t item, acc_t* col) const {
    const bool stream = streaming;
    const RowTask r = row_task(g, item);
    const acc_t* inv_h = g.inv_h;
    const acc_t* inv_w = g.inv_w;
    const int64_t W = g.W, offset = r.plane * g.plane_numel();
    const Vec mean(f.mean[r.plane]), coef(f.coef[r.plane]), corr(corr_nc[r.plane]);
    const Vec res(f.res[r.plane % g.C]);
    auto source = [&](int64_t hh) FPM_LAMBDA_INLINE {
      return [&, p = dy + offset + hh * W, scale = Vec(inv_h[hh])](int64_t w, int64_t n) FPM_LAMBDA_INLINE {
        return load<acc_t>(p + w, n) * scale;
      };
    };
    auto column = [&](Vec v, int64_t w, int64_t n) FPM_LAMBDA_INLINE { return v * load<acc_t>(inv_w + w, n); };
    auto emit = [&](int64_t h, const auto& box) FPM_LAMBDA_INLINE {
      for (int64_t w = 0; w < W; w += V) {
        const int64_t n = std::min(V, W - w), at = offset + h * W + w;
        const Vec grad = load<acc_t>(dy + at, n);
        const Vec xc = load<acc_t>(x + at, n) - mean;
        store_output(dx + at, input_gradient(res, coef, corr, grad, box(w), xc), n, stream);
      }
    };
    row_box_sums<R>(g, r.h_begin, r.h_end, col, source, column, emit);
  }
};

// ---------------------------------------------------------------------------------------
// The launcher.

// T[c] = sum_n rstd * sample_scale * sum(D * dy) and sum(x * dy) from the per-(n, c) sums
// (chunks already folded), in a fixed order; then every requested (C,) gradient.
template <bool kXdy, typename scalar_t, typename acc_t>
void write_parameter_gradients(const BackwardProblem& p, const Partials<acc_t>& partial,
                               acc_t* channel_t, acc_t* channel_xdy) {
  const MixerShape& s = p.shape;
  const int64_t N = s.N, C = s.C, G = s.G;
  const acc_t* rstd = p.rstd.const_data_ptr<acc_t>();
  std::fill(channel_t, channel_t + C, acc_t(0));
  std::fill(channel_xdy, channel_xdy + C, acc_t(0));
  for (int64_t n = 0; n < N; ++n) {
    const acc_t sample = p.params.sample_factor<scalar_t, acc_t>(n);
    for (int64_t c = 0; c < C; ++c) {
      channel_t[c] += rstd[n * G + c / s.Cg] * sample * partial.ddy[n * C + c];
      if constexpr (kXdy) channel_xdy[c] += partial.xdy[n * C + c];
    }
  }
  for (int64_t c = 0; c < C; ++c) {
    p.grads.write<scalar_t, acc_t>(p.params, c, channel_t[c], channel_xdy[c]);
  }
}

template <bool kXdy, typename scalar_t>
void backward_with(const BackwardProblem& p) {
  using acc_t = at::opmath_type<scalar_t>;
  const MixerShape& s = p.shape;
  const int64_t N = s.N, C = s.C, G = s.G;
  const scalar_t* x = p.x.const_data_ptr<scalar_t>();
  const scalar_t* dy = p.grad_y.const_data_ptr<scalar_t>();
  const acc_t* mean = p.mean.const_data_ptr<acc_t>();
  const acc_t* rstd = p.rstd.const_data_ptr<acc_t>();
  const bool want_dx = p.grad_x.defined();
  scalar_t* dx = want_dx ? p.grad_x.mutable_data_ptr<scalar_t>() : nullptr;
  WorkSplit<acc_t> g = make_work_split<acc_t>(s, 2 * C * s.H * s.W * int64_t(sizeof(scalar_t)));
  const int64_t partial_count = g.partial_chunks() * N * C;

  Workspace ws;
  Factors<acc_t> f;
  Partials<acc_t> partial{};
  acc_t *corr = nullptr, *group_s = nullptr, *channel_t = nullptr, *channel_xdy = nullptr;
  ws.fit([&](Workspace& a) {
    take_tables(g, a);
    f.take(a, s);
    partial.ddy = a.take<acc_t>(partial_count);
    partial.xdy = kXdy ? a.take<acc_t>(partial_count) : nullptr;
    corr = a.take<acc_t>(N * C);
    group_s = a.take<acc_t>(N * G);
    channel_t = a.take<acc_t>(C);
    channel_xdy = a.take<acc_t>(C);
  });
  fill_channel_factors<scalar_t>(f, s, p.params);
  for (int64_t n = 0; n < N; ++n) {
    fill_sample_factors(f, s, n, p.params.sample_factor<scalar_t, acc_t>(n), mean, rstd);
  }

  const int64_t run = s.channels_last ? C : (g.traversal == Traversal::kPlanes ? s.H * s.W : s.W);
  const SumsPass<kXdy, scalar_t, acc_t> sums{g, x, dy, f, partial};
  const InputGradientPass<scalar_t, acc_t> gradient_pass{
      g, x, dy, dx, f, corr, want_dx && can_stream<scalar_t, acc_t>(dx, run)};
  // Sample n's sums: its chunks folded in order into the first, S[n, g] = sum over the group
  // of a * D * dy, and corr = rstd^3 / M * S per (n, c).
  const acc_t inv_numel = acc_t(1) / static_cast<acc_t>(s.group_numel());
  auto finish_sample = [&](int64_t n) {
    for (int64_t chunk = 1; chunk < g.partial_chunks(); ++chunk) {
      for (int64_t i = n * C; i < (n + 1) * C; ++i) {
        partial.ddy[i] += partial.ddy[chunk * N * C + i];
        if constexpr (kXdy) partial.xdy[i] += partial.xdy[chunk * N * C + i];
      }
    }
    const acc_t sample = p.params.sample_factor<scalar_t, acc_t>(n);
    for (int64_t i = 0; i < G; ++i) {
      acc_t sum = 0;
      for (int64_t c = i * s.Cg; c < (i + 1) * s.Cg; ++c) sum += f.channel[c] * sample * partial.ddy[n * C + c];
      group_s[n * G + i] = sum;
      const acc_t r = rstd[n * G + i];
      std::fill(corr + n * C + i * s.Cg, corr + n * C + (i + 1) * s.Cg, r * r * r * sum * inv_numel);
    }
  };

  if (g.fused) {
    at::parallel_for(0, N, grain_size(g.sample_numel()), [&](int64_t begin, int64_t end) {
      Scratch scratch;
      TraversalScratch<acc_t> buffers;
      scratch.fit([&](Scratch& a) { buffers = take_traversal_scratch(g, a); });
      for (int64_t n = begin; n < end; ++n) {
        run_items(sums, g, n * g.items_per_sample, (n + 1) * g.items_per_sample, buffers);
        finish_sample(n);
        if (want_dx) {
          run_items(gradient_pass, g, n * g.items_per_sample, (n + 1) * g.items_per_sample,
                    buffers);
        }
      }
      output_fence();
    });
  } else {
    run_tasks(g, sums);
    for (int64_t n = 0; n < N; ++n) finish_sample(n);
    if (want_dx) run_tasks(g, gradient_pass);
  }

  if (p.grads.any()) write_parameter_gradients<kXdy, scalar_t>(p, partial, channel_t, channel_xdy);
}

template <typename scalar_t>
void backward_kernel(const BackwardProblem& p) {
  if (p.grads.res_scale.data != nullptr) {
    backward_with<true, scalar_t>(p);
  } else {
    backward_with<false, scalar_t>(p);
  }
}

}  // namespace

void launch_backward(const BackwardProblem& p) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.x.scalar_type(),
                                  "pool_mixer_backward_cpu", [&] { backward_kernel<scalar_t>(p); });
}

}  // namespace cpu
}  // namespace fused_poolformer
