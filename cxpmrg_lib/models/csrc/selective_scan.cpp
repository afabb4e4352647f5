// Mamba-1 selective scan on the CPU: forward and backward (see cxpmrg_lib/models/ssm.py).
//
// Work is split into blocks of W channels of one sequence (at::parallel_for over
// batch x channel blocks, so torch.set_num_threads is respected). Inside a block the W
// channels are the vector lanes: every state n is an independent recurrence over W lanes,
// so the loops over lanes vectorise and the N states give the CPU independent chains.
// A block first transposes its channels' inputs into time-major lane vectors (block-local
// buffers: one contiguous vector per step, no strided gathers in the recurrence), and B and C
// are read as (batch, length, state) rows through their strides. The state count is a template parameter for the
// common sizes (the states then live in registers; other sizes take the same code with a
// run-time count). The forward keeps only the state entering every CHUNK steps; the backward
// recomputes a chunk's states from its checkpoint into a block-local buffer (in cache) and runs
// the adjoint recurrence back through it. `order` (batch, L) lets sequence b be scanned in the
// order order[b, 0], order[b, 1], ... of its stored positions (reversed or column-major
// directions) without copying the inputs into that order.
//
// Only ATen and torch/library.h are included (no pybind, no torch/extension.h): the ops
// are registered as torch.ops.cxpmrg_scan.* and the build stays short.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "lanes.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t CHUNK = 32;       // steps between forward checkpoints (a chunk's buffers stay in L2)
constexpr int64_t MAX_STATE = 256;  // the largest state count (mamba-ssm's own limit)

using namespace cxpmrg;  // the lane types and lane-wise math (lanes.h)

// Sums of the lanes of W vectors at once (the backward's contractions over channels): a
// tree of shuffles that halves the vectors at each level (which leaves the sum of vector bitrev(L)
// in lane L; one last shuffle puts lane L's own sum there). 2W - 1 shuffles and W - 1 additions
// instead of W (W - 1) scalar additions.
inline vf fold(vf x, vf y, vi lo, vi h) { return __builtin_shuffle(x, y, lo) + __builtin_shuffle(x, y, lo + h); }
inline vd fold(vd x, vd y, vl lo, vl h) { return __builtin_shuffle(x, y, lo) + __builtin_shuffle(x, y, lo + h); }

#if CXPMRG_VBYTES == 64
inline vf reduce_lanes(vf* p) {
  const vi l8 = {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23};
  const vi l4 = {0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27};
  const vi l2 = {0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29};
  const vi l1 = {0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30};
  for (int k = 0; k < 8; ++k) p[k] = fold(p[2 * k], p[2 * k + 1], l8, vi{} + 8);
  for (int k = 0; k < 4; ++k) p[k] = fold(p[2 * k], p[2 * k + 1], l4, vi{} + 4);
  for (int k = 0; k < 2; ++k) p[k] = fold(p[2 * k], p[2 * k + 1], l2, vi{} + 2);
  const vi natural = {0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15};  // bitrev: back to order
  return __builtin_shuffle(fold(p[0], p[1], l1, vi{} + 1), natural);
}

inline vd reduce_lanes(vd* p) {
  const vl l4 = {0, 1, 2, 3, 8, 9, 10, 11};
  const vl l2 = {0, 1, 8, 9, 4, 5, 12, 13};
  const vl l1 = {0, 8, 2, 10, 4, 12, 6, 14};
  for (int k = 0; k < 4; ++k) p[k] = fold(p[2 * k], p[2 * k + 1], l4, vl{} + 4);
  for (int k = 0; k < 2; ++k) p[k] = fold(p[2 * k], p[2 * k + 1], l2, vl{} + 2);
  const vl natural = {0, 4, 2, 6, 1, 5, 3, 7};
  return __builtin_shuffle(fold(p[0], p[1], l1, vl{} + 1), natural);
}
#else
inline vf reduce_lanes(vf* p) {
  const vi l4 = {0, 1, 2, 3, 8, 9, 10, 11};
  const vi l2 = {0, 1, 8, 9, 4, 5, 12, 13};
  const vi l1 = {0, 8, 2, 10, 4, 12, 6, 14};
  for (int k = 0; k < 4; ++k) p[k] = fold(p[2 * k], p[2 * k + 1], l4, vi{} + 4);
  for (int k = 0; k < 2; ++k) p[k] = fold(p[2 * k], p[2 * k + 1], l2, vi{} + 2);
  const vi natural = {0, 4, 2, 6, 1, 5, 3, 7};
  return __builtin_shuffle(fold(p[0], p[1], l1, vi{} + 1), natural);
}

inline vd reduce_lanes(vd* p) {
  const vl l2 = {0, 1, 4, 5};
  const vl l1 = {0, 4, 2, 6};
  for (int k = 0; k < 2; ++k) p[k] = fold(p[2 * k], p[2 * k + 1], l2, vl{} + 2);
  const vl natural = {0, 2, 1, 3};
  return __builtin_shuffle(fold(p[0], p[1], l1, vl{} + 1), natural);
}
#endif

// In-register transpose of W vectors of W lanes (r[i][j] becomes r[j][i]): stage s swaps bit s of
// the vector index with bit s of the lane index, two two-source shuffles per pair of vectors.
template <typename V, typename I, int W>
inline void transpose_stage(V* r, int s) {
  I lo, hi;
  for (int L = 0; L < W; ++L) {
    lo[L] = (L & s) ? W + L - s : L;
    hi[L] = (L & s) ? W + L : L + s;
  }
  for (int i = 0; i < W; ++i) {
    if (i & s) continue;
    const V x = r[i], y = r[i + s];
    r[i] = __builtin_shuffle(x, y, lo);
    r[i + s] = __builtin_shuffle(x, y, hi);
  }
}

template <typename V, typename I, int W, int S = W / 2>
inline void transpose_all(V* r) {  // the stages S = W/2, W/4, ..., 1, each with compile-time masks
  transpose_stage<V, I, W>(r, S);
  if constexpr (S > 1) transpose_all<V, I, W, S / 2>(r);
}

inline void transpose(vf* r) { transpose_all<vf, vi, Lanes<float>::W>(r); }
inline void transpose(vd* r) { transpose_all<vd, vl, Lanes<double>::W>(r); }

// ---------------------------------------------------------------- argument views
template <typename T>
struct Seq3 {  // a (batch, channels, length) tensor read through strides
  const T* p = nullptr;
  int64_t sb = 0, sc = 0, sl = 0;
  int64_t period = 0;  // > 0: sequence b reads row b % period (one row shared by the groups of a batch)
  Seq3() = default;
  explicit Seq3(const at::Tensor& t, int64_t period_ = 0)
      : p(t.data_ptr<T>()), sb(t.stride(0)), sc(t.stride(1)), sl(t.stride(2)), period(period_) {}
  const T* row(int64_t b) const { return p + (period > 0 ? b % period : b) * sb; }
};

template <typename T>
struct Dst {  // a (batch, channels, length) output written through strides
  T* p = nullptr;
  int64_t sb = 0, sc = 0, sl = 0;
  Dst() = default;
  explicit Dst(at::Tensor& t) : p(t.data_ptr<T>()), sb(t.stride(0)), sc(t.stride(1)), sl(t.stride(2)) {}
};

template <typename T>
struct Args {
  int64_t batch, dim, len, nstate, nblk;
  Seq3<T> u, delta, z;
  const T* B;  // (batch, len, nstate) with the states contiguous: the rows of one step, read through
  const T* C;  // their batch and step strides (B and C may be slices of the x projection's output)
  int64_t Bsb, Bsl, Csb, Csl;
  const T* A;  // (Ab, dim, nstate) contiguous
  const T* D;  // (Db, dim) or null
  const T* bias;
  bool A_seq, D_seq, bias_seq, softplus;
  const int64_t* order;  // (batch, len) contiguous or null
  int64_t groups = 1;    // > 1: G groups of batch / G sequences share z (and dout), the output is their mean
};

template <typename T>
Args<T> make_args(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& Bt,
                  const at::Tensor& Ct, const at::Tensor& D, const at::Tensor& z, const at::Tensor& bias,
                  const at::Tensor& order, bool softplus, int64_t groups = 1) {
  Args<T> a;
  a.groups = groups;
  a.batch = u.size(0);
  a.dim = u.size(1);
  a.len = u.size(2);
  a.nstate = A.size(-1);
  a.nblk = (a.dim + Lanes<T>::W - 1) / Lanes<T>::W;
  a.u = Seq3<T>(u);
  a.delta = Seq3<T>(delta);
  if (z.defined()) a.z = Seq3<T>(z, groups > 1 ? a.batch / groups : 0);
  a.B = Bt.data_ptr<T>();
  a.C = Ct.data_ptr<T>();
  a.Bsb = Bt.stride(0), a.Bsl = Bt.stride(1), a.Csb = Ct.stride(0), a.Csl = Ct.stride(1);
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

// The geometry of one block: W channels (d0 ...) of sequence b, and moving them between a
// (batch, channels, length) tensor and lane vectors per position. Padding lanes (past the last
// channel) repeat the last channel; they are never written back.
template <typename T>
struct BlockGeom {
  static constexpr int W = Lanes<T>::W;
  using V = typename Lanes<T>::V;
  int64_t b, d0;
  int nw;
  int64_t chan[W];

  BlockGeom(int64_t nblk, int64_t dim, int64_t blk_index) {
    b = blk_index / nblk;
    d0 = (blk_index % nblk) * W;
    nw = static_cast<int>(std::min<int64_t>(W, dim - d0));
    for (int w = 0; w < W; ++w) chan[w] = d0 + std::min(w, nw - 1);
  }

  // the block's channels of a (batch, channels, length) tensor as one lane vector per position:
  // W positions at a time by a register transpose when the rows are contiguous, else lane by lane
  void load(const Seq3<T>& s, int64_t len, V* out) const {
    const T* rows[W];
    for (int w = 0; w < W; ++w) {
      rows[w] = s.row(b) + chan[w] * s.sc;
      for (int64_t l = 0; l < std::min<int64_t>(len, 4 * W); l += W) __builtin_prefetch(rows[w] + l * s.sl);
    }
    int64_t l0 = 0;
    if (s.sc == 1 && nw == W) {  // channels contiguous (a (batch, length, channels) buffer): one load a step
      for (; l0 < len; ++l0) std::memcpy(&out[l0], rows[0] + l0 * s.sl, sizeof(V));
    } else if (s.sl == 1) {
      for (; l0 + W <= len; l0 += W) {
        V r[W];
        for (int w = 0; w < W; ++w) {
          __builtin_prefetch(rows[w] + l0 + 4 * W);  // short rows: the hardware prefetcher barely starts
          std::memcpy(&r[w], rows[w] + l0, sizeof(V));
        }
        transpose(r);
        for (int w = 0; w < W; ++w) out[l0 + w] = r[w];
      }
    }
    for (int w = 0; w < W; ++w)
      for (int64_t l = l0; l < len; ++l) out[l][w] = rows[w][l * s.sl];
  }

  // lane vectors per position back into the block's channels of a (batch, channels, length) tensor
  // (of its row `row`, the block's own sequence by default; `add`: added to what is there): one store
  // a step when its channels are contiguous, W positions at a time by a register transpose when its
  // rows are, else lane by lane
  void store(const V* in, const Dst<T>& d, int64_t len, bool add = false, int64_t row = -1) const {
    T* rows[W];
    const int64_t bb = row < 0 ? b : row;
    for (int w = 0; w < W; ++w) rows[w] = d.p + bb * d.sb + (d0 + std::min(w, nw - 1)) * d.sc;
    int64_t l0 = 0;
    if (d.sc == 1 && nw == W) {
      for (; l0 < len; ++l0) {
        V v = in[l0];
        if (add) {
          V o;
          std::memcpy(&o, rows[0] + l0 * d.sl, sizeof(V));
          v = o + v;
        }
        std::memcpy(rows[0] + l0 * d.sl, &v, sizeof(V));
      }
    } else if (d.sl == 1) {
      for (; l0 + W <= len; l0 += W) {
        V r[W];
        for (int w = 0; w < W; ++w) r[w] = in[l0 + w];
        transpose(r);
        for (int w = 0; w < nw; ++w) {
          if (add) {
            V o;
            std::memcpy(&o, rows[w] + l0, sizeof(V));
            r[w] = o + r[w];
          }
          std::memcpy(rows[w] + l0, &r[w], sizeof(V));
        }
      }
    }
    for (int w = 0; w < nw; ++w)
      for (int64_t l = l0; l < len; ++l) rows[w][l * d.sl] = add ? rows[w][l * d.sl] + in[l][w] : in[l][w];
  }

};

// One block of the scan: its geometry, and its channels' A (kept twice: as given, for the
// backward's dt gradient, and scaled for exp_scaled), D, delta bias; padding lanes get zero
// output gradients (`valid`).
template <typename T>
struct Block : BlockGeom<T> {
  using G = BlockGeom<T>;
  using V = typename G::V;
  using G::b, G::chan, G::nw, G::load;
  static constexpr int W = G::W;
  V A[MAX_STATE], A2[MAX_STATE];
  V D, bias, valid;

  Block(const Args<T>& a, int64_t blk_index) : G(a.nblk, a.dim, blk_index) {
    const T* Ab = a.A + (a.A_seq ? b * a.dim * a.nstate : 0);
    for (int64_t n = 0; n < a.nstate; ++n) {
      for (int w = 0; w < W; ++w) A[n][w] = Ab[chan[w] * a.nstate + n];
      A2[n] = A[n] * exp_scale<T>();
    }
    for (int w = 0; w < W; ++w) {
      D[w] = a.D ? a.D[(a.D_seq ? b * a.dim : 0) + chan[w]] : T(0);
      bias[w] = a.bias ? a.bias[(a.bias_seq ? b * a.dim : 0) + chan[w]] : T(0);
      valid[w] = w < nw ? T(1) : T(0);
    }
  }

  int64_t pos(const Args<T>& a, int64_t t) const { return a.order ? a.order[b * a.len + t] : t; }

  // dt (after bias and softplus) for every position; with `dsp`, also softplus' derivative
  void load_dt(const Args<T>& a, V* dt, V* dsp) const {
    load(a.delta, a.len, dt);
    for (int64_t l = 0; l < a.len; ++l) {
      const V x = dt[l] + bias;
      dt[l] = a.softplus ? softplus_v(x) : x;
      if (dsp) dsp[l] = a.softplus ? sigmoid_v(x) : V{} + T(1);
    }
  }
};

// One step for all states: h = exp(dt A) h + dt u B, returns C . h (four partial sums: the
// additions are not one serial chain). e receives exp(dt A) when given (the backward keeps it).
template <typename T, int NS, bool KEEP_E>
inline typename Lanes<T>::V step_states(const Block<T>& blk, int N, const T* __restrict Bp, const T* __restrict Cp,
                                        typename Lanes<T>::V dt, typename Lanes<T>::V du,
                                        typename Lanes<T>::V* __restrict h, typename Lanes<T>::V* __restrict e_out) {
  using V = typename Lanes<T>::V;
  V y[4] = {V{}, V{}, V{}, V{}};
#pragma GCC unroll 16
  for (int n = 0; n < (NS ? NS : N); ++n) {
    const V e = exp_scaled(dt, blk.A2[n]);
    h[n] = e * h[n] + du * Bp[n];
    y[n & 3] += h[n] * Cp[n];
    if (KEEP_E) e_out[n] = e;
  }
  return (y[0] + y[1]) + (y[2] + y[3]);
}

// Block-local buffers of one thread, sized for the longest use (one per parallel_for chunk).
template <typename T>
struct Work {
  using V = typename Lanes<T>::V;
  std::vector<V> dt, u, y, z, dsp, dout, gu, gx, gz, hbuf, ebuf, ych, acc;
  Work(int64_t len, int64_t nstate, bool backward, bool grouped = false)
      : dt(len), u(len), y(backward ? 0 : len), z(len), acc(grouped && !backward ? len : 0) {
    if (backward) {
      dsp.resize(len), dout.resize(len), gu.resize(len), gx.resize(len), gz.resize(len);
      hbuf.resize((CHUNK + 1) * nstate), ebuf.resize(CHUNK * nstate), ych.resize(CHUNK);
    }
  }
};

template <typename T, int NS>
void forward_block(const Args<T>& a, int64_t bi, Work<T>& wk, const Dst<T>& out, T* last, T* ckpt, int64_t nchunks) {
  using V = typename Lanes<T>::V;
  const int N = NS ? NS : static_cast<int>(a.nstate);
  const Block<T> blk(a, bi);
  blk.load_dt(a, wk.dt.data(), nullptr);
  blk.load(a.u, a.len, wk.u.data());
  V h[NS ? NS : MAX_STATE];
  for (int n = 0; n < N; ++n) h[n] = V{};
  V* ck = ckpt ? reinterpret_cast<V*>(ckpt) + bi * nchunks * N : nullptr;
  const T* Bb = a.B + blk.b * a.Bsb;
  const T* Cb = a.C + blk.b * a.Csb;
  for (int64_t t = 0; t < a.len; ++t) {
    if (ck && t % CHUNK == 0)
      for (int n = 0; n < N; ++n) ck[(t / CHUNK) * N + n] = h[n];
    const int64_t p = blk.pos(a, t);
    const V dt = wk.dt[p], uu = wk.u[p];
    wk.y[p] = step_states<T, NS, false>(blk, N, Bb + p * a.Bsl, Cb + p * a.Csl, dt, dt * uu, h, nullptr) + blk.D * uu;
  }
  if (last) {
    T* l = last + (blk.b * a.dim + blk.d0) * N;
    for (int w = 0; w < blk.nw; ++w)
      for (int n = 0; n < N; ++n) l[w * N + n] = h[n][w];
  }
  if (a.z.p) {
    blk.load(a.z, a.len, wk.z.data());
    for (int64_t l = 0; l < a.len; ++l) wk.y[l] *= wk.z[l] * sigmoid_v(wk.z[l]);
  }
  if (a.groups > 1) {  // the groups' outputs summed in group order (forward_impl divides and stores)
    if (blk.b < a.batch / a.groups)
      std::copy(wk.y.begin(), wk.y.end(), wk.acc.begin());
    else
      for (int64_t l = 0; l < a.len; ++l) wk.acc[l] += wk.y[l];
  } else {
    blk.store(wk.y.data(), out, a.len);
  }
}

template <typename T>
struct Grads {
  Dst<T> du, ddelta, dz;  // (batch, dim, len) in the layouts of u, delta, z
  T *dA, *dD, *dbias;   // (batch, dim, nstate), (batch, dim), (batch, dim): per sequence
  T *dB, *dC;           // (batch, parts, len, nstate): per_batch: parts 1, else a partial sum per channel block
  bool per_batch;       // one thread runs all blocks of a sequence, adding into one dB, dC row
};

template <typename T, int NS>
void backward_block(const Args<T>& a, int64_t bi, Work<T>& wk, const Seq3<T>& dout, const T* dlast, const T* ckpt,
                    int64_t nchunks, const Grads<T>& g) {
  using V = typename Lanes<T>::V;
  constexpr int W = Lanes<T>::W;
  const int N = NS ? NS : static_cast<int>(a.nstate);
  const Block<T> blk(a, bi);
  blk.load_dt(a, wk.dt.data(), wk.dsp.data());
  blk.load(a.u, a.len, wk.u.data());
  blk.load(dout, a.len, wk.dout.data());
  if (a.groups > 1)  // the mean's gradient: dout / G for every group (the division torch's mean backward does)
    for (int64_t l = 0; l < a.len; ++l) wk.dout[l] = wk.dout[l] / T(a.groups);
  if (a.z.p) blk.load(a.z, a.len, wk.z.data());
  V adj[NS ? NS : MAX_STATE], dA_acc[NS ? NS : MAX_STATE];
  for (int n = 0; n < N; ++n) adj[n] = dA_acc[n] = V{};
  if (dlast) {
    const T* l = dlast + (blk.b * a.dim + blk.d0) * N;
    for (int w = 0; w < blk.nw; ++w)
      for (int n = 0; n < N; ++n) adj[n][w] = l[w * N + n];
  }
  V dD_acc = V{}, dbias_acc = V{};
  const T* Bb = a.B + blk.b * a.Bsb;
  const T* Cb = a.C + blk.b * a.Csb;
  T* dBp = g.dB + (g.per_batch ? blk.b : bi) * a.len * N;
  T* dCp = g.dC + (g.per_batch ? blk.b : bi) * a.len * N;
  const bool add = g.per_batch && blk.d0 > 0;  // a later block of the sequence: add to the earlier ones
  V* const hbuf = wk.hbuf.data();  // row 0: the chunk's checkpoint, row j + 1: the state after step j
  V* const ebuf = wk.ebuf.data();
  for (int64_t c = nchunks - 1; c >= 0; --c) {
    const int64_t t0 = c * CHUNK, m = std::min(CHUNK, a.len - t0);
    // recompute the chunk's states from its checkpoint
    const V* ck = reinterpret_cast<const V*>(ckpt) + (bi * nchunks + c) * N;
    V h[NS ? NS : MAX_STATE];
    for (int n = 0; n < N; ++n) h[n] = hbuf[n] = ck[n];
    for (int64_t j = 0; j < m; ++j) {
      const int64_t p = blk.pos(a, t0 + j);
      const V dt = wk.dt[p], uu = wk.u[p];
      wk.ych[j] = step_states<T, NS, true>(blk, N, Bb + p * a.Bsl, Cb + p * a.Csl, dt, dt * uu, h, ebuf + j * N) +
                  blk.D * uu;
      for (int n = 0; n < N; ++n) hbuf[(j + 1) * N + n] = h[n];
    }
    // the adjoint recurrence, back through the chunk
    for (int64_t j = m - 1; j >= 0; --j) {
      const int64_t p = blk.pos(a, t0 + j);
      const V dt = wk.dt[p], uu = wk.u[p], du = dt * uu;
      const V* __restrict hj = hbuf + (j + 1) * N;
      const V* __restrict hp = hbuf + j * N;
      const V* __restrict e = ebuf + j * N;
      V dy = wk.dout[p] * blk.valid;
      if (a.z.p) {
        const V zz = wk.z[p], sg = sigmoid_v(zz);
        wk.gz[p] = dy * wk.ych[j] * sg * (1 + zz * (1 - sg));
        dy *= zz * sg;
      }
      dD_acc += dy * uu;
      V ddu[2] = {V{}, V{}}, ddt[2] = {V{}, V{}};
      const T* Bp = Bb + p * a.Bsl;
      const T* Cp = Cb + p * a.Csl;
      for (int n0 = 0; n0 < N; n0 += W) {
        const int cnt = std::min(W, N - n0);
        V PB[W], PC[W];
#pragma GCC unroll 16
        for (int k = 0; k < (NS && NS >= W ? W : cnt); ++k) {
          const int n = n0 + k;
          const V gn = adj[n] + Cp[n] * dy;
          PC[k] = hj[n] * dy;
          PB[k] = gn * du;
          ddu[k & 1] += gn * Bp[n];
          const V an = gn * e[n];
          const V xg = an * hp[n];
          ddt[k & 1] += xg * blk.A[n];
          dA_acc[n] += xg * dt;
          adj[n] = an;
        }
        for (int k = cnt; k < W; ++k) PB[k] = PC[k] = V{};
        const V sB = reduce_lanes(PB), sC = reduce_lanes(PC);
        T* const rB = dBp + p * N + n0;
        T* const rC = dCp + p * N + n0;
        if (cnt == W) {
          V oB = sB, oC = sC;
          if (add) {
            std::memcpy(&oB, rB, sizeof(V));
            std::memcpy(&oC, rC, sizeof(V));
            oB += sB, oC += sC;
          }
          std::memcpy(rB, &oB, sizeof(V));
          std::memcpy(rC, &oC, sizeof(V));
        } else {
          for (int k = 0; k < cnt; ++k) {
            rB[k] = add ? rB[k] + sB[k] : sB[k];
            rC[k] = add ? rC[k] + sC[k] : sC[k];
          }
        }
      }
      const V ddu_s = ddu[0] + ddu[1];
      const V dx = (ddt[0] + ddt[1] + ddu_s * uu) * wk.dsp[p];
      dbias_acc += dx;
      wk.gu[p] = ddu_s * dt + dy * blk.D;
      wk.gx[p] = dx;
    }
  }
  blk.store(wk.gu.data(), g.du, a.len);
  blk.store(wk.gx.data(), g.ddelta, a.len);
  if (a.z.p) {
    if (a.groups > 1) {  // dz of the shared z row: the groups' gradients summed in group order
      const int64_t bo = a.batch / a.groups;
      blk.store(wk.gz.data(), g.dz, a.len, blk.b >= bo, blk.b % bo);
    } else {
      blk.store(wk.gz.data(), g.dz, a.len);
    }
  }
  for (int w = 0; w < blk.nw; ++w) {
    const int64_t bd = blk.b * a.dim + blk.d0 + w;
    for (int n = 0; n < N; ++n) g.dA[bd * N + n] = dA_acc[n][w];
    g.dD[bd] = dD_acc[w];
    g.dbias[bd] = dbias_acc[w];
  }
}

// the state count as a template argument where it is a common size (the states then stay in
// registers and the loops over them unroll), else the same code with the count at run time
template <typename T, typename F>
void with_nstate(int64_t n, F&& f) {
  if (std::is_same<T, float>::value && n == 16)
    f(std::integral_constant<int, 16>());
  else if (std::is_same<T, float>::value && n == 8)
    f(std::integral_constant<int, 8>());
  else
    f(std::integral_constant<int, 0>());
}

template <typename T>
void forward_impl(const Args<T>& a, const Dst<T>& out, T* last, T* ckpt, int64_t nchunks) {
  with_nstate<T>(a.nstate, [&](auto ns) {
    at::parallel_for(0, a.batch * a.nblk, 1, [&](int64_t begin, int64_t end) {
      Work<T> wk(a.len, a.nstate, false);
      for (int64_t bi = begin; bi < end; ++bi) forward_block<T, decltype(ns)::value>(a, bi, wk, out, last, ckpt, nchunks);
    });
  });
}

// groups > 1: threads over (output sequence x channel block); one thread runs a block's G groups in
// order, summing their outputs, then stores the mean: torch's mean over a stacked group dim, bit for bit
template <typename T>
void forward_grouped_impl(const Args<T>& a, const Dst<T>& out, T* last, T* ckpt, int64_t nchunks) {
  const int64_t bo = a.batch / a.groups;
  with_nstate<T>(a.nstate, [&](auto ns) {
    at::parallel_for(0, bo * a.nblk, 1, [&](int64_t begin, int64_t end) {
      Work<T> wk(a.len, a.nstate, false, true);
      for (int64_t k = begin; k < end; ++k) {
        const int64_t b = k / a.nblk, cb = k % a.nblk;
        for (int64_t g = 0; g < a.groups; ++g)
          forward_block<T, decltype(ns)::value>(a, (g * bo + b) * a.nblk + cb, wk, out, last, ckpt, nchunks);
        for (int64_t l = 0; l < a.len; ++l) wk.acc[l] = wk.acc[l] / T(a.groups);
        BlockGeom<T>(a.nblk, a.dim, k).store(wk.acc.data(), out, a.len);  // output sequence b, block cb
      }
    });
  });
}

template <typename T>
void backward_impl(const Args<T>& a, const at::Tensor& dout_t, const T* dlast, const T* ckpt, int64_t nchunks,
                   const Grads<T>& g) {
  const Seq3<T> dout(dout_t, a.groups > 1 ? a.batch / a.groups : 0);
  with_nstate<T>(a.nstate, [&](auto ns) {
    // threads over sequences when there are enough of them (no partial sums of dB, dC to
    // allocate and add), else over blocks. Grouped: over output sequences (or their blocks), a
    // thread running the G groups of its unit in order, so that it sums their dz in that order.
    const int64_t step = g.per_batch ? a.nblk : 1;
    const int64_t bo = a.batch / a.groups;
    at::parallel_for(0, bo * a.nblk / step, 1, [&](int64_t begin, int64_t end) {
      Work<T> wk(a.len, a.nstate, true);
      for (int64_t k = begin * step; k < end * step; ++k)
        for (int64_t grp = 0; grp < a.groups; ++grp)
          backward_block<T, decltype(ns)::value>(a, grp * bo * a.nblk + k, wk, dout, dlast, ckpt, nchunks, g);
    });
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
  TORCH_CHECK(A.size(-1) <= MAX_STATE, "cxpmrg_scan: at most ", MAX_STATE, " states");
  TORCH_CHECK(A.is_contiguous() && (!D.defined() || D.is_contiguous()) && (!bias.defined() || bias.is_contiguous()),
              "cxpmrg_scan: A, D, delta_bias must be contiguous");
  if (order.defined())
    TORCH_CHECK(order.scalar_type() == at::kLong && order.is_contiguous() && order.dim() == 2 &&
                    order.size(0) == u.size(0) && order.size(1) == u.size(2),
                "cxpmrg_scan: order must be a contiguous int64 (batch, len) tensor");
}

at::Tensor opt(const std::optional<at::Tensor>& t) { return t.has_value() ? *t : at::Tensor(); }

// B or C (batch, nstate, len) as (batch, len, nstate) rows with the states contiguous: a view when
// they already are (the x projection's output split into dt, B, C), else a copy
at::Tensor state_rows(const at::Tensor& t) {
  at::Tensor r = t.transpose(1, 2);
  return r.stride(2) == 1 || r.size(2) == 1 ? r : r.contiguous();
}

// groups > 1: u's batch is G groups of batch / G sequences, sequence g * (batch / G) + b reading z[b]
void check_groups(const at::Tensor& u, const at::Tensor& z, int64_t groups) {
  TORCH_CHECK(groups >= 1 && u.size(0) % groups == 0, "cxpmrg_scan: groups must divide the batch");
  if (groups > 1 && z.defined())
    TORCH_CHECK(z.dim() == 3 && z.size(0) * groups == u.size(0) && z.size(1) == u.size(1) && z.size(2) == u.size(2),
                "cxpmrg_scan: grouped z is (batch / groups, dim, len)");
  if (groups == 1 && z.defined())
    TORCH_CHECK(z.sizes() == u.sizes(), "cxpmrg_scan: z like u");
}

// Returns (out, last_state or empty, checkpoints or empty).
std::tuple<at::Tensor, at::Tensor, at::Tensor> scan_fwd(
    const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
    const std::optional<at::Tensor>& D_, const std::optional<at::Tensor>& z_,
    const std::optional<at::Tensor>& bias_, const std::optional<at::Tensor>& order_, bool softplus, bool keep,
    bool want_last, int64_t groups) {
  const at::Tensor D = opt(D_), z = opt(z_), bias = opt(bias_), order = opt(order_);
  check_inputs(u, delta, A, B, C, D, z, bias, order);
  check_groups(u, z, groups);
  // u's layout (a channels-last u gives a channels-last output); grouped: the mean, (batch / G, dim, len),
  // channels innermost when u's are (then out.transpose(1, 2), the out projection's input, is contiguous)
  at::Tensor out = groups == 1 ? at::empty_like(u)
                   : u.stride(1) == 1 ? at::empty({u.size(0) / groups, u.size(2), u.size(1)}, u.options()).transpose(1, 2)
                                      : at::empty({u.size(0) / groups, u.size(1), u.size(2)}, u.options());
  at::Tensor last = want_last ? at::empty({u.size(0), u.size(1), A.size(-1)}, u.options()) : at::empty({0}, u.options());
  const int64_t nchunks = (u.size(2) + CHUNK - 1) / CHUNK;
  at::Tensor ckpt = at::empty({0}, u.options());
  const at::Tensor Bt = state_rows(B), Ct = state_rows(C);
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "cxpmrg_scan_fwd", [&] {
    const Args<scalar_t> a = make_args<scalar_t>(u, delta, A, Bt, Ct, D, z, bias, order, softplus, groups);
    if (keep) ckpt = at::empty({a.batch * a.nblk, nchunks, a.nstate, Lanes<scalar_t>::W}, u.options());
    if (u.numel() == 0) return;
    (groups > 1 ? forward_grouped_impl<scalar_t> : forward_impl<scalar_t>)(
        a, Dst<scalar_t>(out), want_last ? last.data_ptr<scalar_t>() : nullptr, keep ? ckpt.data_ptr<scalar_t>() : nullptr,
        nchunks);
  });
  return {out, last, ckpt};
}

// Returns du, ddelta, dA, dB, dC, dD, dz, dbias, with dA, dD, dbias summed over the batch
// when the parameter is shared, and empty tensors for absent D, z, bias.
std::vector<at::Tensor> scan_bwd(const at::Tensor& dout, const std::optional<at::Tensor>& dlast_,
                                 const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                                 const at::Tensor& B, const at::Tensor& C, const std::optional<at::Tensor>& D_,
                                 const std::optional<at::Tensor>& z_, const std::optional<at::Tensor>& bias_,
                                 const std::optional<at::Tensor>& order_, const at::Tensor& ckpt, bool softplus,
                                 int64_t groups, const std::optional<at::Tensor>& dz_out) {
  const at::Tensor D = opt(D_), z = opt(z_), bias = opt(bias_), order = opt(order_);
  check_inputs(u, delta, A, B, C, D, z, bias, order);
  check_groups(u, z, groups);
  TORCH_CHECK(dout.size(0) * std::max<int64_t>(groups, 1) == u.size(0) && dout.size(1) == u.size(1) &&
                  dout.size(2) == u.size(2) && dout.scalar_type() == u.scalar_type(),
              "cxpmrg_scan: dout like the output");
  at::Tensor dlast;
  if (dlast_.has_value() && dlast_->defined()) dlast = dlast_->to(u.scalar_type()).contiguous();
  const int64_t batch = u.size(0), dim = u.size(1), len = u.size(2), N = A.size(-1);
  const int64_t nchunks = (len + CHUNK - 1) / CHUNK;
  at::Tensor du = at::empty_like(u), ddelta = at::empty_like(delta);  // the layouts of the inputs
  // z's layout, or written into dz_out (z's shape, any strides); grouped: the groups' dz summed (z is
  // shared by them)
  at::Tensor dz = !z.defined() ? at::empty({0}, u.options()) : dz_out.has_value() ? *dz_out : at::empty_like(z);
  if (z.defined() && dz_out.has_value())
    TORCH_CHECK(dz.sizes() == z.sizes() && dz.scalar_type() == u.scalar_type() && dz.device().is_cpu(),
                "cxpmrg_scan: dz_out must be a CPU tensor of z's shape and dtype");
  at::Tensor dA = at::empty({batch, dim, N}, u.options());
  at::Tensor dD = at::empty({batch, dim}, u.options()), dbias = at::empty({batch, dim}, u.options());
  at::Tensor dBp, dCp;
  bool per_batch = false;
  const at::Tensor Bt = state_rows(B), Ct = state_rows(C);
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "cxpmrg_scan_bwd", [&] {
    const Args<scalar_t> a = make_args<scalar_t>(u, delta, A, Bt, Ct, D, z, bias, order, softplus, groups);
    TORCH_CHECK(ckpt.numel() == a.batch * a.nblk * nchunks * N * Lanes<scalar_t>::W,
                "cxpmrg_scan: checkpoints do not match the inputs");
    const int64_t threads = at::get_num_threads();
    const int64_t units = batch / groups;  // the sequences the threads share out
    per_batch = a.nblk == 1 || (units >= threads && (units % threads == 0 || units >= 4 * threads));
    dBp = at::empty({batch, per_batch ? 1 : a.nblk, len, N}, u.options());
    dCp = at::empty({batch, per_batch ? 1 : a.nblk, len, N}, u.options());
    if (u.numel() == 0) {
      dA.zero_(), dD.zero_(), dbias.zero_(), dBp.zero_(), dCp.zero_();
      return;
    }
    Grads<scalar_t> g{Dst<scalar_t>(du), Dst<scalar_t>(ddelta), z.defined() ? Dst<scalar_t>(dz) : Dst<scalar_t>(), dA.data_ptr<scalar_t>(),
                      dD.data_ptr<scalar_t>(), dbias.data_ptr<scalar_t>(), dBp.data_ptr<scalar_t>(),
                      dCp.data_ptr<scalar_t>(), per_batch};
    backward_impl<scalar_t>(a, dout, dlast.defined() ? dlast.data_ptr<scalar_t>() : nullptr,
                            ckpt.data_ptr<scalar_t>(), nchunks, g);
  });
  at::Tensor dB = (per_batch ? dBp.select(1, 0) : dBp.sum(1)).transpose(1, 2);
  at::Tensor dC = (per_batch ? dCp.select(1, 0) : dCp.sum(1)).transpose(1, 2);
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


// ---------------------------------------------------------------- the mixer's causal depthwise conv
// Every scan direction g of a Vision Mamba mixer runs a causal depthwise conv (K taps) and SiLU
// over the tokens in its own order. conv_fwd does all G directions at once from the token-order
// input x (batch, dim, len) read through strides, tap j of step t reading token order[g, t-K+1+j],
// and writes (G, batch, len, dim) in token order with channels innermost: the layout the x
// projection and the scan read without copies. Threads over (batch x blocks of W channels); a
// block's x is transposed once into lane vectors and used for all directions.
template <typename T>
struct ConvArgs {
  int64_t G, batch, dim, len, K, nblk;
  Seq3<T> x;
  const T* w;     // (G, dim, K)
  const T* bias;  // (G, dim)
  const int64_t* order;  // (G, len)
};

template <typename T>
ConvArgs<T> make_conv_args(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias, const at::Tensor& order) {
  ConvArgs<T> a;
  a.G = w.size(0), a.batch = x.size(0), a.dim = x.size(1), a.len = x.size(2), a.K = w.size(2);
  a.nblk = (a.dim + Lanes<T>::W - 1) / Lanes<T>::W;
  a.x = Seq3<T>(x);
  a.w = w.data_ptr<T>(), a.bias = bias.data_ptr<T>(), a.order = order.data_ptr<int64_t>();
  return a;
}

// x of one (batch, channel block) as lane vectors in token order, the block's geometry, and
// the pre-activation of direction g at every step of its order (the sliding window of K taps)
template <typename T>
struct ConvBlock : BlockGeom<T> {
  using G = BlockGeom<T>;
  using V = typename G::V;
  using G::chan, G::nw, G::d0;
  static constexpr int W = G::W;
  ConvBlock(const ConvArgs<T>& a, int64_t bi) : G(a.nblk, a.dim, bi) {}
  V lanes(const T* p, int64_t stride) const {  // values of the block's channels in a row of `dim`
    V v;
    if (nw == W) {
      std::memcpy(&v, p + d0, sizeof(V));
    } else {
      for (int w = 0; w < W; ++w) v[w] = p[chan[w] * stride];
    }
    return v;
  }
  void taps(const ConvArgs<T>& a, int64_t g, V* wv, V& bv) const {
    for (int64_t j = 0; j < a.K; ++j)
      for (int w = 0; w < W; ++w) wv[j][w] = a.w[(g * a.dim + chan[w]) * a.K + j];
    for (int w = 0; w < W; ++w) bv[w] = a.bias[g * a.dim + chan[w]];
  }
  // the pre-activation of direction g at step t: bias + sum_j w[j] x[order[g, t-K+1+j]], the taps
  // added in order j = 0, 1, ... (those before the first step are zero); KS > 0: K = KS, unrolled
  template <int KS>
  V pre_at(const ConvArgs<T>& a, const int64_t* ord, const V* xb, const V* wv, V bv, int64_t t) const {
    const int64_t K = KS ? KS : a.K;
    V acc = bv;
    if (t >= K - 1) {
      const int64_t* o = ord + t - K + 1;
#pragma GCC unroll 8
      for (int64_t j = 0; j < K; ++j) acc += wv[j] * xb[o[j]];
    } else {
      for (int64_t j = K - 1 - t; j < K; ++j) acc += wv[j] * xb[ord[t - K + 1 + j]];
    }
    return acc;
  }
};

// the tap count as a template argument for the common 4 (Mamba's d_conv), else at run time
template <typename F>
void with_taps(int64_t k, F&& f) {
  if (k == 4)
    f(std::integral_constant<int, 4>());
  else
    f(std::integral_constant<int, 0>());
}

template <typename T>
void conv_forward_impl(const ConvArgs<T>& a, T* out, bool silu) {
  using V = typename Lanes<T>::V;
  with_taps(a.K, [&](auto ks) {
    constexpr int KS = decltype(ks)::value;
    at::parallel_for(0, a.batch * a.nblk, 1, [&](int64_t begin, int64_t end) {
      std::vector<V> xb(a.len), wv(a.K);
      for (int64_t bi = begin; bi < end; ++bi) {
        const ConvBlock<T> blk(a, bi);
        blk.load(a.x, a.len, xb.data());
        for (int64_t g = 0; g < a.G; ++g) {
          V bv;
          blk.taps(a, g, wv.data(), bv);
          const int64_t* ord = a.order + g * a.len;
          T* o = out + (g * a.batch + blk.b) * a.len * a.dim + blk.d0;
          for (int64_t t = 0; t < a.len; ++t) {
            const V pre = blk.template pre_at<KS>(a, ord, xb.data(), wv.data(), bv, t);
            const V v = silu ? pre * sigmoid_v(pre) : pre;
            T* row = o + ord[t] * a.dim;
            if (blk.nw == Lanes<T>::W)
              std::memcpy(row, &v, sizeof(V));
            else
              for (int w = 0; w < blk.nw; ++w) row[w] = v[w];
          }
        }
      }
    });
  });
}

// dx (the layout of x), and per batch row partial dw (batch, G, dim, K) and dbias (batch, G, dim)
template <typename T>
void conv_backward_impl(const ConvArgs<T>& a, const T* dout, Dst<T> dx, T* dw, T* dbias, bool silu) {
  using V = typename Lanes<T>::V;
  with_taps(a.K, [&](auto ks) {
    constexpr int KS = decltype(ks)::value;
    at::parallel_for(0, a.batch * a.nblk, 1, [&](int64_t begin, int64_t end) {
      std::vector<V> xb(a.len), gx(a.len), wv(a.K), gw(a.K);
      for (int64_t bi = begin; bi < end; ++bi) {
        const ConvBlock<T> blk(a, bi);
        blk.load(a.x, a.len, xb.data());
        std::fill(gx.begin(), gx.end(), V{});
        for (int64_t g = 0; g < a.G; ++g) {
          V bv;
          blk.taps(a, g, wv.data(), bv);
          const int64_t* ord = a.order + g * a.len;
          const T* d = dout + (g * a.batch + blk.b) * a.len * a.dim;
          V gb = V{};
          std::fill(gw.begin(), gw.end(), V{});
          const int64_t K = KS ? KS : a.K;
          for (int64_t t = 0; t < a.len; ++t) {
            const V up = blk.lanes(d + ord[t] * a.dim, 1);
            V grad = up;
            if (silu) {
              const V pre = blk.template pre_at<KS>(a, ord, xb.data(), wv.data(), bv, t);
              const V sg = sigmoid_v(pre);
              grad = up * sg * (1 + pre * (1 - sg));
            }
            gb += grad;
            if (t >= K - 1) {
              const int64_t* o = ord + t - K + 1;
#pragma GCC unroll 8
              for (int64_t j = 0; j < K; ++j) {
                const int64_t q = o[j];
                gx[q] += wv[j] * grad;
                gw[j] += grad * xb[q];
              }
            } else {
              for (int64_t j = K - 1 - t; j < K; ++j) {
                const int64_t q = ord[t - K + 1 + j];
                gx[q] += wv[j] * grad;
                gw[j] += grad * xb[q];
              }
            }
          }
          T* dwr = dw + ((blk.b * a.G + g) * a.dim) * a.K;
          T* dbr = dbias + (blk.b * a.G + g) * a.dim;
          for (int w = 0; w < blk.nw; ++w) {
            for (int64_t j = 0; j < a.K; ++j) dwr[(blk.d0 + w) * a.K + j] = gw[j][w];
            dbr[blk.d0 + w] = gb[w];
          }
        }
        blk.store(gx.data(), dx, a.len);  // dx in x's layout
      }
    });
  });
}

// The same two ops when x's channels are contiguous (x (batch, dim, len) a transposed (batch, len, ...)
// buffer, as the mixer's in projection writes it): threads over (direction x batch row) forward and over
// batch rows backward, every step handling all channels of its token, so that the output and dout
// are written and read in whole rows (the channel-block loops of the general ops above touch one
// 64-byte piece of a row per step, in scan order: for the column directions a row `grid` rows away
// each time, which the hardware prefetchers do not follow). The arithmetic, and its order, is the
// general ops', lane for lane (padding lanes of a last partial block repeat its last channel).
template <typename T>
struct ConvRows {
  using V = typename Lanes<T>::V;
  static constexpr int W = Lanes<T>::W;
  const ConvArgs<T>& a;
  int64_t nblk;
  ConvRows(const ConvArgs<T>& args) : a(args), nblk(args.nblk) {}
  int nw(int64_t cb) const { return static_cast<int>(std::min<int64_t>(W, a.dim - cb * W)); }
  V lanes(const T* row, int64_t cb) const {  // channels cb*W ... of a row of `dim` contiguous values
    V v;
    const int n = nw(cb);
    if (n == W) {
      std::memcpy(&v, row + cb * W, sizeof(V));
    } else {
      for (int w = 0; w < W; ++w) v[w] = row[cb * W + std::min(w, n - 1)];
    }
    return v;
  }
  void taps(int64_t g, V* wv, V* bv) const {  // wv[cb * K + j], bv[cb] of direction g
    for (int64_t cb = 0; cb < nblk; ++cb) {
      const int n = nw(cb);
      for (int w = 0; w < W; ++w) {
        const int64_t c = cb * W + std::min(w, n - 1);
        for (int64_t j = 0; j < a.K; ++j) wv[cb * a.K + j][w] = a.w[(g * a.dim + c) * a.K + j];
        bv[cb][w] = a.bias[g * a.dim + c];
      }
    }
  }
  const T* xrow(int64_t b, int64_t p) const { return a.x.p + b * a.x.sb + p * a.x.sl; }
  template <int KS>
  V pre(int64_t b, const int64_t* ord, const V* wv, V bv, int64_t t, int64_t cb) const {
    const int64_t K = KS ? KS : a.K;
    V acc = bv;
    if (t >= K - 1) {
      const int64_t* o = ord + t - K + 1;
#pragma GCC unroll 8
      for (int64_t j = 0; j < K; ++j) acc += wv[cb * K + j] * lanes(xrow(b, o[j]), cb);
    } else {
      for (int64_t j = K - 1 - t; j < K; ++j) acc += wv[cb * K + j] * lanes(xrow(b, ord[t - K + 1 + j]), cb);
    }
    return acc;
  }
};

template <typename T>
void conv_forward_rows(const ConvArgs<T>& a, T* out, bool silu) {
  using V = typename Lanes<T>::V;
  constexpr int W = Lanes<T>::W;
  with_taps(a.K, [&](auto ks) {
    constexpr int KS = decltype(ks)::value;
    at::parallel_for(0, a.G * a.batch, 1, [&](int64_t begin, int64_t end) {
      const ConvRows<T> r(a);
      std::vector<V> wv(a.nblk * a.K), bv(a.nblk);
      for (int64_t unit = begin; unit < end; ++unit) {
        const int64_t g = unit / a.batch, b = unit % a.batch;
        r.taps(g, wv.data(), bv.data());
        const int64_t* ord = a.order + g * a.len;
        T* o = out + (g * a.batch + b) * a.len * a.dim;
        for (int64_t t = 0; t < a.len; ++t) {
          T* row = o + ord[t] * a.dim;
          for (int64_t cb = 0; cb < a.nblk; ++cb) {
            const V pre = r.template pre<KS>(b, ord, wv.data(), bv[cb], t, cb);
            const V v = silu ? pre * sigmoid_v(pre) : pre;
            const int n = r.nw(cb);
            if (n == W)
              std::memcpy(row + cb * W, &v, sizeof(V));
            else
              for (int w = 0; w < n; ++w) row[cb * W + w] = v[w];
          }
        }
      }
    });
  });
}

template <typename T>
void conv_backward_rows(const ConvArgs<T>& a, const T* dout, Dst<T> dx, T* dw, T* dbias, bool silu) {
  using V = typename Lanes<T>::V;
  constexpr int W = Lanes<T>::W;
  with_taps(a.K, [&](auto ks) {
    constexpr int KS = decltype(ks)::value;
    const int64_t K = KS ? KS : a.K;
    at::parallel_for(0, a.batch, 1, [&](int64_t begin, int64_t end) {
      const ConvRows<T> r(a);
      const int64_t nb = a.nblk;
      std::vector<V> wv(nb * a.K), bv(nb), gx(a.len * nb), gw(nb * a.K), gb(nb);
      for (int64_t b = begin; b < end; ++b) {
        std::fill(gx.begin(), gx.end(), V{});
        for (int64_t g = 0; g < a.G; ++g) {
          r.taps(g, wv.data(), bv.data());
          std::fill(gw.begin(), gw.end(), V{});
          std::fill(gb.begin(), gb.end(), V{});
          const int64_t* ord = a.order + g * a.len;
          const T* d = dout + (g * a.batch + b) * a.len * a.dim;
          for (int64_t t = 0; t < a.len; ++t) {
            const T* drow = d + ord[t] * a.dim;
            const int64_t j0 = std::max<int64_t>(0, K - 1 - t);
            for (int64_t cb = 0; cb < nb; ++cb) {
              const V up = r.lanes(drow, cb);
              V grad = up;
              if (silu) {
                const V pre = r.template pre<KS>(b, ord, wv.data(), bv[cb], t, cb);
                const V sg = sigmoid_v(pre);
                grad = up * sg * (1 + pre * (1 - sg));
              }
              gb[cb] += grad;
              if (j0 == 0) {
                const int64_t* o = ord + t - K + 1;
#pragma GCC unroll 8
                for (int64_t j = 0; j < K; ++j) {
                  gx[o[j] * nb + cb] += wv[cb * K + j] * grad;
                  gw[cb * K + j] += grad * r.lanes(r.xrow(b, o[j]), cb);
                }
              } else {
                for (int64_t j = j0; j < K; ++j) {
                  const int64_t q = ord[t - K + 1 + j];
                  gx[q * nb + cb] += wv[cb * K + j] * grad;
                  gw[cb * K + j] += grad * r.lanes(r.xrow(b, q), cb);
                }
              }
            }
          }
          T* dwr = dw + ((b * a.G + g) * a.dim) * a.K;
          T* dbr = dbias + (b * a.G + g) * a.dim;
          for (int64_t cb = 0; cb < nb; ++cb)
            for (int w = 0; w < r.nw(cb); ++w) {
              for (int64_t j = 0; j < a.K; ++j) dwr[(cb * W + w) * a.K + j] = gw[cb * K + j][w];
              dbr[cb * W + w] = gb[cb][w];
            }
        }
        for (int64_t p = 0; p < a.len; ++p) {  // dx in x's layout
          T* row = dx.p + b * dx.sb + p * dx.sl;
          for (int64_t cb = 0; cb < nb; ++cb) {
            const int n = r.nw(cb);
            if (dx.sc == 1 && n == W) {
              std::memcpy(row + cb * W, &gx[p * nb + cb], sizeof(V));
            } else {
              for (int w = 0; w < n; ++w) row[(cb * W + w) * dx.sc] = gx[p * nb + cb][w];
            }
          }
        }
      }
    });
  });
}

void check_conv(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias, const at::Tensor& order) {
  for (const at::Tensor* t : {&x, &w, &bias}) {
    TORCH_CHECK(t->device().is_cpu(), "cxpmrg_scan.conv: CPU tensors only");
    TORCH_CHECK(t->scalar_type() == x.scalar_type(), "cxpmrg_scan.conv: x, weight, bias of one dtype");
  }
  TORCH_CHECK(x.dim() == 3 && w.dim() == 3 && w.size(1) == x.size(1) && w.is_contiguous(),
              "cxpmrg_scan.conv: x (batch, dim, len), weight contiguous (G, dim, K)");
  TORCH_CHECK(bias.is_contiguous() && bias.dim() == 2 && bias.size(0) == w.size(0) && bias.size(1) == x.size(1),
              "cxpmrg_scan.conv: bias contiguous (G, dim)");
  TORCH_CHECK(order.scalar_type() == at::kLong && order.is_contiguous() && order.dim() == 2 &&
                  order.size(0) == w.size(0) && order.size(1) == x.size(2),
              "cxpmrg_scan.conv: order contiguous int64 (G, len)");
}

// (G, batch, len, dim): silu(causal depthwise conv) of every direction, in token order
at::Tensor conv_fwd(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias, const at::Tensor& order,
                    bool silu) {
  check_conv(x, w, bias, order);
  at::Tensor out = at::empty({w.size(0), x.size(0), x.size(2), x.size(1)}, x.options());
  if (x.numel() == 0 || w.size(0) == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cxpmrg_conv_fwd", [&] {
    const ConvArgs<scalar_t> a = make_conv_args<scalar_t>(x, w, bias, order);
    (x.stride(1) == 1 ? conv_forward_rows<scalar_t> : conv_forward_impl<scalar_t>)(a, out.data_ptr<scalar_t>(), silu);
  });
  return out;
}

// dx (x's layout), dweight (G, dim, K), dbias (G, dim)
std::vector<at::Tensor> conv_bwd(const at::Tensor& dout_, const at::Tensor& x, const at::Tensor& w,
                                 const at::Tensor& bias, const at::Tensor& order, bool silu,
                                 const std::optional<at::Tensor>& dx_out) {
  check_conv(x, w, bias, order);
  const at::Tensor dout = dout_.to(x.scalar_type()).contiguous();
  TORCH_CHECK(dout.dim() == 4 && dout.size(0) == w.size(0) && dout.size(1) == x.size(0) &&
                  dout.size(2) == x.size(2) && dout.size(3) == x.size(1),
              "cxpmrg_scan.conv: dout (G, batch, len, dim)");
  at::Tensor dx = dx_out.has_value() ? *dx_out : at::empty_like(x);  // dx_out: x's shape, any strides
  TORCH_CHECK(dx.sizes() == x.sizes() && dx.scalar_type() == x.scalar_type() && dx.device().is_cpu(),
              "cxpmrg_scan.conv: dx_out must be a CPU tensor of x's shape and dtype");
  at::Tensor dw = at::zeros({x.size(0), w.size(0), w.size(1), w.size(2)}, x.options());
  at::Tensor db = at::zeros({x.size(0), w.size(0), w.size(1)}, x.options());
  if (x.numel() == 0) return {dx.zero_(), dw.sum(0), db.sum(0)};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cxpmrg_conv_bwd", [&] {
    const ConvArgs<scalar_t> a = make_conv_args<scalar_t>(x, w, bias, order);
    (x.stride(1) == 1 ? conv_backward_rows<scalar_t> : conv_backward_impl<scalar_t>)(
        a, dout.data_ptr<scalar_t>(), Dst<scalar_t>(dx), dw.data_ptr<scalar_t>(), db.data_ptr<scalar_t>(), silu);
  });
  return {dx, dw.sum(0), db.sum(0)};
}

}  // namespace

TORCH_LIBRARY(cxpmrg_scan, m) {
  m.def("scan_fwd", &scan_fwd);
  m.def("scan_bwd", &scan_bwd);
  m.def("conv_fwd", &conv_fwd);
  m.def("conv_bwd", &conv_bwd);
}
