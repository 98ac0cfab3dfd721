// Matrix-vector products for a decode step on an x86 CPU: a few input rows against weights of
// fp32, bf16, fp16 or int8 values, or int4 in groups, read once, in the layout they are stored in
// (several weights with the same input in one call); prefill's products with int8 and int4
// weights, a few rows at a time as floats; and a decode step's attention over the cache.
//
// A decode step multiplies every weight by one row per sequence, so it is bound by how fast the
// weight streams in. Converting 8-bit integers to floats costs as much as reading them, so each
// weight row is read front to back (one stream, which the hardware prefetcher follows; or four such
// streams at once, see float_streams()) with U independent sums, which keeps the vector units
// busy instead of waiting on one sum's latency.
// Several input rows share each converted vector; with more than one, two weight rows go
// together, so that each input vector loaded serves both.
//
// Vectors are 256-bit AVX2 ones, also where the CPU has AVX-512: on AMD's Zen 4 (which runs
// 512-bit instructions in two halves) they streamed int8, bf16 and fp32 weights faster, and
// AVX-512's 256-bit permute still converts int4 by table lookup; one row's int4 products go
// through AVX512-BF16's dot product, and int8 products through AVX512-VNNI's integer one (two to
// eight input rows through AMX's tiles), where the CPU has them (see there). Built on first use by
// llama/kernels.py; threads come from torch's own pool.

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <map>
#include <mutex>
#include <optional>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <c10/core/InferenceMode.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cpuid.h>
#include <immintrin.h>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif
#include <torch/library.h>

namespace {

constexpr int L = 8;  // floats to a vector
using floats = __m256;
inline floats zero() { return _mm256_setzero_ps(); }
inline floats load(const float* p) { return _mm256_loadu_ps(p); }
inline floats fma(floats a, floats b, floats c) { return _mm256_fmadd_ps(a, b, c); }
inline floats add(floats a, floats b) { return _mm256_add_ps(a, b); }
inline void store(float* p, floats v) { _mm256_storeu_ps(p, v); }
inline float total(floats v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
inline __m128i bytes(const void* p) { return _mm_loadl_epi64(static_cast<const __m128i*>(p)); }
// L weights as floats.
inline floats widen(const float* p) { return load(p); }
inline floats widen(const c10::BFloat16* p) {
  __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}
inline floats widen(const c10::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
// f(T()) for T the C++ type of `dtype`, one of the floats the kernels take (fp32, bf16, fp16);
// any other dtype is refused with `refusal`.
template <typename F>
auto by_float_type(at::ScalarType dtype, const char* refusal, F f) {
  switch (dtype) {
    case at::kFloat: return f(float());
    case at::kBFloat16: return f(c10::BFloat16());
    case at::kHalf: return f(c10::Half());
    default: TORCH_CHECK(false, refusal);
  }
}
inline floats widen(const int8_t* p) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes(p))); }
#if defined(__AVX512VL__)
// One int4 group's 16 weights, scale * (n - 8) for each nibble n, in two vectors: AVX-512
// looks L of them up at once by their 4-bit indices, which is all the conversion a nibble needs.
struct Levels {
  floats low, high;
  Levels() = default;
  explicit Levels(float scale)
      : low(_mm256_mul_ps(_mm256_set1_ps(scale), _mm256_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1))),
        high(_mm256_mul_ps(_mm256_set1_ps(scale), _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7))) {}
};
// L bytes of int4 values: the weights of their low nibbles, and of their high ones.
inline void widen(const uint8_t* p, const Levels& levels, floats& low, floats& high) {
  __m256i v = _mm256_cvtepu8_epi32(bytes(p));
  low = _mm256_permutex2var_ps(levels.low, v, levels.high);  // reads each index's low 4 bits only
  high = _mm256_permutex2var_ps(levels.low, _mm256_srli_epi32(v, 4), levels.high);
}
#else
struct Levels {
  floats scale, offset;
  Levels() = default;
  explicit Levels(float s) : scale(_mm256_set1_ps(s)), offset(_mm256_set1_ps(-8 * s)) {}
};
inline void widen(const uint8_t* p, const Levels& levels, floats& low, floats& high) {
  __m256i v = _mm256_cvtepu8_epi32(bytes(p));
  low = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32(15))), levels.scale, levels.offset);
  high = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4)), levels.scale, levels.offset);
}
#endif

constexpr int STREAMS = 4;  // weight rows that one input row's products read at once, where they do (see float_streams())
// Independent sums per weight row and input row: four for one row, and for each of the streams of
// one input row, which so sum each row in the same order as it alone; one for the two weight rows
// of several input rows, which give enough.
template <int R>
constexpr int U = R == 1 || R == STREAMS ? 4 : 1;

inline void prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0); }
// The same for a weight stream with little arithmetic per byte. On AMD's Zen 4 into the L2 cache
// only: lines asked into L1 as well held the core to fewer reads in flight, and a compiled step's
// quantized products of one input row, and float products of several, ran faster for it. int8's
// products of two to four rows, with more arithmetic per byte, ran slower, so they ask into L1 (and
// one float row read alone gained nothing from asking ahead). An Intel Xeon's streams (see AHEAD)
// were tuned asking into L1, and Intel keeps that.
const bool INTO_L2 = (__builtin_cpu_init(), __builtin_cpu_is("amd"));  // a plain load in the loops
inline void prefetch_l2(const void* p) {
  if (INTO_L2)
    _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T1);
  else
    prefetch(p);
}
// How far ahead each of the streams asks for its bytes. The core keeps only so many loads in flight
// of its own accord, fewer the more instructions a cache line takes (bf16's conversions), which
// held bf16 rows well below memory speed on an Intel Xeon. (int8's streams asked 4 KiB ahead
// before: 2 KiB ran about 4% faster on the Xeon, alike on an AMD Zen 4.)
constexpr int64_t AHEAD = 2048;

// Weight rows 0, apart, .., (R - 1) * apart (one value per column; `scales`: one per row, or none)
// against input rows [0, M). K is a multiple of L.
template <int M, int R, typename T>
void dense_rows(const float* x, int64_t K, const T* w, int64_t apart, const float* scales, float* out, int64_t N) {
  constexpr int V = U<R>;
  floats sum[M][R][V];
  for (auto& a : sum)
    for (auto& b : a)
      for (auto& c : b) c = zero();
  auto step = [&]<int n>(int64_t k) {  // columns [k, k + n * L)
    floats weights[R][n];
    for (int r = 0; r < R; r++) {
      if (R > 1 && apart == 1) prefetch_l2(w + (R + r) * K + k + 512 / sizeof(T));  // the next rows' streams
      if constexpr (R == STREAMS) {  // see AHEAD
        const char* at = reinterpret_cast<const char*>(w + r * apart * K + k) + AHEAD;
        for (int64_t b = 0; b < n * L * int64_t(sizeof(T)); b += 64) prefetch(at + b);
      }
      for (int v = 0; v < n; v++) weights[r][v] = widen(w + r * apart * K + k + v * L);
    }
    for (int m = 0; m < M; m++)
      for (int v = 0; v < n; v++) {
        floats xv = load(x + m * K + k + v * L);
        for (int r = 0; r < R; r++) sum[m][r][v] = fma(xv, weights[r][v], sum[m][r][v]);
      }
  };
  int64_t k = 0;
  for (; k + V * L <= K; k += V * L) step.template operator()<V>(k);
  for (; k < K; k += L) step.template operator()<1>(k);
  for (int m = 0; m < M; m++)
    for (int r = 0; r < R; r++) {
      floats s = sum[m][r][0];
      for (int v = 1; v < V; v++) s = add(s, sum[m][r][v]);
      out[m * N + r * apart] = total(s) * (scales ? scales[r * apart] : 1.0f);
    }
}

// The same for int4 weights: in each group of g columns (g / 2 bytes), byte j holds column j in
// its low nibble and column j + g / 2 in its high one; `scales` holds one number per group.
// g / 2 is a multiple of L.
template <int M, int R>
void int4_rows(const float* x, int64_t K, int64_t g, const uint8_t* q, int64_t apart, const float* scales, float* out,
               int64_t N) {
  constexpr int V = R == 1 ? 2 : 1;  // each byte vector gives two weight vectors, so two sums
  const int64_t half = g / 2, groups = K / g;
  floats sum[M][R][2 * V];
  for (auto& a : sum)
    for (auto& b : a)
      for (auto& c : b) c = zero();
  for (int64_t j = 0; j < groups; j++) {
    Levels levels[R];
    for (int r = 0; r < R; r++) levels[r] = Levels(scales[r * apart * groups + j]);
    auto step = [&]<int n>(int64_t b) {  // bytes [b, b + n * L) of group j
      floats low[R][n], high[R][n];
      // One row's int4 stream converts slower than memory delivers it; asking for its bytes 2 KiB
      // ahead keeps reads going meanwhile. (fp32, bf16 and int8 rows ran slower for it.)
      if constexpr (R == 1) prefetch(q + j * half + b + 2048);
      for (int r = 0; r < R; r++)
        for (int v = 0; v < n; v++) widen(q + r * apart * (K / 2) + j * half + b + v * L, levels[r], low[r][v], high[r][v]);
      for (int m = 0; m < M; m++)
        for (int v = 0; v < n; v++) {
          const float* xj = x + m * K + j * g + b + v * L;
          floats xl = load(xj), xh = load(xj + half);
          for (int r = 0; r < R; r++) {
            sum[m][r][v] = fma(xl, low[r][v], sum[m][r][v]);
            sum[m][r][V + v] = fma(xh, high[r][v], sum[m][r][V + v]);
          }
        }
    };
    int64_t b = 0;
    for (; b + V * L <= half; b += V * L) step.template operator()<V>(b);
    for (; b < half; b += L) step.template operator()<1>(b);
  }
  for (int m = 0; m < M; m++)
    for (int r = 0; r < R; r++) {
      floats s = sum[m][r][0];
      for (int v = 1; v < 2 * V; v++) s = add(s, sum[m][r][v]);
      out[m * N + r * apart] = total(s);
    }
}

// Each tensor's data, looked up once per call rather than once per row.
template <typename T>
std::vector<const T*> pointers(const std::vector<at::Tensor>& ts) {
  std::vector<const T*> out;
  for (const at::Tensor& t : ts) out.push_back(reinterpret_cast<const T*>(t.data_ptr()));
  return out;
}

constexpr int64_t GRAIN = 64;  // weight rows a thread takes at a time

// The rows of several weights, one after another: a decode step's products with the same input
// (a layer's queries, keys and values) go to the threads together, in one call.
struct Weights {
  std::vector<int64_t> rows, first;  // each weight's row count, and where its rows start
  int64_t total = 0;
  explicit Weights(const std::vector<at::Tensor>& ws) {
    for (const at::Tensor& w : ws) first.push_back(total), rows.push_back(w.size(0)), total += w.size(0);
  }
  // f(i, b, e) for each weight i holding rows of [begin, end): its own rows [b, e).
  template <typename F>
  void each(int64_t begin, int64_t end, F f) const {
    for (size_t i = 0; i < rows.size(); i++) {
      const int64_t b = std::max(begin, first[i]), e = std::min(end, first[i] + rows[i]);
      if (b < e) f(i, b - first[i], e - first[i]);
    }
  }
  // All their products with x, side by side: an input row's are `total` values, weight i's from first[i].
  at::Tensor output(const at::Tensor& x) const { return at::empty({x.size(0), total}, x.options()); }
  float* column(const at::Tensor& out, size_t i) const { return out.data_ptr<float>() + first[i]; }
};

// One input row's products read a thread's weight rows as several streams at once, each from its
// own part of the rows, where that was measured faster: int8 rows through VNNI on every CPU (see
// int8_vnni), float rows on an Intel Xeon with AVX-512, whose cores each keep more reads in flight
// for STREAMS streams far apart than for one (a 110M step 11-23% faster). On an AMD Zen 4, float
// rows read one at a time: four streams made bf16's products slower and fp32's no faster.
bool float_streams() {
#if defined(__AVX512F__)
  static const bool intel = __builtin_cpu_is("intel");
  return intel;
#else
  return false;
#endif
}

// Rows [first, last) of one weight against one input row: where `streams`, f(n, apart) for each
// row n of the first of STREAMS parts, `apart` rows long, which reads the STREAMS rows n,
// n + apart, ... Returns the first row left for one at a time.
template <typename F>
int64_t in_streams(bool streams, int64_t first, int64_t last, F f) {
  if (!streams) return first;
  const int64_t apart = (last - first) / STREAMS;
  for (int64_t n = first; n < first + apart; n++) f(n, apart);
  return first + STREAMS * apart;
}

// out (M, total) = x (M, K) times the rows of each weight, rows(i, ...) for weight i, split over
// threads by weight rows; input rows go 4 at a time, each call of rows<m, r>(i, x, row, apart,
// out_column) handling r weight rows `apart` rows from each other.
template <typename Rows>
at::Tensor products(const at::Tensor& x, const Weights& weights, Rows rows) {
  const int64_t M = x.size(0), K = x.size(1), N = weights.total;
  at::Tensor out = weights.output(x);
  const float* xp = x.data_ptr<float>();
  at::parallel_for(0, weights.total, GRAIN, [&](int64_t begin, int64_t end) {
    weights.each(begin, end, [&](size_t i, int64_t first, int64_t last) {
      float* op = weights.column(out, i);
      for (int64_t m = 0; m < M; m += 4) {
        const int64_t count = std::min<int64_t>(M - m, 4);
        auto run = [&](auto inputs) {
          constexpr int I = decltype(inputs)::value;
          const float* xm = xp + m * K;
          float* om = op + m * N;
          int64_t n = first;
          if constexpr (I == 1)
            n = in_streams(float_streams(), first, last, [&](int64_t r, int64_t apart) {
              rows.template operator()<1, STREAMS>(i, xm, r, apart, om + r);
            });
          else
            for (; n + 2 <= last; n += 2) rows.template operator()<I, 2>(i, xm, n, 1, om + n);
          for (; n < last; n++) rows.template operator()<I, 1>(i, xm, n, 1, om + n);
        };
        switch (count) {
          case 1: run(std::integral_constant<int, 1>()); break;
          case 2: run(std::integral_constant<int, 2>()); break;
          case 3: run(std::integral_constant<int, 3>()); break;
          default: run(std::integral_constant<int, 4>()); break;
        }
      }
    });
  });
  return out;
}

#if defined(__AVX512F__)
// int4 rows against one input row on a CPU with AVX512-BF16 (AMD Zen 4, Intel Sapphire Rapids
// and later). The float kernel above spends more time converting nibbles than reading them; here
// a nibble becomes the bf16 number n - 8 by a lookup in a 32-entry table, 32 at a time, and one
// instruction multiplies 32 pairs of bf16 numbers and adds them to fp32 sums, exactly: a product
// of two bf16 numbers fits in fp32. The input row goes in as the bf16 numbers nearest it and,
// unless that was all of it (a bf16 model's), again as the bf16 numbers nearest what is left,
// which keeps each value to about 2^-16 of itself. (bf16 weights gained nothing from the same
// instruction: the float kernel streams them at memory speed already.)
#define DOT_TARGET __attribute__((target("avx512bw,avx512bf16")))

bool bf16_dot() {
  static const bool has = __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512bf16");
  return has;
}

// An input row's two bf16 parts, in the order the weights' values come in. Per thread, kept
// between calls: a decode step makes a hundred of them.
struct Parts {
  std::vector<uint16_t> high, low;
  bool exact = true;  // no second part
};

DOT_TARGET inline __m512 as_floats(__m256i bf16) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bf16), 16));
}
DOT_TARGET inline __m512bh as_bf16(__m512i v) { return std::bit_cast<__m512bh>(v); }

// x's values at the columns `order` lists, split into parts; a multiple of 16 of them.
DOT_TARGET const Parts& split(const float* x, const std::vector<int32_t>& order) {
  thread_local Parts parts;
  thread_local std::vector<float> placed;
  const int64_t K = order.size();
  placed.resize(K), parts.high.resize(K), parts.low.resize(K);
  for (int64_t i = 0; i < K; i++) placed[i] = x[order[i]];
  __mmask16 rest = 0;
  for (int64_t i = 0; i < K; i += 16) {
    const __m512 v = _mm512_loadu_ps(&placed[i]);
    const __m256i high = std::bit_cast<__m256i>(_mm512_cvtneps_pbh(v));
    const __m512 left = _mm512_sub_ps(v, as_floats(high));
    rest |= _mm512_cmpneq_ps_mask(left, _mm512_setzero_ps());
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(&parts.high[i]), high);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(&parts.low[i]), std::bit_cast<__m256i>(_mm512_cvtneps_pbh(left)));
  }
  parts.exact = rest == 0;
  return parts;
}

// Where int4 rows' values come in 64 bytes at a time: each 16-bit word's four nibbles, a vector
// of 32 per place, hold columns that `order` lists; each 32-bit lane of the sums belongs to one
// group, `lanes` of the step's first group `first`, which spans `spans` groups.
struct Int4Order {
  std::vector<int32_t> order, lanes;
  std::vector<int64_t> first;
  std::vector<__mmask16> spans;
};
constexpr int64_t STEP = 64;  // bytes of an int4 row to a step

const Int4Order& int4_order(int64_t K, int64_t g) {
  static std::mutex lock;
  static std::map<std::pair<int64_t, int64_t>, Int4Order> made;
  std::lock_guard<std::mutex> hold(lock);
  auto [it, fresh] = made.try_emplace({K, g});
  Int4Order& o = it->second;
  if (!fresh) return o;
  const int64_t half = g / 2, steps = K / 2 / STEP;
  for (int64_t c = 0; c < steps; c++) {
    for (int place = 0; place < 4; place++)
      for (int word = 0; word < 32; word++) {  // byte b's low nibble holds column (b / half) * g + b % half
        const int64_t b = c * STEP + 2 * word + place / 2;
        o.order.push_back(static_cast<int32_t>(b / half * g + b % half + (place % 2 ? half : 0)));
      }
    o.first.push_back(c * STEP / half);
    for (int lane = 0; lane < 16; lane++)
      o.lanes.push_back(static_cast<int32_t>((c * STEP + 4 * lane) / half - o.first[c]));
    o.spans.push_back(static_cast<__mmask16>((1u << ((c * STEP + STEP - 1) / half - o.first[c] + 1)) - 1));
  }
  return o;
}

alignas(64) constexpr uint16_t NIBBLES[32] = {  // bf16 n - 8 for n = 0..15, twice
    0xC100, 0xC0E0, 0xC0C0, 0xC0A0, 0xC080, 0xC040, 0xC000, 0xBF80,
    0,      0x3F80, 0x4000, 0x4040, 0x4080, 0x40A0, 0x40C0, 0x40E0,
    0xC100, 0xC0E0, 0xC0C0, 0xC0A0, 0xC080, 0xC040, 0xC000, 0xBF80,
    0,      0x3F80, 0x4000, 0x4040, 0x4080, 0x40A0, 0x40C0, 0x40E0};

// int4 weight rows [0, R) against x placed in int4_order's order; one scale per group. Rows go
// four together, so that each vector of x loaded serves four (one at a time ran a quarter slower),
// each row's products with x's two parts in sums of their own: eight independent sums, where one
// per row, eight products deep each step, held the loop to their latency (5% slower on a Zen 4).
template <bool Exact, int R>
DOT_TARGET void int4_rows_dot(const Parts& x, const Int4Order& o, int64_t K, int64_t g, const uint8_t* q,
                              const float* scales, float* out) {
  const __m512i levels = _mm512_load_si512(NIBBLES);
  const int64_t bytes = K / 2, groups = K / g;
  __m512 sum[R];
  for (auto& s : sum) s = _mm512_setzero_ps();
  for (int64_t c = 0; c < bytes / STEP; c++) {
    __m512i v[R];
    __m512 high[R], low[R];
    for (int r = 0; r < R; r++) {
      // Four streams at once outrun the hardware prefetcher: ask for each row's bytes 4 KiB ahead.
      prefetch_l2(q + r * bytes + c * STEP + 4096);
      v[r] = _mm512_loadu_si512(q + r * bytes + c * STEP);
      high[r] = low[r] = _mm512_setzero_ps();
    }
    for (int place = 0; place < 4; place++) {  // the table reads the low 5 bits of each word
      const int64_t i = c * 128 + place * 32;
      const __m512bh xh = as_bf16(_mm512_loadu_si512(&x.high[i])), xl = as_bf16(_mm512_loadu_si512(&x.low[i]));
      for (int r = 0; r < R; r++) {
        const __m512i nibbles = place ? _mm512_srli_epi16(v[r], 4 * place) : v[r];
        const __m512bh values = as_bf16(_mm512_permutexvar_epi16(nibbles, levels));
        high[r] = _mm512_dpbf16_ps(high[r], values, xh);
        if constexpr (!Exact) low[r] = _mm512_dpbf16_ps(low[r], values, xl);
      }
    }
    const __m512i lanes = _mm512_loadu_si512(&o.lanes[c * 16]);
    for (int r = 0; r < R; r++) {
      const __m512 s = _mm512_maskz_loadu_ps(o.spans[c], scales + r * groups + o.first[c]);
      const __m512 part = Exact ? high[r] : _mm512_add_ps(high[r], low[r]);
      sum[r] = _mm512_fmadd_ps(part, _mm512_permutexvar_ps(lanes, s), sum[r]);
    }
  }
  for (int r = 0; r < R; r++) out[r] = _mm512_reduce_add_ps(sum[r]);
}

// out (1, total): x (1, K) against the rows of each int4 weight, four at a time.
DOT_TARGET at::Tensor int4_dot(const at::Tensor& x, const Weights& weights, const std::vector<at::Tensor>& q,
                               const std::vector<at::Tensor>& scales, int64_t g) {
  const int64_t K = x.size(1);
  const Int4Order& o = int4_order(K, g);
  const Parts& parts = split(x.data_ptr<float>(), o.order);
  at::Tensor out = weights.output(x);
  auto run = [&]<bool Exact>() {
    at::parallel_for(0, weights.total, GRAIN, [&](int64_t begin, int64_t end) {
      weights.each(begin, end, [&](size_t i, int64_t first, int64_t last) {
        const uint8_t* qi = q[i].data_ptr<uint8_t>();
        const float* si = scales[i].data_ptr<float>();
        float* op = weights.column(out, i);
        auto rows = [&]<int R>(int64_t n) {
          int4_rows_dot<Exact, R>(parts, o, K, g, qi + n * (K / 2), si + n * (K / g), op + n);
        };
        int64_t n = first;
        for (; n + 4 <= last; n += 4) rows.template operator()<4>(n);
        for (; n < last; n++) rows.template operator()<1>(n);
      });
    });
  };
  parts.exact ? run.template operator()<true>() : run.template operator()<false>();
  return out;
}
#endif

#if defined(__AVX512F__)
// int8 rows against up to four input rows on a CPU with AVX512-VNNI (Intel since Cascade Lake,
// AMD Zen 4): one instruction multiplies 64 pairs of 8-bit integers and adds them, four to each
// of 16 32-bit sums, where the float kernel spends three instructions on 8 weights. So the input
// rows become integers too: in chunks of 256 columns, each value as a fixed-point number of the
// chunk's largest magnitude, in signed 8-bit digits. Three digits (2^-24 of the largest) are as
// exact as fp32's sum of the products where the values are alike in size; a chunk whose largest is
// more than 16 times its mean magnitude (an outlier feature) gets a fourth (2^-32), so that the
// small values beside it keep about fp32's precision too. The instruction takes unsigned bytes on
// one side: the weights go in as w + 128, and each sum starts at -128 times the sum of its digits,
// so the integer sums are exact.
#define VNNI_TARGET __attribute__((target("avx512bw,avx512vnni")))

bool vnni() {
  static const bool has = __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vnni");
  return has;
}

constexpr int64_t CHUNK = 256, BLOCK = 64;  // columns to a chunk of x, and to one step of the kernel
constexpr int DIGITS = 4;  // at most; a chunk of values alike in size takes three
constexpr float OUTLIER = 16;  // a chunk's largest over its mean magnitude that takes the fourth

// x's rows in digits: for each row, per block of 64 columns four vectors of 64 (lowest digit
// first; the fourth zero for a chunk of three); per row and chunk, -128 times each digit's sums
// (16 each, one per 32-bit sum the instruction keeps), the chunk's scale and whether it has four.
// Per thread, kept between calls. None where a chunk holds what fixed point cannot: an infinity,
// a NaN, or only magnitudes below 1e-30 (whose scales would overflow or lose precision); the
// float kernel takes those.
struct Digits {
  int64_t chunks = 0;
  std::vector<int8_t> digits;
  std::vector<int32_t> offsets;
  std::vector<float> scales;
  std::vector<uint8_t> four;
};

VNNI_TARGET const Digits* to_digits(const float* x, int64_t M, int64_t K, bool four) {
  thread_local Digits d;
  d.chunks = (K + CHUNK - 1) / CHUNK;
  d.digits.resize(M * DIGITS * K), d.offsets.resize(M * d.chunks * DIGITS * 16);
  d.scales.resize(M * d.chunks), d.four.resize(M * d.chunks);
  // The largest magnitude becomes 127 * 2^16, or 127 * 2^24 with four digits: rounded up a
  // little, it still fits the digits (up to 127 * 0x010101 or 127 * 0x01010101) and int32.
  const __m512i half = _mm512_set1_epi32(128), byte = _mm512_set1_epi32(255);
  const __m512i u128 = _mm512_set1_epi8(-128);  // bytes 0x80: 128 where taken as unsigned
  for (int64_t c = 0; c < M * d.chunks; c++) {
    const int64_t m = c / d.chunks, begin = c % d.chunks * CHUNK, end = std::min(K, begin + CHUNK);
    const float* xm = x + m * K;
    int8_t* digits = &d.digits[m * DIGITS * K];
    __m512 most = _mm512_setzero_ps(), total = _mm512_setzero_ps();
    __mmask16 nan = 0;
    for (int64_t k = begin; k < end; k += 16) {
      const __m512 v = _mm512_abs_ps(_mm512_loadu_ps(xm + k));
      most = _mm512_max_ps(most, v), total = _mm512_add_ps(total, v), nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    }
    const float amax = _mm512_reduce_max_ps(most);
    if (nan || std::isinf(amax) || (amax > 0 && amax < 1e-30f)) return nullptr;
    d.four[c] = four || amax * (end - begin) > OUTLIER * _mm512_reduce_add_ps(total);
    const float top = 127.0f * (d.four[c] ? 1 << 24 : 1 << 16);
    const __m512 scale = _mm512_set1_ps(amax > 0 ? top / amax : 0.0f);
    d.scales[c] = amax > 0 ? amax / top : 0.0f;
    __m512i sums[DIGITS];
    for (__m512i& sum : sums) sum = _mm512_setzero_si512();
    for (int64_t k = begin; k < end; k += BLOCK) {
      for (int part = 0; part < 4; part++) {
        __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(xm + k + 16 * part), scale));
        for (int i = 0; i < DIGITS; i++) {  // the lowest digit, in [-128, 128), and what is left of v
          const __m512i digit = _mm512_sub_epi32(_mm512_and_si512(_mm512_add_epi32(v, half), byte), half);
          v = _mm512_srai_epi32(_mm512_sub_epi32(v, digit), 8);
          __m128i* at = reinterpret_cast<__m128i*>(&digits[DIGITS * k + i * BLOCK + 16 * part]);
          _mm_storeu_si128(at, _mm512_cvtepi32_epi8(digit));
        }
      }
      for (int i = 0; i < DIGITS; i++)
        sums[i] = _mm512_dpbusd_epi32(sums[i], u128, _mm512_loadu_si512(&digits[DIGITS * k + i * BLOCK]));
    }
    for (int i = 0; i < DIGITS; i++)
      _mm512_storeu_si512(&d.offsets[(c * DIGITS + i) * 16], _mm512_sub_epi32(_mm512_setzero_si512(), sums[i]));
  }
  return &d;
}

// int8 weight rows 0, apart, .., (R - 1) * apart (one scale each) against the M input rows of x's
// digits; out[m * N + r * apart]. Rows go front to back, R streams at once (see in_streams).
template <int M, int R>
VNNI_TARGET void int8_rows_vnni(const Digits& x, int64_t K, const int8_t* q, int64_t apart, const float* scales,
                                float* out, int64_t N) {
  const __m512i flip = _mm512_set1_epi8(-128);
  __m512 sum[M][R];
  for (auto& a : sum)
    for (auto& s : a) s = _mm512_setzero_ps();
  for (int64_t c = 0; c < x.chunks; c++) {
    __m512i a[M][R][DIGITS];
    for (int m = 0; m < M; m++)
      for (int r = 0; r < R; r++)
        for (int i = 0; i < DIGITS; i++)
          a[m][r][i] = _mm512_loadu_si512(&x.offsets[((m * x.chunks + c) * DIGITS + i) * 16]);
    for (int64_t k = c * CHUNK; k < std::min(K, (c + 1) * CHUNK); k += BLOCK) {
      __m512i w[R];
      for (int r = 0; r < R; r++) {
        if constexpr (M == 1)
          prefetch_l2(q + r * apart * K + k + AHEAD);
        else
          prefetch(q + r * apart * K + k + AHEAD);
        w[r] = _mm512_xor_si512(_mm512_loadu_si512(q + r * apart * K + k), flip);  // w + 128, unsigned
      }
      for (int m = 0; m < M; m++) {
        const int8_t* d = &x.digits[m * DIGITS * K + DIGITS * k];
        const int digits = x.four[m * x.chunks + c] ? 4 : 3;  // the same for every weight row: predicted
        for (int i = 0; i < digits; i++) {
          const __m512i di = _mm512_loadu_si512(d + i * BLOCK);
          for (int r = 0; r < R; r++) a[m][r][i] = _mm512_dpbusd_epi32(a[m][r][i], w[r], di);
        }
      }
    }
    for (int m = 0; m < M; m++)
      for (int r = 0; r < R; r++) {
        __m512 value = _mm512_cvtepi32_ps(a[m][r][DIGITS - 1]);  // the digits' sums, highest first
        for (int i = DIGITS - 2; i >= 0; i--)
          value = _mm512_fmadd_ps(value, _mm512_set1_ps(256.0f), _mm512_cvtepi32_ps(a[m][r][i]));
        sum[m][r] = _mm512_fmadd_ps(value, _mm512_set1_ps(x.scales[m * x.chunks + c]), sum[m][r]);
      }
  }
  for (int m = 0; m < M; m++)
    for (int r = 0; r < R; r++) out[m * N + r * apart] = _mm512_reduce_add_ps(sum[m][r]) * scales[r * apart];
}

// out (M, total): x (M, K), up to four rows, against the rows of each int8 weight.
VNNI_TARGET at::Tensor int8_vnni(const Digits& digits, const at::Tensor& x, const Weights& weights,
                                 const std::vector<at::Tensor>& q, const std::vector<at::Tensor>& scales) {
  const int64_t M = x.size(0), K = x.size(1), N = weights.total;
  at::Tensor out = weights.output(x);
  const std::vector<const int8_t*> qp = pointers<int8_t>(q);
  const std::vector<const float*> sp = pointers<float>(scales);
  at::parallel_for(0, weights.total, GRAIN, [&](int64_t begin, int64_t end) {
    weights.each(begin, end, [&](size_t i, int64_t first, int64_t last) {
      float* op = weights.column(out, i);
      auto rows = [&]<int I>() {
        int64_t n = first;
        // Streams on every CPU: each vector of one input row's digits loaded then serves STREAMS
        // weight rows. One row at a time loads one for each multiply, which on an AMD Zen 4 held
        // the 110M model's int8 products to 6.1 ms a step, against 4.6 with streams.
        if constexpr (I == 1)
          n = in_streams(true, first, last, [&](int64_t r, int64_t apart) {
            int8_rows_vnni<1, STREAMS>(digits, K, qp[i] + r * K, apart, sp[i] + r, op + r, N);
          });
        for (; n < last; n++) int8_rows_vnni<I, 1>(digits, K, qp[i] + n * K, 1, sp[i] + n, op + n, N);
      };
      switch (M) {
        case 1: rows.template operator()<1>(); break;
        case 2: rows.template operator()<2>(); break;
        case 3: rows.template operator()<3>(); break;
        default: rows.template operator()<4>(); break;
      }
    });
  });
  return out;
}

// int8 rows against two to eight input rows on a CPU with AMX (Intel since Sapphire Rapids),
// whose tile instruction multiplies 16 weight rows of 64 columns by 16 columns of 64 signed digits
// at once: the input rows' four digits each (column m * 4 + i) are the columns, in one tile of
// them or two, and the weight rows load where they lie. Per chunk of the input (256 columns) the
// integer sums go to fp32 (exactly: each is below 2^24) and onto one fp32 sum per weight row and
// column, weighted by 256^i times the chunk's scale; an input row's columns add up at the end.
// (One input row streams faster through VNNI, whose four streams a core follows better than the
// tiles' 16 rows at a time.)
#define AMX_TARGET __attribute__((target("avx512bw,avx512vnni,amx-tile,amx-int8")))

bool amx() {
  static const bool has = [] {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(d & (1u << 24)) || !(d & (1u << 25))) return false;
#if defined(__linux__)
    // Linux hands a process the tiles' state only when asked (ARCH_REQ_XCOMP_PERM, XTILEDATA).
    return syscall(SYS_arch_prctl, 0x1023, 18) == 0;
#else
    return false;
#endif
  }();
  return has;
}

constexpr int TILE = 16;  // weight rows to a tile, and columns of digits
constexpr int64_t AMX_ROWS = 2 * TILE / DIGITS;  // input rows: two tiles of columns

// 0, step, .., 15 * step: where 16 rows of a column lie, for a gather or a scatter.
inline __m512i strided(int32_t step) {
  return _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), _mm512_set1_epi32(step));
}

// The digits of x's rows as the tile instruction takes them: per block of 64 columns and tile of
// columns, 16 rows of 16 columns of 4 consecutive digits; per chunk, each column's 256^i * scale.
struct Tiles {
  int64_t tiles = 1;
  std::vector<uint32_t> digits;
  std::vector<float> weights;
};

const Tiles& to_tiles(const Digits& x, int64_t M, int64_t K) {
  thread_local Tiles t;
  t.tiles = (M * DIGITS + TILE - 1) / TILE;
  t.digits.assign(K / BLOCK * t.tiles * TILE * TILE, 0), t.weights.assign(x.chunks * 2 * TILE, 0.0f);
  for (int64_t m = 0; m < M; m++)
    for (int i = 0; i < DIGITS; i++) {
      const int64_t column = m * DIGITS + i, tile = column / TILE;
      for (int64_t b = 0; b < K / BLOCK; b++)  // a block's 64 digits, as 16 words down a column
        _mm512_i32scatter_epi32(&t.digits[(b * t.tiles + tile) * TILE * TILE + column % TILE], strided(TILE),
                                _mm512_loadu_si512(&x.digits[m * DIGITS * K + DIGITS * b * BLOCK + i * BLOCK]), 4);
      for (int64_t c = 0; c < x.chunks; c++) t.weights[c * 2 * TILE + column] = x.scales[m * x.chunks + c] * float(1 << (8 * i));
    }
  return t;
}

// This thread's tiles: 0 and 1, the sums; 2, 16 weight rows; 3 and 4, the digits; 16 rows of 64
// bytes each. (In memory that lasts: GCC's ldtilecfg takes its operand for 8 bytes, and so may
// drop the stores of a local's other 56.)
struct alignas(64) TileConfig {
  uint8_t palette, start, reserved[14];
  uint16_t bytes[16];
  uint8_t rows[16];
};
constexpr TileConfig TILES = {1, 0, {}, {64, 64, 64, 64, 64}, {TILE, TILE, TILE, TILE, TILE}};
AMX_TARGET void configure_tiles() { _tile_loadconfig(&TILES); }
AMX_TARGET void release_tiles() { _tile_release(); }

// Weight rows [0, 16) against the tiles' M input rows; out[m * N + r] for the first `rows`.
AMX_TARGET void int8_tile_rows(const Tiles& x, int64_t M, int64_t chunks, int64_t K, const int8_t* q,
                               const float* scales, float* out, int64_t N, int64_t rows) {
  alignas(64) int32_t sums[TILE][TILE];
  alignas(64) float total[TILE][2 * TILE] = {};
  auto add = [&](int tile, int64_t c) {  // the sums of one tile of columns, weighted, onto the totals
    const __m512 w = _mm512_loadu_ps(&x.weights[(c * 2 + tile) * TILE]);
    for (int r = 0; r < TILE; r++) {
      float* t = &total[r][tile * TILE];
      _mm512_store_ps(t, _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512(sums[r])), w, _mm512_load_ps(t)));
    }
  };
  for (int64_t c = 0; c < chunks; c++) {
    _tile_zero(0);
    _tile_zero(1);
    for (int64_t k = c * CHUNK; k < std::min(K, (c + 1) * CHUNK); k += BLOCK) {
      // The tiles read 16 rows side by side, which the hardware prefetcher follows poorly: ask
      // for the next 16 rows front to back meanwhile, 1 KiB a step.
      for (int r = 0; r < TILE; r++) prefetch(q + TILE * K + k / BLOCK * 1024 + 64 * r);
      const uint32_t* d = &x.digits[k / BLOCK * x.tiles * TILE * TILE];
      _tile_loadd(2, q + k, K);
      _tile_loadd(3, d, TILE * 4);
      _tile_dpbssd(0, 2, 3);
      if (x.tiles == 2) {
        _tile_loadd(4, d + TILE * TILE, TILE * 4);
        _tile_dpbssd(1, 2, 4);
      }
    }
    _tile_stored(0, sums, TILE * 4);
    add(0, c);
    if (x.tiles == 2) {
      _tile_stored(1, sums, TILE * 4);
      add(1, c);
    }
  }
  // Each input row's four columns, 16 weight rows at a time: gathered down the totals' columns.
  const __mmask16 valid = static_cast<__mmask16>((1u << rows) - 1);
  const __m512i down = strided(2 * TILE);
  const __m512 scale = _mm512_maskz_loadu_ps(valid, scales);
  for (int64_t m = 0; m < M; m++) {
    __m512 sum[DIGITS];
    for (int i = 0; i < DIGITS; i++) sum[i] = _mm512_i32gather_ps(down, &total[0][m * DIGITS + i], 4);
    const __m512 value = _mm512_add_ps(_mm512_add_ps(sum[0], sum[1]), _mm512_add_ps(sum[2], sum[3]));
    _mm512_mask_storeu_ps(out + m * N, valid, _mm512_mul_ps(value, scale));
  }
}

// out (M, total): x (M, K), two to eight rows in four digits each, against the rows of int8
// weight i, 16 at a time; the last few of a thread's rows from a copy padded with zero rows.
AMX_TARGET at::Tensor int8_amx(const Digits& digits, const at::Tensor& x, const Weights& weights,
                               const std::vector<at::Tensor>& q, const std::vector<at::Tensor>& scales) {
  const int64_t M = x.size(0), K = x.size(1), N = weights.total;
  const Tiles& tiles = to_tiles(digits, M, K);
  at::Tensor out = weights.output(x);
  const std::vector<const int8_t*> qp = pointers<int8_t>(q);
  const std::vector<const float*> sp = pointers<float>(scales);
  at::parallel_for(0, weights.total, GRAIN, [&](int64_t begin, int64_t end) {
    configure_tiles();
    weights.each(begin, end, [&](size_t i, int64_t first, int64_t last) {
      float* op = weights.column(out, i);
      int64_t n = first;
      for (; n + TILE <= last; n += TILE)
        int8_tile_rows(tiles, M, digits.chunks, K, qp[i] + n * K, sp[i] + n, op + n, N, TILE);
      if (n < last) {
        thread_local std::vector<int8_t> padded;
        padded.assign(TILE * K, 0);
        std::memcpy(padded.data(), qp[i] + n * K, (last - n) * K);
        int8_tile_rows(tiles, M, digits.chunks, K, padded.data(), sp[i] + n, op + n, N, last - n);
      }
    });
    release_tiles();
  });
  return out;
}
#endif

// The callers (llama/kernels.py) hand over only what these checks pass; they guard the memory.
void check_input(const at::Tensor& x, const std::vector<at::Tensor>& ws) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x must be contiguous fp32 (M, K)");
  TORCH_CHECK(x.size(1) % L == 0, "the input width must be a multiple of ", L);
  TORCH_CHECK(!ws.empty(), "give at least one weight");
  for (const at::Tensor& w : ws) {
    TORCH_CHECK(w.dim() == 2 && w.is_contiguous(), "the weight must be a contiguous matrix");
    TORCH_CHECK(w.scalar_type() == ws[0].scalar_type(), "the weights differ in dtype");
  }
}

template <typename T>
at::Tensor dense(const at::Tensor& x, const std::vector<at::Tensor>& ws, const std::vector<at::Tensor>& scales) {
  const int64_t K = x.size(1);
  const Weights weights(ws);
  const std::vector<const T*> wp = pointers<T>(ws);
  const std::vector<const float*> sp = pointers<float>(scales);
  return products(x, weights, [&]<int M, int R>(size_t i, const float* xm, int64_t n, int64_t apart, float* out) {
    dense_rows<M, R, T>(xm, K, wp[i] + n * K, apart, sp.empty() ? nullptr : sp[i] + n, out, weights.total);
  });
}

at::Tensor matvec(const at::Tensor& x, const std::vector<at::Tensor>& ws) {
  check_input(x, ws);
  for (const at::Tensor& w : ws) TORCH_CHECK(w.size(1) == x.size(1), "x and the weight differ in width");
  return by_float_type(ws[0].scalar_type(), "matvec takes fp32, bf16 or fp16 weights",
                       [&]<typename T>(T) { return dense<T>(x, ws, {}); });
}

void check_scales(const std::vector<at::Tensor>& q, const std::vector<at::Tensor>& scales, int64_t per_row,
                  const char* what) {
  TORCH_CHECK(scales.size() == q.size(), "give one scales tensor per weight");
  for (size_t i = 0; i < q.size(); i++)
    TORCH_CHECK(scales[i].scalar_type() == at::kFloat && scales[i].is_contiguous() &&
                    scales[i].numel() == q[i].size(0) * per_row,
                "scales must be fp32 ", what);
}

at::Tensor int8_matvec(const at::Tensor& x, const std::vector<at::Tensor>& q,
                       const std::vector<at::Tensor>& scales) {
  check_input(x, q);
  for (const at::Tensor& w : q) TORCH_CHECK(w.scalar_type() == at::kChar && w.size(1) == x.size(1), "q must be int8 (N, K)");
  check_scales(q, scales, 1, "(N,)");
#if defined(__AVX512F__)
  // Two to eight input rows through AMX, where the CPU has it; up to four through VNNI (five to
  // eight, in two passes with four digits for every chunk, were no faster than the float kernel,
  // which converts each weight once for all of them).
  const int64_t M = x.size(0), K = x.size(1);
  const bool tiles = M >= 2 && M <= AMX_ROWS && amx();
  if ((tiles || (M <= 4 && vnni())) && K % BLOCK == 0)
    if (const Digits* digits = to_digits(x.data_ptr<float>(), M, K, tiles))
      return tiles ? int8_amx(*digits, x, Weights(q), q, scales) : int8_vnni(*digits, x, Weights(q), q, scales);
#endif
  return dense<int8_t>(x, q, scales);
}

at::Tensor int4_matvec(const at::Tensor& x, const std::vector<at::Tensor>& q,
                       const std::vector<at::Tensor>& scales, int64_t g) {
  const int64_t K = x.size(1);
  check_input(x, q);
  TORCH_CHECK(g % (2 * L) == 0, "the group size must be a multiple of ", 2 * L);
  for (const at::Tensor& w : q)
    TORCH_CHECK(w.scalar_type() == at::kByte && w.size(1) * 2 == K && K % g == 0, "q must be uint8 (N, K / 2)");
  check_scales(q, scales, K / g, "(N, K / group_size)");
  const Weights weights(q);
#if defined(__AVX512F__)
  if (x.size(0) == 1 && bf16_dot() && K % (2 * STEP) == 0) return int4_dot(x, weights, q, scales, g);
#endif
  const std::vector<const uint8_t*> qp = pointers<uint8_t>(q);
  const std::vector<const float*> sp = pointers<float>(scales);
  return products(x, weights, [&]<int M, int R>(size_t i, const float* xm, int64_t n, int64_t apart, float* out) {
    int4_rows<M, R>(xm, K, g, qp[i] + n * (K / 2), apart, sp[i] + n * (K / g), out, weights.total);
  });
}

// L floats as T, rounded to the nearest (ties to even), as torch's conversions round.
inline void put(float* p, floats v) { store(p, v); }
inline void put(c10::BFloat16* p, floats v) {
  __m256i bits = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  bits = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(bits, bits), 0xD8);  // lanes kept in order
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
}
inline void put(c10::Half* p, floats v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
}

// Rows [begin, end) of the weight that int8 or int4 values stand for, as rows of T at `out`.
template <typename T>
void dequantize_rows(const at::Tensor& q, const float* scales, int64_t K, int64_t g, int64_t begin, int64_t end,
                     T* out) {
  const bool int4 = q.scalar_type() == at::kByte;
  const int64_t groups = int4 ? K / g : 1;
  for (int64_t n = begin; n < end; n++) {
    T* row = out + (n - begin) * K;
    if (!int4) {
      const int8_t* qn = q.data_ptr<int8_t>() + n * K;
      const floats scale = _mm256_set1_ps(scales[n]);
      for (int64_t k = 0; k < K; k += L) put(row + k, _mm256_mul_ps(widen(qn + k), scale));
      continue;
    }
    for (int64_t j = 0; j < groups; j++) {
      const Levels levels(scales[n * groups + j]);
      const uint8_t* qj = q.data_ptr<uint8_t>() + n * (K / 2) + j * (g / 2);
      for (int64_t b = 0; b < g / 2; b += L) {
        floats low, high;
        widen(qj + b, levels, low, high);
        put(row + j * g + b, low);
        put(row + j * g + g / 2 + b, high);
      }
    }
  }
}

// The width K of int8 or int4 values q (N, K or K / 2), checked with their scales.
int64_t check_quantized(const at::Tensor& q, const at::Tensor& scales, int64_t g) {
  const bool int4 = q.scalar_type() == at::kByte;
  const int64_t N = q.size(0), K = int4 ? 2 * q.size(1) : q.size(1);
  TORCH_CHECK(q.dim() == 2 && q.is_contiguous() && (int4 || q.scalar_type() == at::kChar), "q must be int8 or uint8");
  TORCH_CHECK(int4 ? g % (2 * L) == 0 && K % g == 0 : K % L == 0, "the width or group size is not a multiple of ", L);
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() && scales.numel() == N * (int4 ? K / g : 1),
              "scales must be fp32, one per row or group");
  return K;
}

// The weight that int8 or int4 values stand for, in fp32, bf16 or fp16: converted from the fp32
// products in the same pass, not written out in fp32 first and read back.
at::Tensor dequantize(const at::Tensor& q, const at::Tensor& scales, int64_t g, at::ScalarType dtype) {
  const int64_t N = q.size(0), K = check_quantized(q, scales, g);
  return by_float_type(dtype, "dtype must be fp32, bf16 or fp16", [&]<typename T>(T) {
    at::Tensor out = at::empty({N, K}, scales.options().dtype(dtype));
    at::parallel_for(0, N, GRAIN, [&](int64_t begin, int64_t end) {
      dequantize_rows(q, scales.data_ptr<float>(), K, g, begin, end, out.data_ptr<T>() + begin * K);
    });
    return out;
  });
}

// x (M, K) times the weight int8 or int4 values stand for, in x's dtype, for prefill's many rows.
// Each thread turns a few of its weight rows at a time into x's dtype, in a buffer its own cache
// holds, and multiplies them there (by torch's BLAS, on that thread alone); converted a large tile
// at a time for all threads' products, the floats went out to memory and back. Fewer rows than
// MIN_ROWS at a time (wide weights) spent more time repacking x for each product than they saved.
constexpr int64_t TILE_BYTES = 1 << 19, MIN_ROWS = 64;
at::Tensor dequantized_product(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scales, int64_t g) {
  const int64_t M = x.size(0), N = q.size(0), K = check_quantized(q, scales, g);
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K && x.is_contiguous(), "x must be (M, K), contiguous");
  const int64_t rows = std::max<int64_t>(MIN_ROWS, TILE_BYTES / (x.element_size() * K) / L * L);
  return by_float_type(x.scalar_type(), "x must be fp32, bf16 or fp16", [&]<typename T>(T) {
    at::Tensor out = at::empty({M, N}, x.options());
    at::parallel_for(0, N, rows, [&](int64_t begin, int64_t end) {
      c10::InferenceMode plain;  // torch's own threads do not inherit the caller's mode: its views here need none
      at::Tensor tile = at::empty({std::min(rows, end - begin), K}, x.options());
      for (int64_t n = begin; n < end; n += rows) {
        const int64_t count = std::min(rows, end - n);
        dequantize_rows(q, scales.data_ptr<float>(), K, g, n, n + count, tile.data_ptr<T>());
        at::Tensor products = out.narrow(1, n, count);
        at::mm_out(products, x, tile.narrow(0, 0, count).t());
      }
    });
    return out;
  });
}

// q . k[t] for the 8 keys [t, t + 8) (k at the first), as one vector: eight sums side by side,
// which a decode step's many keys keep busy, rather than one sum at a time and its horizontal add.
// Each key's row is read front to back, in the order memory streams it: read side by side, a
// column of the eight rows at a time, the keys took a fifth longer from memory.
template <typename T>
inline floats eight_scores(const float* q, const T* k, int64_t step, int64_t D) {
  floats sum[8];
  for (int j = 0; j < 8; j++) {
    floats a = zero(), b = zero();  // two sums, so that each multiply-add waits on half as many
    int64_t d = 0;
    for (; d + 2 * L <= D; d += 2 * L) {
      a = fma(load(q + d), widen(k + j * step + d), a);
      b = fma(load(q + d + L), widen(k + j * step + d + L), b);
    }
    if (d < D) a = fma(load(q + d), widen(k + j * step + d), a);
    sum[j] = add(a, b);
  }
  // Pairwise sums within each half of the vectors, then the halves added: key j's total in lane j.
  const floats s03 = _mm256_hadd_ps(_mm256_hadd_ps(sum[0], sum[1]), _mm256_hadd_ps(sum[2], sum[3]));
  const floats s47 = _mm256_hadd_ps(_mm256_hadd_ps(sum[4], sum[5]), _mm256_hadd_ps(sum[6], sum[7]));
  return add(_mm256_permute2f128_ps(s03, s47, 0x20), _mm256_permute2f128_ps(s03, s47, 0x31));
}

// e^x in each lane, for softmax's x <= 0, to a few ulp: x = n ln 2 + r with |r| <= ln 2 / 2, e^r
// by Taylor's series to r^7 (the rest is under 1e-8 of it), 2^n put in the exponent. Below -87,
// where e^x nears float's smallest normal number, it gives e^-87; NaN stays NaN.
inline floats exp_lanes(floats x) {
  x = _mm256_max_ps(_mm256_set1_ps(-87.0f), x);
  const floats n =
      _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  floats r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  // ln 2 in two parts: n times the first is exact
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.1219444e-4f), r);
  floats y = _mm256_set1_ps(1.0f / 5040);
  for (float c : {1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 1.0f / 2}) y = fma(y, r, _mm256_set1_ps(c));
  y = fma(y, _mm256_mul_ps(r, r), add(r, _mm256_set1_ps(1.0f)));
  const __m256i two_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(two_n));
}

inline float largest(floats v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}

// out[0, V * L) += the sum over rows t in [first, last) of p[t] * v[t][0, V * L): each value row
// read front to back, the V sums kept in registers.
template <int V, typename T>
inline void add_weighted(const float* p, const T* v, int64_t step, int64_t first, int64_t last, float* out) {
  floats sum[V];
  for (int j = 0; j < V; j++) sum[j] = load(out + j * L);
  for (int64_t t = first; t < last; t++) {
    if (p[t] == 0) continue;  // not visible
    const floats w = _mm256_set1_ps(p[t]);
    for (int j = 0; j < V; j++) sum[j] = fma(w, widen(v + t * step + j * L), sum[j]);
  }
  for (int j = 0; j < V; j++) store(out + j * L, sum[j]);
}

// Scores s[0, len) become softmax's weights, not yet divided by their sum, which is returned: a vector
// at a time, where a key not visible, and the lanes up to the next whole vector, score -inf and weigh
// 0. With no key visible, every weight and the sum are 0.
inline float softmax(float* s, int64_t len, const bool* visible, float scale) {
  int64_t t = len;
  for (; t % L; t++) s[t] = -INFINITY;
  if (visible)
    for (t = 0; t < len; t++)
      if (!visible[t]) s[t] = -INFINITY;
  const floats scaled = _mm256_set1_ps(scale), none = _mm256_set1_ps(-INFINITY);
  floats tops = none;
  for (t = 0; t < len; t += L) {
    const floats x = _mm256_mul_ps(load(s + t), scaled);
    store(s + t, x);
    tops = _mm256_max_ps(tops, x);
  }
  const floats top = _mm256_set1_ps(largest(tops));
  floats sums = zero();
  for (t = 0; t < len; t += L) {
    const floats x = load(s + t), weighs = _mm256_cmp_ps(x, none, _CMP_NEQ_UQ);
    const floats e = _mm256_and_ps(exp_lanes(_mm256_sub_ps(x, top)), weighs);  // all 0 where top is -inf
    store(s + t, e);
    sums = add(sums, e);
  }
  return total(sums);
}

constexpr int64_t VALUE_ROWS = 32;  // value rows that stay in the L1 cache while each query head adds them

// Attention of one new token per sequence over the keys and values cached for it, which is a
// decode step's attention, for `heads` query heads that share one key-value head (one, or a group
// of grouped-query attention): q (heads, D), k and v (len, D) rows `step` apart, `visible` (len)
// or none; scores (heads, room) with room >= len rounded up to a whole vector. Scores, softmax and
// the weighted sum are fp32. Each key and value row is read once for all the heads, front to back:
// eight keys, then a block of values, are read from memory for the first head and from the L1
// cache for the rest.
template <typename T>
void attend_heads(const float* q, int64_t heads, const T* k, const T* v, int64_t step, int64_t len, int64_t D,
                  const bool* visible, float* scores, int64_t room, float* out) {
  int64_t t = 0;
  for (; t + 8 <= len; t += 8)
    for (int64_t h = 0; h < heads; h++) store(scores + h * room + t, eight_scores(q + h * D, k + t * step, step, D));
  for (; t < len; t++)
    for (int64_t h = 0; h < heads; h++)
      dense_rows<1, 1, T>(q + h * D, D, k + t * step, 1, nullptr, scores + h * room + t, 1);
  std::vector<float> sums(heads);
  for (int64_t h = 0; h < heads; h++)
    sums[h] = softmax(scores + h * room, len, visible, 1.0f / std::sqrt(static_cast<float>(D)));
  std::fill(out, out + heads * D, 0.0f);
  for (int64_t first = 0; first < len; first += VALUE_ROWS) {
    const int64_t last = std::min(len, first + VALUE_ROWS);
    for (int64_t h = 0; h < heads; h++) {
      const float* p = scores + h * room;
      float* o = out + h * D;
      switch (D / L) {  // Llama 2's heads are 128 wide; smaller models' 64
        case 16: add_weighted<16>(p, v, step, first, last, o); break;
        case 8: add_weighted<8>(p, v, step, first, last, o); break;
        default:
          for (int64_t d = 0; d < D; d += L) add_weighted<1>(p, v + d, step, first, last, o + d);
      }
    }
  }
  for (int64_t h = 0; h < heads; h++) {  // no key visible: the output stays 0
    const floats share = _mm256_set1_ps(sums[h] > 0 ? 1.0f / sums[h] : 0.0f);
    for (int64_t d = 0; d < D; d += L) store(out + h * D + d, _mm256_mul_ps(load(out + h * D + d), share));
  }
}

// The query heads of each key-value head go to the threads together, split in parts where there are
// fewer key-value heads (times sequences) than threads.
template <typename T>
void attend_all(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const bool* visible, at::Tensor& out) {
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3), KV = k.size(1), len = k.size(2), G = H / KV;
  const int64_t wanted = std::min<int64_t>(G, (at::get_num_threads() + B * KV - 1) / (B * KV));
  const int64_t per = (G + wanted - 1) / wanted, parts = (G + per - 1) / per;  // query heads to a part
  const int64_t room = (len + L - 1) / L * L;
  const T* qp = reinterpret_cast<const T*>(q.data_ptr());
  const T* kp = reinterpret_cast<const T*>(k.data_ptr());
  const T* vp = reinterpret_cast<const T*>(v.data_ptr());
  T* op = reinterpret_cast<T*>(out.data_ptr());
  at::parallel_for(0, B * KV * parts, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(per * room), query(per * D), result(per * D);
    for (int64_t u = begin; u < end; u++) {
      const int64_t b = u / (KV * parts), kv = u / parts % KV, first = kv * G + u % parts * per;
      const int64_t heads = std::min(per, kv * G + G - first), at = (b * H + first) * D;
      for (int64_t i = 0; i < heads * D; i++) query[i] = static_cast<float>(qp[at + i]);
      const int64_t cached = b * k.stride(0) + kv * k.stride(1);  // k and v have the same strides
      attend_heads(query.data(), heads, kp + cached, vp + cached, k.stride(2), len, D,
                   visible ? visible + b * len : nullptr, scores.data(), room, result.data());
      for (int64_t i = 0; i < heads * D; i++) op[at + i] = static_cast<T>(result[i]);
    }
  });
}

at::Tensor attend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& visible) {
  TORCH_CHECK(q.dim() == 4 && q.size(2) == 1 && q.is_contiguous(), "q must be contiguous (batch, heads, 1, head_dim)");
  TORCH_CHECK(k.dim() == 4 && k.sizes() == v.sizes() && k.strides() == v.strides() && k.stride(3) == 1,
              "k and v must be alike (batch, kv_heads, positions, head_dim) with contiguous rows");
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(3) == q.size(3) && q.size(1) % k.size(1) == 0,
              "k and v must match q's batch and head size, with a whole number of query heads to each");
  TORCH_CHECK(q.size(3) % L == 0, "the head size must be a multiple of ", L);
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && k.scalar_type() == v.scalar_type(), "q, k and v differ in dtype");
  const bool* vis = nullptr;
  if (visible) {
    TORCH_CHECK(visible->scalar_type() == at::kBool && visible->is_contiguous() && visible->dim() == 2 &&
                    visible->size(0) == q.size(0) && visible->size(1) == k.size(2),
                "visible must be contiguous bool (batch, positions)");
    vis = visible->data_ptr<bool>();
  }
  at::Tensor out = at::empty(q.sizes(), q.options());
  by_float_type(q.scalar_type(), "attend takes fp32, bf16 or fp16",
                [&]<typename T>(T) { attend_all<T>(q, k, v, vis, out); });
  return out;
}

}  // namespace

TORCH_LIBRARY(llama, m) {
  m.def("matvec(Tensor x, Tensor[] weights) -> Tensor");
  m.def("int8_matvec(Tensor x, Tensor[] q, Tensor[] scales) -> Tensor");
  m.def("int4_matvec(Tensor x, Tensor[] q, Tensor[] scales, int group_size) -> Tensor");
  m.def("dequantize(Tensor q, Tensor scales, int group_size, ScalarType dtype) -> Tensor");
  m.def("dequantized_product(Tensor x, Tensor q, Tensor scales, int group_size) -> Tensor");
  m.def("attend(Tensor q, Tensor k, Tensor v, Tensor? visible) -> Tensor");
}

TORCH_LIBRARY_IMPL(llama, CPU, m) {
  m.impl("matvec", matvec);
  m.impl("int8_matvec", int8_matvec);
  m.impl("int4_matvec", int4_matvec);
  m.impl("dequantize", dequantize);
  m.impl("dequantized_product", dequantized_product);
  m.impl("attend", attend);
}
