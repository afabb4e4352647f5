// Mamba-1 selective scan on the CPU: forward and backward (see cxpmrg_lib/models/ssm.py).
//
// Work is split into blocks of W channels of one sequence (at::parallel_for over
// batch x channel blocks, so torch.set_num_threads is respected). Inside a block the W
// channels are the vector lanes: every state n is an independent recurrence over W lanes,
// so the loops over lanes vectorise and the N states give the CPU independent chains.
// The forward keeps only the state entering every CHUNK steps; the backward recomputes a
// chunk's states from its checkpoint into a block-local buffer (in cache) and runs the
// adjoint recurrence back through it. `order` (batch, L) lets sequence b be scanned in the
// order order[b, 0], order[b, 1], ... of its stored positions (reversed or column-major
// directions) without copying the inputs into that order.
//
// Only ATen and torch/library.h are included (no pybind, no torch/extension.h): the ops
// are registered as torch.ops.cxpmrg_scan.* and the build stays short.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t CHUNK = 16;  // steps between forward checkpoints (a chunk's buffers stay in L1)

// Lanes of one block are one GCC vector (16 floats or 8 doubles: an AVX-512 register, or two
// AVX2 ones where the CPU lacks AVX-512); the vector extension makes the vectorisation explicit
// instead of hoping the auto-vectoriser takes the exp's branches and bit casts.
typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));
typedef double vd __attribute__((vector_size(64)));

template <typename T> struct Lanes;
template <> struct Lanes<float> { static constexpr int W = 16; using V = vf; };
template <> struct Lanes<double> { static constexpr int W = 8; using V = vd; };

// ---------------------------------------------------------------- lane-wise math
// float: a Cody-Waite range reduction and a degree-6 polynomial for exp (about 1 ulp on the
// reduced range; libm's expf is scalar without -ffast-math, which this build does not use).
// double: libm, exactly (the double kernel is for gradcheck and float64 users).
inline vf exp_v(vf v) {
  const vf lo = vf{} - 87.0f, hi = vf{} + 88.0f;
  v = v < lo ? lo : v;
  v = v > hi ? hi : v;
  const vi k = __builtin_convertvector(v * 1.44269504088896341f + 128.5f, vi) - 128;  // round(v / ln 2)
  const vf kf = __builtin_convertvector(k, vf);
  vf r = v - kf * 0.693359375f;
  r = r - kf * (-2.12194440e-4f);
  vf p = vf{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const vf e = p * r * r + r + 1.0f;
  const vi bits = (k + 127) << 23;
  return e * reinterpret_cast<const vf&>(bits);
}

inline vd exp_v(vd v) {
  for (int w = 0; w < 8; ++w) v[w] = std::exp(v[w]);
  return v;
}

// softplus(x) = max(x, 0) + log1p(exp(-|x|)); log1p(e) for e in (0, 1] as 2 atanh(e / (2 + e)),
// an odd series in s <= 1/3 (eight terms: error below 1e-9). Beyond 20 it is x (torch's threshold).
inline vf softplus_v(vf x) {
  const vf zero = vf{};
  const vf e = exp_v(x < zero ? x : -x);
  const vf s = e / (2.0f + e);
  const vf s2 = s * s;
  vf q = zero + 1.0f / 15.0f;
  q = q * s2 + 1.0f / 13.0f;
  q = q * s2 + 1.0f / 11.0f;
  q = q * s2 + 1.0f / 9.0f;
  q = q * s2 + 1.0f / 7.0f;
  q = q * s2 + 1.0f / 5.0f;
  q = q * s2 + 1.0f / 3.0f;
  q = q * s2 + 1.0f;
  const vf sp = (x > zero ? x : zero) + 2.0f * s * q;
  return x > 20.0f ? x : sp;
}

inline vd softplus_v(vd x) {
  for (int w = 0; w < 8; ++w) x[w] = x[w] > 20.0 ? x[w] : std::log1p(std::exp(x[w]));
  return x;
}

template <typename V>
inline V sigmoid_v(V x) {
  const V one = V{} + 1;
  return one / (one + exp_v(-x));
}

// Sums of the lanes of W vectors at once (the backward's contractions over channels): a
// tree of shuffles that halves the vectors at each level; lane L of the result holds the sum of
// vector bitrev(L). 2W - 2 shuffles and W - 1 additions instead of W (W - 1) scalar additions.
typedef int64_t vl __attribute__((vector_size(64)));

inline vf fold(vf x, vf y, vi lo, vi h) { return __builtin_shuffle(x, y, lo) + __builtin_shuffle(x, y, lo + h); }
inline vd fold(vd x, vd y, vl lo, vl h) { return __builtin_shuffle(x, y, lo) + __builtin_shuffle(x, y, lo + h); }

inline vf reduce_lanes(vf* p) {
  const vi l8 = {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23};
  const vi l4 = {0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27};
  const vi l2 = {0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29};
  const vi l1 = {0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30};
  for (int k = 0; k < 8; ++k) p[k] = fold(p[2 * k], p[2 * k + 1], l8, vi{} + 8);
  for (int k = 0; k < 4; ++k) p[k] = fold(p[2 * k], p[2 * k + 1], l4, vi{} + 4);
  for (int k = 0; k < 2; ++k) p[k] = fold(p[2 * k], p[2 * k + 1], l2, vi{} + 2);
  return fold(p[0], p[1], l1, vi{} + 1);
}

inline vd reduce_lanes(vd* p) {
  const vl l4 = {0, 1, 2, 3, 8, 9, 10, 11};
  const vl l2 = {0, 1, 8, 9, 4, 5, 12, 13};
  const vl l1 = {0, 8, 2, 10, 4, 12, 6, 14};
  for (int k = 0; k < 4; ++k) p[k] = fold(p[2 * k], p[2 * k + 1], l4, vl{} + 4);
  for (int k = 0; k < 2; ++k) p[k] = fold(p[2 * k], p[2 * k + 1], l2, vl{} + 2);
  return fold(p[0], p[1], l1, vl{} + 1);
}

constexpr int bitrev(int lane, int W) {
  int r = 0;
  for (int b = 1; b < W; b <<= 1) r = (r << 1) | ((lane & b) ? 1 : 0);
  return r;
}

// ---------------------------------------------------------------- argument views
template <typename T>
struct Seq3 {  // a (batch, channels, length) or (batch, state, length) tensor read through strides
  const T* p = nullptr;
  int64_t sb = 0, sc = 0, sl = 0;
  Seq3() = default;
  explicit Seq3(const at::Tensor& t)
      : p(t.data_ptr<T>()), sb(t.stride(0)), sc(t.stride(1)), sl(t.stride(2)) {}
  T at(int64_t b, int64_t c, int64_t l) const { return p[b * sb + c * sc + l * sl]; }
};

template <typename T>
struct Args {
  int64_t batch, dim, len, nstate, nblk;
  Seq3<T> u, delta, B, C, z;
  const T* A;  // (Ab, dim, nstate) contiguous
  const T* D;  // (Db, dim) or null
  const T* bias;
  bool A_seq, D_seq, bias_seq, softplus;
  const int64_t* order;  // (batch, len) contiguous or null
};

template <typename T>
Args<T> make_args(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
                  const at::Tensor& C, const at::Tensor& D, const at::Tensor& z, const at::Tensor& bias,
                  const at::Tensor& order, bool softplus) {
  Args<T> a;
  a.batch = u.size(0);
  a.dim = u.size(1);
  a.len = u.size(2);
  a.nstate = A.size(-1);
  a.nblk = (a.dim + Lanes<T>::W - 1) / Lanes<T>::W;
  a.u = Seq3<T>(u);
  a.delta = Seq3<T>(delta);
  a.B = Seq3<T>(B);
  a.C = Seq3<T>(C);
  if (z.defined()) a.z = Seq3<T>(z);
  a.A = A.data_ptr<T>();
  a.A_seq = A.dim() == 3;
  a.D = D.defined() ? D.data_ptr<T>() : nullptr;
  a.D_seq = D.defined() && D.dim() == 2;
  a.bias = bias.defined() ? bias.data_ptr<T>() : nullptr;
  a.bias_seq = bias.defined() && bias.dim() == 2;
  a.softplus = softplus;
  a.order = order.defined() ? order.data_ptr<int64_t>() : nullptr;
  return a;
}

// Per-block constants: the lanes' channel indices (padding lanes repeat the last channel;
// their outputs are not written and their output gradients are zero), A as [n] lanes, D, bias.
template <typename T>
struct Block {
  static constexpr int W = Lanes<T>::W;
  using V = typename Lanes<T>::V;
  int64_t b, d0;
  int nw;
  int64_t chan[W];
  std::vector<V> A;  // nstate vectors
  V D, bias;

  Block(const Args<T>& a, int64_t blk_index) : A(a.nstate) {
    b = blk_index / a.nblk;
    d0 = (blk_index % a.nblk) * W;
    nw = static_cast<int>(std::min<int64_t>(W, a.dim - d0));
    for (int w = 0; w < W; ++w) chan[w] = d0 + std::min(w, nw - 1);
    const T* Ab = a.A + (a.A_seq ? b * a.dim * a.nstate : 0);
    for (int64_t n = 0; n < a.nstate; ++n)
      for (int w = 0; w < W; ++w) A[n][w] = Ab[chan[w] * a.nstate + n];
    for (int w = 0; w < W; ++w) {
      D[w] = a.D ? a.D[(a.D_seq ? b * a.dim : 0) + chan[w]] : T(0);
      bias[w] = a.bias ? a.bias[(a.bias_seq ? b * a.dim : 0) + chan[w]] : T(0);
    }
  }

  int64_t pos(const Args<T>& a, int64_t t) const { return a.order ? a.order[b * a.len + t] : t; }

  V gather(const Seq3<T>& s, int64_t p) const {  // one value per lane at stored position p
    V v;
    const T* base = s.p + b * s.sb + p * s.sl;
    for (int w = 0; w < W; ++w) v[w] = base[chan[w] * s.sc];
    return v;
  }

  // dt (after bias and softplus) and the pre-softplus value x at stored position p
  void load_dt(const Args<T>& a, int64_t p, V& dt, V& x) const {
    x = gather(a.delta, p) + bias;
    dt = a.softplus ? softplus_v(x) : x;
  }
};

// One step of the recurrence for all states: h = exp(dt A) h + dt u B, returns y = C . h.
// e receives exp(dt A) when given (the backward keeps it).
template <typename T, typename V>
inline V step_states(const Args<T>& a, const Block<T>& blk, int64_t p, V dt, V du, V* __restrict h,
                     V* __restrict e_out) {
  V y = V{};
  const T* Bp = a.B.p + blk.b * a.B.sb + p * a.B.sl;
  const T* Cp = a.C.p + blk.b * a.C.sb + p * a.C.sl;
  for (int64_t n = 0; n < a.nstate; ++n) {
    const T Bn = Bp[n * a.B.sc], Cn = Cp[n * a.C.sc];
    const V e = exp_v(dt * blk.A[n]);
    h[n] = e * h[n] + du * Bn;
    y += h[n] * Cn;
    if (e_out) e_out[n] = e;
  }
  return y;
}

template <typename T>
void forward_impl(const Args<T>& a, T* out, T* last, T* ckpt, int64_t nchunks) {
  using V = typename Lanes<T>::V;
  const int64_t N = a.nstate;
  at::parallel_for(0, a.batch * a.nblk, 1, [&](int64_t begin, int64_t end) {
    std::vector<V> h(N);
    for (int64_t bi = begin; bi < end; ++bi) {
      Block<T> blk(a, bi);
      std::fill(h.begin(), h.end(), V{});
      V* ck = ckpt ? reinterpret_cast<V*>(ckpt) + bi * nchunks * N : nullptr;
      T* o = out + (blk.b * a.dim + blk.d0) * a.len;
      for (int64_t t = 0; t < a.len; ++t) {
        if (ck && t % CHUNK == 0) std::copy(h.begin(), h.end(), ck + (t / CHUNK) * N);
        const int64_t p = blk.pos(a, t);
        V dt, x;
        blk.load_dt(a, p, dt, x);
        const V uu = blk.gather(a.u, p);
        V y = step_states(a, blk, p, dt, dt * uu, h.data(), static_cast<V*>(nullptr));
        y += blk.D * uu;
        if (a.z.p) {
          const V zz = blk.gather(a.z, p);
          y *= zz * sigmoid_v(zz);
        }
        for (int w = 0; w < blk.nw; ++w) o[w * a.len + p] = y[w];
      }
      if (last) {
        T* l = last + (blk.b * a.dim + blk.d0) * N;
        for (int w = 0; w < blk.nw; ++w)
          for (int64_t n = 0; n < N; ++n) l[w * N + n] = h[n][w];
      }
    }
  });
}

template <typename T>
struct Grads {
  T *du, *ddelta, *dz;  // (batch, dim, len) contiguous
  T *dA, *dD, *dbias;   // (batch, dim, nstate), (batch, dim), (batch, dim): per sequence
  T *dB, *dC;           // (batch, nblk, len, nstate): partial sums of each channel block
};

template <typename T>
void backward_impl(const Args<T>& a, const at::Tensor& dout_t, const T* dlast, const T* ckpt, int64_t nchunks,
                   const Grads<T>& g) {
  using V = typename Lanes<T>::V;
  constexpr int W = Lanes<T>::W;
  const int64_t N = a.nstate;
  const Seq3<T> dout(dout_t);
  at::parallel_for(0, a.batch * a.nblk, 1, [&](int64_t begin, int64_t end) {
    // block-local buffers of one chunk: states after each step, exp(dt A), dt, x, u, y (pre-gate)
    std::vector<V> hbuf(CHUNK * N), ebuf(CHUNK * N), h0(N), adj(N), dA_acc(N);
    std::vector<V> dtb(CHUNK), xb(CHUNK), ub(CHUNK), yb(CHUNK);
    std::vector<int64_t> pb(CHUNK);
    for (int64_t bi = begin; bi < end; ++bi) {
      Block<T> blk(a, bi);
      const int64_t row = (blk.b * a.dim + blk.d0) * a.len;  // offset of the block's first channel
      std::fill(adj.begin(), adj.end(), V{});
      std::fill(dA_acc.begin(), dA_acc.end(), V{});
      if (dlast) {
        const T* l = dlast + (blk.b * a.dim + blk.d0) * N;
        for (int w = 0; w < blk.nw; ++w)
          for (int64_t n = 0; n < N; ++n) adj[n][w] = l[w * N + n];
      }
      V dD_acc = V{}, dbias_acc = V{};
      V valid;
      for (int w = 0; w < Lanes<T>::W; ++w) valid[w] = w < blk.nw ? T(1) : T(0);
      T* dBp = g.dB + bi * a.len * N;
      T* dCp = g.dC + bi * a.len * N;
      for (int64_t c = nchunks - 1; c >= 0; --c) {
        const int64_t t0 = c * CHUNK, m = std::min(CHUNK, a.len - t0);
        // recompute the chunk's states from its checkpoint
        const V* ck = reinterpret_cast<const V*>(ckpt) + (bi * nchunks + c) * N;
        std::copy(ck, ck + N, h0.begin());
        for (int64_t j = 0; j < m; ++j) {
          const int64_t p = blk.pos(a, t0 + j);
          pb[j] = p;
          blk.load_dt(a, p, dtb[j], xb[j]);
          ub[j] = blk.gather(a.u, p);
          V* h = hbuf.data() + j * N;
          const V* hp = j ? h - N : h0.data();
          std::copy(hp, hp + N, h);
          yb[j] = step_states(a, blk, p, dtb[j], dtb[j] * ub[j], h, ebuf.data() + j * N) + blk.D * ub[j];
        }
        // the adjoint recurrence, back through the chunk
        for (int64_t j = m - 1; j >= 0; --j) {
          const int64_t p = pb[j];
          const V dt = dtb[j], uu = ub[j], du = dt * uu;
          const V* __restrict h = hbuf.data() + j * N;
          const V* __restrict hp = j ? h - N : h0.data();
          const V* __restrict e = ebuf.data() + j * N;
          V dy = blk.gather(dout, p) * valid;
          if (a.z.p) {
            const V zz = blk.gather(a.z, p), sg = sigmoid_v(zz);
            const V dz = dy * yb[j] * sg * (1 + zz * (1 - sg));
            for (int w = 0; w < blk.nw; ++w) g.dz[row + w * a.len + p] = dz[w];
            dy *= zz * sg;
          }
          dD_acc += dy * uu;
          V ddu = V{}, ddt = V{};
          const T* Bp = a.B.p + blk.b * a.B.sb + p * a.B.sl;
          const T* Cp = a.C.p + blk.b * a.C.sb + p * a.C.sl;
          for (int64_t n0 = 0; n0 < N; n0 += W) {
            const int cnt = static_cast<int>(std::min<int64_t>(W, N - n0));
            V PB[W], PC[W];
            for (int k = 0; k < cnt; ++k) {
              const int64_t n = n0 + k;
              const T Bn = Bp[n * a.B.sc], Cn = Cp[n * a.C.sc];
              const V gn = adj[n] + Cn * dy;
              PC[k] = h[n] * dy;
              PB[k] = gn * du;
              ddu += gn * Bn;
              const V xg = gn * e[n] * hp[n];
              ddt += xg * blk.A[n];
              dA_acc[n] += xg * dt;
              adj[n] = gn * e[n];
            }
            for (int k = cnt; k < W; ++k) PB[k] = PC[k] = V{};
            const V sB = reduce_lanes(PB), sC = reduce_lanes(PC);
            for (int lane = 0; lane < W; ++lane) {
              const int k = bitrev(lane, W);
              if (k < cnt) {
                dBp[p * N + n0 + k] = sB[lane];
                dCp[p * N + n0 + k] = sC[lane];
              }
            }
          }
          V dx = ddt + ddu * uu;
          if (a.softplus) dx *= sigmoid_v(xb[j]);
          dbias_acc += dx;
          const V dus = ddu * dt + dy * blk.D;
          for (int w = 0; w < blk.nw; ++w) {
            g.du[row + w * a.len + p] = dus[w];
            g.ddelta[row + w * a.len + p] = dx[w];
          }
        }
      }
      for (int w = 0; w < blk.nw; ++w) {
        const int64_t bd = blk.b * a.dim + blk.d0 + w;
        for (int64_t n = 0; n < N; ++n) g.dA[bd * N + n] = dA_acc[n][w];
        g.dD[bd] = dD_acc[w];
        g.dbias[bd] = dbias_acc[w];
      }
    }
  });
}

void check_inputs(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
                  const at::Tensor& C, const at::Tensor& D, const at::Tensor& z, const at::Tensor& bias,
                  const at::Tensor& order) {
  for (const at::Tensor* t : {&u, &delta, &A, &B, &C, &D, &z, &bias}) {
    if (!t->defined()) continue;
    TORCH_CHECK(t->device().is_cpu(), "cxpmrg_scan: CPU tensors only");
    TORCH_CHECK(t->scalar_type() == u.scalar_type(), "cxpmrg_scan: all inputs must have u's dtype");
  }
  TORCH_CHECK(u.dim() == 3 && delta.sizes() == u.sizes(), "cxpmrg_scan: u, delta (batch, dim, len)");
  TORCH_CHECK(A.is_contiguous() && (!D.defined() || D.is_contiguous()) && (!bias.defined() || bias.is_contiguous()),
              "cxpmrg_scan: A, D, delta_bias must be contiguous");
  if (order.defined())
    TORCH_CHECK(order.scalar_type() == at::kLong && order.is_contiguous() && order.dim() == 2 &&
                    order.size(0) == u.size(0) && order.size(1) == u.size(2),
                "cxpmrg_scan: order must be a contiguous int64 (batch, len) tensor");
}

at::Tensor opt(const std::optional<at::Tensor>& t) { return t.has_value() ? *t : at::Tensor(); }

// Returns (out, last_state or empty, checkpoints or empty).
std::tuple<at::Tensor, at::Tensor, at::Tensor> scan_fwd(
    const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
    const std::optional<at::Tensor>& D_, const std::optional<at::Tensor>& z_,
    const std::optional<at::Tensor>& bias_, const std::optional<at::Tensor>& order_, bool softplus, bool keep,
    bool want_last) {
  const at::Tensor D = opt(D_), z = opt(z_), bias = opt(bias_), order = opt(order_);
  check_inputs(u, delta, A, B, C, D, z, bias, order);
  at::Tensor out = at::empty(u.sizes(), u.options());
  at::Tensor last = want_last ? at::empty({u.size(0), u.size(1), A.size(-1)}, u.options()) : at::empty({0}, u.options());
  const int64_t nchunks = (u.size(2) + CHUNK - 1) / CHUNK;
  at::Tensor ckpt = at::empty({0}, u.options());
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "cxpmrg_scan_fwd", [&] {
    const Args<scalar_t> a = make_args<scalar_t>(u, delta, A, B, C, D, z, bias, order, softplus);
    if (keep) ckpt = at::empty({a.batch * a.nblk, nchunks, a.nstate, Lanes<scalar_t>::W}, u.options());
    if (u.numel() == 0) return;
    forward_impl<scalar_t>(a, out.data_ptr<scalar_t>(), want_last ? last.data_ptr<scalar_t>() : nullptr,
                           keep ? ckpt.data_ptr<scalar_t>() : nullptr, nchunks);
  });
  return {out, last, ckpt};
}

// Returns du, ddelta, dA, dB, dC, dD, dz, dbias, with dA, dD, dbias summed over the batch
// when the parameter is shared, and empty tensors for absent D, z, bias.
std::vector<at::Tensor> scan_bwd(const at::Tensor& dout, const std::optional<at::Tensor>& dlast_,
                                 const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                                 const at::Tensor& B, const at::Tensor& C, const std::optional<at::Tensor>& D_,
                                 const std::optional<at::Tensor>& z_, const std::optional<at::Tensor>& bias_,
                                 const std::optional<at::Tensor>& order_, const at::Tensor& ckpt, bool softplus) {
  const at::Tensor D = opt(D_), z = opt(z_), bias = opt(bias_), order = opt(order_);
  check_inputs(u, delta, A, B, C, D, z, bias, order);
  TORCH_CHECK(dout.sizes() == u.sizes() && dout.scalar_type() == u.scalar_type(), "cxpmrg_scan: dout like u");
  at::Tensor dlast;
  if (dlast_.has_value() && dlast_->defined()) dlast = dlast_->to(u.scalar_type()).contiguous();
  const int64_t batch = u.size(0), dim = u.size(1), len = u.size(2), N = A.size(-1);
  const int64_t nchunks = (len + CHUNK - 1) / CHUNK;
  at::Tensor du = at::empty(u.sizes(), u.options()), ddelta = at::empty(u.sizes(), u.options());
  at::Tensor dz = z.defined() ? at::empty(u.sizes(), u.options()) : at::empty({0}, u.options());
  at::Tensor dA = at::empty({batch, dim, N}, u.options());
  at::Tensor dD = at::empty({batch, dim}, u.options()), dbias = at::empty({batch, dim}, u.options());
  at::Tensor dBp, dCp;
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "cxpmrg_scan_bwd", [&] {
    const Args<scalar_t> a = make_args<scalar_t>(u, delta, A, B, C, D, z, bias, order, softplus);
    TORCH_CHECK(ckpt.numel() == a.batch * a.nblk * nchunks * N * Lanes<scalar_t>::W,
                "cxpmrg_scan: checkpoints do not match the inputs");
    dBp = at::empty({batch, a.nblk, len, N}, u.options());
    dCp = at::empty({batch, a.nblk, len, N}, u.options());
    if (u.numel() == 0) {
      dA.zero_(), dD.zero_(), dbias.zero_(), dBp.zero_(), dCp.zero_();
      return;
    }
    Grads<scalar_t> g{du.data_ptr<scalar_t>(), ddelta.data_ptr<scalar_t>(),
                      z.defined() ? dz.data_ptr<scalar_t>() : nullptr, dA.data_ptr<scalar_t>(),
                      dD.data_ptr<scalar_t>(), dbias.data_ptr<scalar_t>(), dBp.data_ptr<scalar_t>(),
                      dCp.data_ptr<scalar_t>()};
    backward_impl<scalar_t>(a, dout, dlast.defined() ? dlast.data_ptr<scalar_t>() : nullptr,
                            ckpt.data_ptr<scalar_t>(), nchunks, g);
  });
  at::Tensor dB = dBp.sum(1).transpose(1, 2), dC = dCp.sum(1).transpose(1, 2);
  if (A.dim() == 2) dA = dA.sum(0);
  if (!D.defined())
    dD = at::empty({0}, u.options());
  else if (D.dim() == 1)
    dD = dD.sum(0);
  if (!bias.defined())
    dbias = at::empty({0}, u.options());
  else if (bias.dim() == 1)
    dbias = dbias.sum(0);
  return {du, ddelta, dA, dB, dC, dD, dz, dbias};
}

}  // namespace

TORCH_LIBRARY(cxpmrg_scan, m) {
  m.def("scan_fwd", &scan_fwd);
  m.def("scan_bwd", &scan_bwd);
}
