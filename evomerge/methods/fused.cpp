// The fused merge kernel, compiled just in time by fused.py (torch.utils.cpp_extension.load).
//
// One pass over the output: for each entry, every source's kept value (its task
// vector's entry, inside a magnitude band or past a random drop, rescaled) is formed
// and combined (a weighted sum, or TIES sign election) in registers, and the result
// written to the output, in its dtype. The number of sources is a template parameter
// (1 to 8), so that the loops over entries vectorize with the per-source state unrolled.
// Sources held as stored (bf16, fp16) are upcast a block at a time, and their task
// vectors formed there, in float32, as float32 task vectors are made.
//
// Each operation repeats the eager steps' own arithmetic, in their order: products,
// sums and quotients rounded as torch rounds them, the weighted sum with a fused
// multiply-add as `addcmul` does, the sums over sources left to right as
// `sum_sources` does. So the two paths give the same tensor, bit for bit; it is
// compiled with -ffp-contract=off, so that the compiler fuses nothing else. Both add
// 0 last, so that a zero is +0.0 whatever zeros the steps added (a dropped entry of
// a negative task vector is -0.0 in the eager steps' masks, +0.0 here).

#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <pybind11/stl.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <atomic>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace {

constexpr int MAX_SOURCES = 8;      // sources are a compile-time count: per-entry state stays in registers
constexpr int64_t BLOCK = 1024;     // elements per step of the cast to the output's dtype
constexpr int64_t GRAIN = 1 << 15;  // fewest elements worth a thread

enum Keep : int64_t { ALL = 0, BAND = 1, DROP = 2 };
enum Combine : int64_t { SUM = 0, ELECT = 1, MIX = 2 };

struct Plan {
  int64_t k = 0, n = 0;
  const float* base = nullptr;       // float32 task vectors: the base, n
  const float* deltas = nullptr;     // and the task vectors, (K, n)
  const void* raw_base = nullptr;    // or bf16/fp16 sources as stored (`Raw`): the base, n
  const void* raw_sources = nullptr; // and the sources, (K, n); a block's task vectors are formed in float32
  const float* uniform = nullptr;    // DROP: the U[0, 1) fields, (K, n)
  const float* ranks = nullptr;      // DROP by rank (DELLA): per-row magnitude ranks q, (K, n)
  int64_t keep = ALL;
  std::vector<float> low, high;      // BAND: keep low <= |d| < high. DROP: keep u < low (+ high * q by rank)
  std::vector<int64_t> low_cut, high_cut;  // BAND by count: at |d| == low (high), positions below the cut are in
  std::vector<float> rescale;        // DROP: kept entries times this; empty: times 1 / p
  bool of_sources = false;           // the kept values are the sources x_i, not the task vectors
  bool madd = true;                  // sum: a fused multiply-add per source (addcmul), else a product then an add
  int64_t combine = SUM;
  std::vector<float> coef;           // sum: per-source scales; elect, mix: per-source weights
  float scalar = 1.f;                // sum: the base's scale; elect, mix: lambda
  float divisor = 1.f;               // sum, mix: the sum's divisor
  bool normalize = false;
};

// Source i's kept entry at j, one functor per sparsification: the task vector's entry, or 0 where the band
// or the drop removes it, times the drop's rescale. Branch-free (the products are formed for every entry),
// so that the loops over entries vectorize. Held by value in the loop: its scalars stay in registers.
// (The loops carry `ivdep`: the output never overlaps an input, and with K sources the compiler would
// otherwise check up to 3K + 1 pointers for overlap, more than it is willing to.)
template <int K>
struct Sources {
  const float* d[K];
  float low[K], high[K], rescale[K];

  Sources(const Plan& p, const float* fields, int64_t offset, int64_t stride) {
    for (int i = 0; i < K; ++i) {
      d[i] = fields + i * stride + offset;
      low[i] = p.low.empty() ? 0.f : p.low[i];
      high[i] = p.high.empty() ? 0.f : p.high[i];
      rescale[i] = p.rescale.empty() ? 1.f : p.rescale[i];
    }
  }
};

template <int K>
struct KeepAll {
  Sources<K> s;
  float operator()(int i, int64_t j) const { return s.d[i][j]; }
};

// The sources themselves from float32 task vectors: x_i = b + d_i (every entry kept).
template <int K>
struct KeepSources {
  Sources<K> s;
  const float* b;
  float operator()(int i, int64_t j) const { return b[j] + s.d[i][j]; }
};

template <int K>
struct KeepBand {
  Sources<K> s;
  float operator()(int i, int64_t j) const {
    const float x = s.d[i][j], m = std::fabs(x);
    return (m >= s.low[i] && m < s.high[i]) ? x : 0.f;
  }
};

template <int K>
struct KeepDrop {
  Sources<K> s;
  Sources<K> u;
  float operator()(int i, int64_t j) const {
    const float rescaled = s.d[i][j] * s.rescale[i];
    return u.d[i][j] < s.low[i] ? rescaled : 0.f;
  }
};

// The band by count (breadcrumbs where magnitudes tie at a bound): the top-k entries, ties broken by position,
// are those with |d| > bound, or |d| == bound at a position below the cut; keep the top (drop + keep) less
// the top drop.
// Positions are int32 (a tensor below 2^31 entries: checked), so that they vectorize beside the floats; the
// bitwise & and | keep the loop branch-free.
template <int K>
struct KeepBandByCount {
  Sources<K> s;
  int32_t j0;
  int32_t low_cut[K], high_cut[K];
  float operator()(int i, int64_t j) const {
    const float x = s.d[i][j], m = std::fabs(x);
    const int32_t at = j0 + static_cast<int32_t>(j);
    const bool in_low = (m > s.low[i]) | ((m == s.low[i]) & (at < low_cut[i]));
    const bool in_high = (m > s.high[i]) | ((m == s.high[i]) & (at < high_cut[i]));
    return (in_low & !in_high) ? x : 0.f;
  }
};

template <int K, bool by_probability>
struct KeepDropByRank {
  Sources<K> s;
  Sources<K> u;
  Sources<K> q;
  float operator()(int i, int64_t j) const {
    const float prob = s.low[i] + s.high[i] * q.d[i][j];
    const float rescaled = by_probability ? s.d[i][j] * (1.f / prob) : s.d[i][j] * s.rescale[i];
    return u.d[i][j] < prob ? rescaled : 0.f;
  }
};

// acc = (scalar * b + sum_i coef_i kept_i) / divisor, left to right: one fused multiply-add per source
// (torch.addcmul), or with `madd` false a rounded product, then an add (torch.mul, then add).
template <int K, bool madd, typename Kept>
void weighted_sum(const Plan& p, const Kept kept, const float* __restrict b, int64_t n, float* __restrict acc) {
  float coef[K];
  for (int i = 0; i < K; ++i) coef[i] = p.coef[i];
  const float scalar = p.scalar, divisor = p.divisor;
#pragma GCC ivdep
  for (int64_t j = 0; j < n; ++j) {
    float total = b[j] * scalar;
    for (int i = 0; i < K; ++i) total = madd ? std::fma(kept(i, j), coef[i], total) : total + kept(i, j) * coef[i];
    acc[j] = total / divisor + 0.f;   // a zero is +0.0, whichever zeros the sum added (the eager steps add 0 too)
  }
}

// mergekit's task arithmetic: D_i = kept_i w_i, M = sum_i D_i left to right, b + lambda (M / divisor)
// (as `mix_and_merge`).
template <int K, typename Kept>
void mix_and_merge(const Plan& p, const Kept kept, const float* __restrict b, int64_t n, float* __restrict acc) {
  float w[K];
  for (int i = 0; i < K; ++i) w[i] = p.coef[i];
  const float lam = p.scalar, divisor = p.divisor;
#pragma GCC ivdep
  for (int64_t j = 0; j < n; ++j) {
    float merged = 0.f;
    for (int i = 0; i < K; ++i) {
      const float D = kept(i, j) * w[i];
      merged = i == 0 ? D : merged + D;
    }
    acc[j] = merged / divisor * lam + b[j] + 0.f;
  }
}

// TIES steps 2-5 on the kept entries: D_i = w_i kept_i, elect the sign s of sum D_i (+1 at 0), sum the
// agreeing D_i (divided by their weights with normalize, a zero divisor being 1), b + lambda * that.
// Sums run over the sources left to right, as sum_sources does. (elect_and_merge sums |D_i| and then
// multiplies by s: the same number, rounding being symmetric about 0.)
template <int K, bool normalize, typename Kept>
void elect_and_merge(const Plan& p, const Kept kept, const float* __restrict b, int64_t n, float* __restrict acc) {
  float w[K];
  for (int i = 0; i < K; ++i) w[i] = p.coef[i];
  const float lam = p.scalar;
#pragma GCC ivdep
  for (int64_t j = 0; j < n; ++j) {
    float D[K];
    float total = 0.f;
    for (int i = 0; i < K; ++i) {
      D[i] = kept(i, j) * w[i];
      total = i == 0 ? D[i] : total + D[i];
    }
    const float sign = total < 0.f ? -1.f : 1.f;
    float merged = 0.f, divisor = 0.f;
    for (int i = 0; i < K; ++i) {
      const bool agrees = D[i] * sign > 0.f;
      const float d = agrees ? D[i] : 0.f;
      merged = i == 0 ? d : merged + d;
      if (normalize) {
        const float c = agrees ? w[i] : 0.f;
        divisor = i == 0 ? c : divisor + c;
      }
    }
    if (normalize) merged = merged / (divisor == 0.f ? 1.f : divisor);
    acc[j] = merged * lam + b[j] + 0.f;
  }
}

template <int K, typename Kept>
void combine(const Plan& p, const Kept kept, const float* b, int64_t n, float* acc) {
  if (p.combine == SUM && p.madd) {
    weighted_sum<K, true>(p, kept, b, n, acc);
  } else if (p.combine == SUM) {
    weighted_sum<K, false>(p, kept, b, n, acc);
  } else if (p.combine == MIX) {
    mix_and_merge<K>(p, kept, b, n, acc);
  } else if (p.normalize) {
    elect_and_merge<K, true>(p, kept, b, n, acc);
  } else {
    elect_and_merge<K, false>(p, kept, b, n, acc);
  }
}

// One block's base and task vectors: where the plan holds them (float32), or formed from the stored sources.
struct Block {
  const float* base;
  const float* deltas;
  int64_t offset, stride;    // task vector i's entries of the block: deltas + i * stride + offset
};

// The merged values of [j0, j0 + n) into acc.
template <int K>
void merge_block(const Plan& p, const Block& blk, int64_t j0, int64_t n, float* acc) {
  const Sources<K> d(p, blk.deltas, blk.offset, blk.stride);
  const float* b = blk.base;
  if (p.keep == ALL && p.of_sources && p.deltas != nullptr) {   // raw sources come formed as x_i already
    combine<K>(p, KeepSources<K>{d, b}, b, n, acc);
  } else if (p.keep == ALL) {
    combine<K>(p, KeepAll<K>{d}, b, n, acc);
  } else if (p.keep == BAND && p.low_cut.empty()) {
    combine<K>(p, KeepBand<K>{d}, b, n, acc);
  } else if (p.keep == BAND) {
    KeepBandByCount<K> kept{d, static_cast<int32_t>(j0), {}, {}};
    for (int i = 0; i < K; ++i) {
      kept.low_cut[i] = static_cast<int32_t>(p.low_cut[i]);
      kept.high_cut[i] = static_cast<int32_t>(p.high_cut[i]);
    }
    combine<K>(p, kept, b, n, acc);
  } else if (p.ranks == nullptr) {
    combine<K>(p, KeepDrop<K>{d, Sources<K>(p, p.uniform, j0, p.n)}, b, n, acc);
  } else if (p.rescale.empty()) {
    combine<K>(p, KeepDropByRank<K, true>{d, Sources<K>(p, p.uniform, j0, p.n), Sources<K>(p, p.ranks, j0, p.n)},
               b, n, acc);
  } else {
    combine<K>(p, KeepDropByRank<K, false>{d, Sources<K>(p, p.uniform, j0, p.n), Sources<K>(p, p.ranks, j0, p.n)},
               b, n, acc);
  }
}

// A block's task vectors from sources stored as In (bf16, fp16): b = float(base), d_i = float(x_i) - b, the
// float32 subtraction that float32 task vectors were made with, so both give the same merge bit for bit.
// With `of_sources`, the sources themselves: float(x_i).
template <typename In, bool of_sources>
void form_block(const Plan& p, int64_t j0, int64_t n, float* __restrict b, float* __restrict d) {
  const In* base = static_cast<const In*>(p.raw_base) + j0;
  for (int64_t j = 0; j < n; ++j) b[j] = static_cast<float>(base[j]);
  for (int64_t i = 0; i < p.k; ++i) {
    const In* x = static_cast<const In*>(p.raw_sources) + i * p.n + j0;
    float* di = d + i * BLOCK;
    for (int64_t j = 0; j < n; ++j) di[j] = of_sources ? static_cast<float>(x[j]) : static_cast<float>(x[j]) - b[j];
  }
}


using BlockFn = void (*)(const Plan&, const Block&, int64_t, int64_t, float*);
using FormFn = void (*)(const Plan&, int64_t, int64_t, float*, float*);

template <int... Ks>
BlockFn block_fn(int64_t k, std::integer_sequence<int, Ks...>) {
  BlockFn fns[] = {&merge_block<Ks + 1>...};
  return fns[k - 1];
}

// Write a block, cast to the output's dtype; whether every value is finite.
template <typename Out>
bool store(const float* __restrict acc, Out* __restrict out, int64_t n) {
  int bad = 0;
  for (int64_t j = 0; j < n; ++j) bad |= !(std::fabs(acc[j]) <= FLT_MAX);
  if (!std::is_same<Out, float>::value) {
    for (int64_t j = 0; j < n; ++j) out[j] = static_cast<Out>(acc[j]);
  }
  return bad == 0;
}

template <typename Out>
bool run(const Plan& p, FormFn form, Out* out) {
  const BlockFn merge_block = block_fn(p.k, std::make_integer_sequence<int, MAX_SOURCES>{});
  std::atomic<bool> finite{true};
  at::parallel_for(0, p.n, GRAIN, [&](int64_t begin, int64_t end) {
    std::vector<float> buffer(std::is_same<Out, float>::value ? 0 : BLOCK);
    std::vector<float> formed(form == nullptr ? 0 : (p.k + 1) * BLOCK);   // a raw block's base, task vectors
    bool ok = true;
    for (int64_t j0 = begin; j0 < end; j0 += BLOCK) {
      const int64_t n = std::min(BLOCK, end - j0);
      float* acc = std::is_same<Out, float>::value ? reinterpret_cast<float*>(out + j0) : buffer.data();
      if (form == nullptr) {
        merge_block(p, Block{p.base + j0, p.deltas, j0, p.n}, j0, n, acc);
      } else {
        form(p, j0, n, formed.data(), formed.data() + BLOCK);
        merge_block(p, Block{formed.data(), formed.data() + BLOCK, 0, BLOCK}, j0, n, acc);
      }
      ok = store(acc, out + j0, n) && ok;
    }
    if (!ok) finite.store(false);
  });
  return finite.load();
}

std::vector<float> floats(const std::vector<double>& values) {
  return std::vector<float>(values.begin(), values.end());
}

const float* field(const c10::optional<at::Tensor>& t, const at::Tensor& like) {
  if (!t.has_value()) return nullptr;
  TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->sizes() == like.sizes(),
              "a field must be a contiguous float32 tensor shaped like the task vectors");
  return t->data_ptr<float>();
}

// `raw`: base and stack are the sources as stored (bf16, fp16); else float32 base and task vectors.
bool merge(at::Tensor out, const at::Tensor& base, const at::Tensor& stack, bool raw, int64_t keep,
           const std::vector<double>& low, const std::vector<double>& high, const std::vector<int64_t>& low_cut,
           const std::vector<int64_t>& high_cut, const std::vector<double>& rescale,
           const c10::optional<at::Tensor>& uniform, const c10::optional<at::Tensor>& ranks, int64_t combine,
           const std::vector<double>& coef, double scalar, double divisor, bool normalize, bool of_sources,
           bool madd) {
  const auto in = base.scalar_type();
  TORCH_CHECK(stack.scalar_type() == in, "the base and the stack differ in dtype");
  TORCH_CHECK(raw ? (in == at::kBFloat16 || in == at::kHalf) : in == at::kFloat,
              raw ? "raw sources are bfloat16 or float16" : "task vectors are float32");
  TORCH_CHECK(out.is_contiguous() && base.is_contiguous() && stack.is_contiguous(), "contiguous tensors only");
  const int64_t k = stack.size(0), n = base.numel();
  TORCH_CHECK(out.numel() == n && stack.numel() == k * n, "shapes differ");
  TORCH_CHECK(k >= 1 && k <= MAX_SOURCES, "1 to ", MAX_SOURCES, " sources");
  TORCH_CHECK(static_cast<int64_t>(coef.size()) == k, "one coefficient per source");
  TORCH_CHECK(keep == ALL || (static_cast<int64_t>(low.size()) == k && static_cast<int64_t>(high.size()) == k),
              "one bound per source");
  TORCH_CHECK(keep != DROP || uniform.has_value(), "a random drop needs the uniform fields");
  Plan p;
  p.k = k;
  p.n = n;
  TORCH_CHECK(!of_sources || (keep == ALL && combine == SUM), "the sources themselves are only summed");
  FormFn form = nullptr;
  if (!raw) {
    p.base = base.data_ptr<float>();
    p.deltas = stack.data_ptr<float>();
  } else {
    p.raw_base = base.data_ptr();
    p.raw_sources = stack.data_ptr();
    if (in == at::kBFloat16) {
      form = of_sources ? &form_block<at::BFloat16, true> : &form_block<at::BFloat16, false>;
    } else {
      form = of_sources ? &form_block<at::Half, true> : &form_block<at::Half, false>;
    }
  }
  p.uniform = field(uniform, stack);
  p.ranks = field(ranks, stack);
  TORCH_CHECK(keep != DROP || p.ranks != nullptr || static_cast<int64_t>(rescale.size()) == k,
              "a drop without ranks needs one rescale per source");
  p.keep = keep;
  p.low = floats(low);
  p.high = floats(high);
  TORCH_CHECK(low_cut.size() == high_cut.size() && (low_cut.empty() || static_cast<int64_t>(low_cut.size()) == k),
              "one cut per source, or none");
  TORCH_CHECK(low_cut.empty() || n <= INT32_MAX, "cuts need a tensor of fewer than 2^31 entries");
  p.low_cut = low_cut;
  p.high_cut = high_cut;
  p.rescale = floats(rescale);
  TORCH_CHECK(combine == SUM || combine == ELECT || combine == MIX, "combine is 0 (sum), 1 (elect) or 2 (mix)");
  p.of_sources = of_sources;
  p.madd = madd;
  p.combine = combine;
  p.coef = floats(coef);
  p.scalar = static_cast<float>(scalar);
  p.divisor = static_cast<float>(divisor);
  p.normalize = normalize;
  switch (out.scalar_type()) {
    case at::kFloat: return run(p, form, out.data_ptr<float>());
    case at::kBFloat16: return run(p, form, out.data_ptr<at::BFloat16>());
    case at::kHalf: return run(p, form, out.data_ptr<at::Half>());
    default: TORCH_CHECK(false, "output dtype must be float32, bfloat16 or float16");
  }
  return false;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.attr("MAX_SOURCES") = MAX_SOURCES;
  m.def("merge", &merge, "Merge one tensor into `out` in one pass; whether every value is finite.",
        pybind11::arg("out"), pybind11::arg("base"), pybind11::arg("stack"), pybind11::arg("raw"), pybind11::arg("keep"),
        pybind11::arg("low"), pybind11::arg("high"), pybind11::arg("low_cut"), pybind11::arg("high_cut"),
        pybind11::arg("rescale"), pybind11::arg("uniform"),
        pybind11::arg("ranks"), pybind11::arg("combine"), pybind11::arg("coef"), pybind11::arg("scalar"),
        pybind11::arg("divisor"), pybind11::arg("normalize"), pybind11::arg("of_sources"), pybind11::arg("madd"),
        pybind11::call_guard<pybind11::gil_scoped_release>());
}
