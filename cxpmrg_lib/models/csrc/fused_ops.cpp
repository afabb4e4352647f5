// The Vision Mamba block's elementwise layers on the CPU, each one pass over memory forward and one
// backward (see cxpmrg_lib/models/fused_ops.py):
//
//   rmsnorm: y = x / sqrt(mean(x^2) + eps) * weight over the last dim of a (rows, C) tensor;
//   swiglu:  out = silu(h[:, :H]) * h[:, H:] of a (rows, 2H) tensor (the MLP's gate and value),
//            optionally with a bias (2H,) added to h first.
//
// On a CPU torch composes RMSNorm from pow, mean, add, rsqrt and two muls (and their backwards), and
// the gate from chunk, silu and mul (whose backward concatenates the two halves' gradients): each a
// pass over the activations, which for the tiny encoder's 128-wide tokens cost more than the
// arithmetic. Rows are split over torch's threads (at::parallel_for); within a row the lanes of one
// machine vector (lanes.h) run over the channels. The weight's gradient is summed per block of
// ROW_BLOCK rows and the blocks in order, so it is the same for any thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "lanes.h"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

using namespace cxpmrg;

constexpr int64_t ROW_BLOCK = 64;  // rows whose weight gradient one partial sum holds

template <typename V, typename T>
inline V load(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}

template <typename V, typename T>
inline void store(T* p, V v) {
  std::memcpy(p, &v, sizeof(V));
}

template <typename T, typename V>
inline T hsum(V v) {
  T s = 0;
  for (int w = 0; w < Lanes<T>::W; ++w) s += v[w];
  return s;
}

// ---------------------------------------------------------------- RMSNorm
template <typename T>
void rmsnorm_forward_impl(const T* x, const T* w, T* y, T* rstd, int64_t rows, int64_t C, double eps) {
  using V = typename Lanes<T>::V;
  constexpr int W = Lanes<T>::W;
  const int64_t cv = C / W * W;
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = x + r * C;
      T* yr = y + r * C;
      V acc = V{};
      for (int64_t c = 0; c < cv; c += W) {
        const V v = load<V>(xr + c);
        acc += v * v;
      }
      T ss = hsum<T>(acc);
      for (int64_t c = cv; c < C; ++c) ss += xr[c] * xr[c];
      const T s = T(1) / std::sqrt(ss / T(C) + T(eps));
      rstd[r] = s;
      for (int64_t c = 0; c < cv; c += W) store(yr + c, load<V>(xr + c) * s * load<V>(w + c));
      for (int64_t c = cv; c < C; ++c) yr[c] = xr[c] * s * w[c];
    }
  });
}

// dx = s * (g - x * s^2 * mean(g * x)) with g = dy * weight; dweight = sum over rows of dy * x * s
template <typename T>
void rmsnorm_backward_impl(const T* dy, const T* x, const T* w, const T* rstd, T* dx, T* dw, int64_t rows,
                           int64_t C) {
  using V = typename Lanes<T>::V;
  constexpr int W = Lanes<T>::W;
  const int64_t cv = C / W * W;
  const int64_t nblocks = (rows + ROW_BLOCK - 1) / ROW_BLOCK;
  std::vector<T> partial(static_cast<size_t>(nblocks * C), T(0));
  at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      T* pw = partial.data() + b * C;
      for (int64_t r = b * ROW_BLOCK; r < std::min(rows, (b + 1) * ROW_BLOCK); ++r) {
        const T *xr = x + r * C, *dyr = dy + r * C;
        T* dxr = dx + r * C;
        const T s = rstd[r];
        V acc = V{};
        for (int64_t c = 0; c < cv; c += W) acc += load<V>(dyr + c) * load<V>(w + c) * load<V>(xr + c);
        T dot = hsum<T>(acc);
        for (int64_t c = cv; c < C; ++c) dot += dyr[c] * w[c] * xr[c];
        const T k = s * s * s * dot / T(C);
        for (int64_t c = 0; c < cv; c += W) {
          const V xv = load<V>(xr + c), dv = load<V>(dyr + c);
          store(dxr + c, s * dv * load<V>(w + c) - k * xv);
          store(pw + c, load<V>(pw + c) + dv * xv * s);
        }
        for (int64_t c = cv; c < C; ++c) {
          dxr[c] = s * dyr[c] * w[c] - k * xr[c];
          pw[c] += dyr[c] * xr[c] * s;
        }
      }
    }
  });
  for (int64_t c = 0; c < C; ++c) {
    T total = 0;
    for (int64_t b = 0; b < nblocks; ++b) total += partial[b * C + c];
    dw[c] = total;
  }
}

void check_rows(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.device().is_cpu(), "cxpmrg_scan.", op, ": CPU tensors only");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, "cxpmrg_scan.", op,
              ": float32 or float64, not ", x.scalar_type());
  TORCH_CHECK(x.dim() >= 1 && x.is_contiguous(), "cxpmrg_scan.", op, ": a contiguous tensor of rows");
}

// (y, rstd): y of x's shape, rstd of x's shape without its last dim
std::vector<at::Tensor> rmsnorm_fwd(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_rows(x, "rmsnorm");
  const int64_t C = x.size(-1);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == C && weight.is_contiguous() &&
                  weight.scalar_type() == x.scalar_type(),
              "cxpmrg_scan.rmsnorm: weight contiguous (C,) of x's dtype");
  at::Tensor y = at::empty_like(x);
  at::Tensor rstd = at::empty(x.sizes().slice(0, x.dim() - 1), x.options());
  if (x.numel() == 0) return {y, rstd};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cxpmrg_rmsnorm_fwd", [&] {
    rmsnorm_forward_impl<scalar_t>(x.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(),
                                   rstd.data_ptr<scalar_t>(), x.numel() / C, C, eps);
  });
  return {y, rstd};
}

// (dx, dweight)
std::vector<at::Tensor> rmsnorm_bwd(const at::Tensor& dy_, const at::Tensor& x, const at::Tensor& weight,
                                    const at::Tensor& rstd) {
  check_rows(x, "rmsnorm");
  const at::Tensor dy = dy_.to(x.scalar_type()).contiguous();
  const int64_t C = x.size(-1);
  TORCH_CHECK(dy.sizes() == x.sizes() && weight.numel() == C && weight.is_contiguous() &&
                  rstd.is_contiguous() && rstd.numel() * C == x.numel(),
              "cxpmrg_scan.rmsnorm: dy of x's shape, weight (C,), rstd (rows,)");
  at::Tensor dx = at::empty_like(x);
  at::Tensor dw = at::zeros({C}, x.options());
  if (x.numel() == 0) return {dx, dw};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cxpmrg_rmsnorm_bwd", [&] {
    rmsnorm_backward_impl<scalar_t>(dy.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(),
                                    rstd.data_ptr<scalar_t>(), dx.data_ptr<scalar_t>(), dw.data_ptr<scalar_t>(),
                                    x.numel() / C, C);
  });
  return {dx, dw};
}

// ---------------------------------------------------------------- SwiGLU gate
// With a bias (2H,) (the MLP's first linear layer without its own bias add: one pass over its output
// fewer), the gate and value are h + bias; the caller sums dh over the rows for the bias' gradient.
template <typename T>
struct GateRow {  // one row's gate and value halves, with the bias added where there is one
  const T *g, *v, *bg, *bv;
  GateRow(const T* h, const T* bias, int64_t r, int64_t H)
      : g(h + r * 2 * H), v(h + r * 2 * H + H), bg(bias), bv(bias ? bias + H : nullptr) {}
  template <typename V> V gate(int64_t j) const { return bg ? load<V>(g + j) + load<V>(bg + j) : load<V>(g + j); }
  template <typename V> V value(int64_t j) const { return bv ? load<V>(v + j) + load<V>(bv + j) : load<V>(v + j); }
  T gate1(int64_t j) const { return bg ? g[j] + bg[j] : g[j]; }
  T value1(int64_t j) const { return bv ? v[j] + bv[j] : v[j]; }
};

template <typename T>
void swiglu_forward_impl(const T* h, const T* bias, T* out, int64_t rows, int64_t H) {
  using V = typename Lanes<T>::V;
  constexpr int W = Lanes<T>::W;
  const int64_t hv = H / W * W;
  at::parallel_for(0, rows, std::max<int64_t>(1, 8192 / std::max<int64_t>(H, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const GateRow<T> row(h, bias, r, H);
      T* o = out + r * H;
      for (int64_t j = 0; j < hv; j += W) {
        const V gv = row.template gate<V>(j);
        store(o + j, gv * sigmoid_v(gv) * row.template value<V>(j));
      }
      for (int64_t j = hv; j < H; ++j) {
        const T gj = row.gate1(j);
        o[j] = gj / (T(1) + std::exp(-gj)) * row.value1(j);
      }
    }
  });
}

// d gate = dout * value * sig * (1 + gate * (1 - sig)); d value = dout * silu(gate)
template <typename T>
void swiglu_backward_impl(const T* dout, const T* h, const T* bias, T* dh, int64_t rows, int64_t H) {
  using V = typename Lanes<T>::V;
  constexpr int W = Lanes<T>::W;
  const int64_t hv = H / W * W;
  at::parallel_for(0, rows, std::max<int64_t>(1, 4096 / std::max<int64_t>(H, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const GateRow<T> row(h, bias, r, H);
      const T* d = dout + r * H;
      T* dg = dh + r * 2 * H;
      T* dv = dg + H;
      for (int64_t j = 0; j < hv; j += W) {
        const V gv = row.template gate<V>(j), sg = sigmoid_v(gv), dd = load<V>(d + j);
        store(dg + j, dd * row.template value<V>(j) * sg * (1 + gv * (1 - sg)));
        store(dv + j, dd * gv * sg);
      }
      for (int64_t j = hv; j < H; ++j) {
        const T gj = row.gate1(j), sg = T(1) / (T(1) + std::exp(-gj));
        dg[j] = d[j] * row.value1(j) * sg * (T(1) + gj * (T(1) - sg));
        dv[j] = d[j] * gj * sg;
      }
    }
  });
}

// the bias (2H,) of h (rows, 2H), or none
const at::Tensor* gate_bias(const at::Tensor& h, const std::optional<at::Tensor>& bias) {
  if (!bias.has_value()) return nullptr;
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == h.size(-1) && bias->is_contiguous() &&
                  bias->scalar_type() == h.scalar_type() && bias->device().is_cpu(),
              "cxpmrg_scan.swiglu: bias must be a contiguous CPU (2H,) tensor of h's dtype");
  return &*bias;
}

at::Tensor swiglu_fwd(const at::Tensor& h, const std::optional<at::Tensor>& bias_) {
  check_rows(h, "swiglu");
  TORCH_CHECK(h.size(-1) % 2 == 0, "cxpmrg_scan.swiglu: the last dim holds gate and value, an even size");
  const at::Tensor* bias = gate_bias(h, bias_);
  const int64_t H = h.size(-1) / 2;
  std::vector<int64_t> shape(h.sizes().begin(), h.sizes().end());
  shape.back() = H;
  at::Tensor out = at::empty(shape, h.options());
  if (h.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "cxpmrg_swiglu_fwd", [&] {
    swiglu_forward_impl<scalar_t>(h.data_ptr<scalar_t>(), bias ? bias->data_ptr<scalar_t>() : nullptr,
                                  out.data_ptr<scalar_t>(), h.numel() / (2 * H), H);
  });
  return out;
}

at::Tensor swiglu_bwd(const at::Tensor& dout_, const at::Tensor& h, const std::optional<at::Tensor>& bias_) {
  check_rows(h, "swiglu");
  const at::Tensor* bias = gate_bias(h, bias_);
  const at::Tensor dout = dout_.to(h.scalar_type()).contiguous();
  const int64_t H = h.size(-1) / 2;
  TORCH_CHECK(dout.numel() * 2 == h.numel() && dout.size(-1) == H, "cxpmrg_scan.swiglu: dout (rows, H)");
  at::Tensor dh = at::empty_like(h);
  if (h.numel() == 0) return dh;
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "cxpmrg_swiglu_bwd", [&] {
    swiglu_backward_impl<scalar_t>(dout.data_ptr<scalar_t>(), h.data_ptr<scalar_t>(),
                                   bias ? bias->data_ptr<scalar_t>() : nullptr, dh.data_ptr<scalar_t>(),
                                   h.numel() / (2 * H), H);
  });
  return dh;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(cxpmrg_scan, m) {
  m.def("rmsnorm_fwd", &rmsnorm_fwd);
  m.def("rmsnorm_bwd", &rmsnorm_bwd);
  m.def("swiglu_fwd", &swiglu_fwd);
  m.def("swiglu_bwd", &swiglu_bwd);
}
