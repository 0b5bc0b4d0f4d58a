// bf16 matrix multiply for the CPU backend, as an XLA FFI custom call: on Intel AMX tiles, or with
// AVX512-BF16 vector dot products (VDPBF16PS) on processors without AMX (AMD Zen 4/5, Intel
// Cooper Lake). Both read the same operand layout.
//
// out[M, N] = op(a)[M, K] . op(b)[K, N], bf16 operands, float32 accumulation, output bf16 or f32.
// op(a) is a (row-major [M, K]) or, with trans_a, the transpose of a stored [K, M]; op(b) is b
// ([K, N]), the transpose of b stored [N, K] (trans_b), or b already packed by `doa_amx_pack`.
// An unpacked b may be float32 (a weight kept in float32): it is rounded to bf16 as it is laid out.
//
// The product is cut into 32x32 blocks of the output. On AMX a block is held in four 16x16
// float32 tiles while the K dimension streams through two A tiles (16 rows x 32 values) and two
// B tiles (16 pairs of rows x 16 columns, the pair-interleaved layout TDPBF16PS reads). Both
// operands are first copied into "tile order": every 16x32 tile of A and every 16-pair x
// 16-column tile of B is 1 KiB of contiguous memory, in the order a block reads them, zero padded
// to multiples of 32. Loads then stream sequentially instead of striding by a power-of-two row
// pitch (which aliases in the L1 sets). Long K is summed in chunks through a float32 buffer.
// The vector path reads the same tiles: a row of a B tile is one 512-bit register of 16 column
// pairs, and a pair of an A row is broadcast against it, 8 rows x 32 columns of float32 sums in
// 16 registers at a time.
//
// Work is cut into chunks (a row panel sized for L2 times a group of 32-column strips) that the
// calling thread and helpers on XLA's own intra-op thread pool take from a shared counter: no
// second thread pool competes with XLA's, and a helper that starts late finds nothing left and
// returns at once, so the call never waits on a busy pool.

#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kArchReqXcompPerm = 0x1023;
constexpr int kXfeatureXtiledata = 18;
constexpr int64_t kTile = 512;  // bf16 values in one 16 x 32 tile

struct alignas(64) TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// Linux hands out the AMX tile state only after the process asks for it.
bool RequestAmx() {
  static const bool granted =
      syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  return granted;
}

void ConfigureTiles() {
  TileConfig cfg;
  std::memset(&cfg, 0, sizeof(cfg));
  cfg.palette_id = 1;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  _tile_loadconfig(&cfg);
}

inline int64_t RoundUp(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

struct Chunks {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  int64_t count = 0;
  bool tiles = false;
  std::function<void(int64_t)> run;
};

void TakeChunks(Chunks& c) {
  if (c.tiles) ConfigureTiles();
  int64_t mine = 0;
  for (int64_t i = c.next.fetch_add(1); i < c.count; i = c.next.fetch_add(1)) {
    c.run(i);
    ++mine;
  }
  if (c.tiles) _tile_release();
  c.done.fetch_add(mine);
}

// Runs run(0) ... run(count - 1), on this thread and up to `helpers` tasks of the pool.
void ParallelFor(ffi::ThreadPool* pool, int helpers, int64_t count, bool tiles,
                 std::function<void(int64_t)> run) {
  auto chunks = std::make_shared<Chunks>();
  chunks->count = count;
  chunks->tiles = tiles;
  chunks->run = std::move(run);
  helpers = static_cast<int>(std::min<int64_t>(helpers, count - 1));
  for (int h = 0; h < helpers && pool != nullptr; ++h) {
    pool->Schedule([chunks] { TakeChunks(*chunks); });
  }
  TakeChunks(*chunks);
  while (chunks->done.load(std::memory_order_acquire) < count) std::this_thread::yield();
}

// Grow-only scratch memory per calling thread, reused across calls: a fresh multi-MiB allocation
// per product would cost page faults (and zeroing) comparable to the packing itself.
template <typename T, int kSlot>
T* Scratch(int64_t count) {
  thread_local std::unique_ptr<T[]> buf;
  thread_local int64_t capacity = 0;
  if (count > capacity) {
    buf.reset(new T[count]);
    capacity = count;
  }
  return buf.get();
}

struct Par {
  ffi::ThreadPool* pool;
  int helpers;
};

// Transposes a 16 x 16 matrix of 32-bit values, row i in r[i]: pairs within 128-bit lanes, then
// quads, then the 4 x 4 matrix of lanes.
inline void Transpose16x16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  __m512i u[16];  // u[4q + c] lane l: rows 4q..4q+3 of column 4l + c
  for (int q = 0; q < 4; ++q) {
    u[4 * q] = _mm512_unpacklo_epi64(t[4 * q], t[4 * q + 2]);
    u[4 * q + 1] = _mm512_unpackhi_epi64(t[4 * q], t[4 * q + 2]);
    u[4 * q + 2] = _mm512_unpacklo_epi64(t[4 * q + 1], t[4 * q + 3]);
    u[4 * q + 3] = _mm512_unpackhi_epi64(t[4 * q + 1], t[4 * q + 3]);
  }
  for (int c = 0; c < 4; ++c) {
    const __m512i x0 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0x44);
    const __m512i x1 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0xEE);
    const __m512i y0 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0x44);
    const __m512i y1 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0xEE);
    r[c] = _mm512_shuffle_i32x4(x0, y0, 0x88);
    r[4 + c] = _mm512_shuffle_i32x4(x0, y0, 0xDD);
    r[8 + c] = _mm512_shuffle_i32x4(x1, y1, 0x88);
    r[12 + c] = _mm512_shuffle_i32x4(x1, y1, 0xDD);
  }
}

// Index vectors interleaving two registers of 32 bf16 value by value: with x0 and x1 two rows,
// permutex2var(x0, kPairsLo, x1) holds the 16 pairs (x0[c], x1[c]) of columns 0..15, and
// kPairsHi those of columns 16..31.
inline __m512i PairsLo() {
  return _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7,
                          38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
}
inline __m512i PairsHi() {
  return _mm512_set_epi16(63, 31, 62, 30, 61, 29, 60, 28, 59, 27, 58, 26, 57, 25, 56, 24, 55,
                          23, 54, 22, 53, 21, 52, 20, 51, 19, 50, 18, 49, 17, 48, 16);
}

inline __mmask32 FirstBits(int64_t count) {
  return count >= 32 ? ~__mmask32{0} : count <= 0 ? 0 : ((__mmask32{1} << count) - 1);
}

// The lanes of a 16-wide register that hold the first `cols` columns (none at or below 0).
inline __mmask16 HalfMask(int64_t cols) {
  return cols >= 16 ? 0xFFFF : (cols <= 0 ? 0 : static_cast<__mmask16>((1u << cols) - 1));
}

// Stores the lanes of x under mask: float32 as they are, or rounded to bf16 (nearest even).
inline void StoreRow(float* dst, __m512 x, __mmask16 mask) { _mm512_mask_storeu_ps(dst, mask, x); }
inline void StoreRow(uint16_t* dst, __m512 x, __mmask16 mask) {
  _mm256_mask_storeu_epi16(dst, mask, reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(x)));
}

// Typed views of FFI buffers, and a call of f with a value of the element type that bf16 (as
// uint16_t bits) or float32 buffers hold.
template <typename T>
const T* In(const ffi::AnyBuffer& b) { return reinterpret_cast<const T*>(b.untyped_data()); }
template <typename T>
T* Out(ffi::Result<ffi::AnyBuffer>& b) { return reinterpret_cast<T*>(b->untyped_data()); }
template <typename F>
void ForElementType(ffi::DataType t, F&& f) {
  if (t == ffi::DataType::BF16) {
    f(uint16_t{});
  } else {
    f(float{});
  }
}

// op(a) [M, K] in tile order: for each 32-row block i and 32-wide K step t, two tiles (rows
// i..i+15, then i+16..i+31), each 16 rows of 32 values: offset ((i/32 * kb + t) * 2 + h) * 512.
void PackA(const Par& par, const uint16_t* a, int64_t m, int64_t k, bool trans, int64_t mp,
           int64_t kp, uint16_t* dst) {
  const int64_t kb = kp / 32;
  ParallelFor(par.pool, par.helpers, mp / 32, false, [=](int64_t mi) {
    uint16_t* blocks = dst + mi * kb * 2 * kTile;
    if (!trans) {
      for (int64_t t = 0; t < kb; ++t) {
        const int64_t k0 = t * 32, valid = std::min<int64_t>(32, k - k0);
        for (int64_t r = 0; r < 32; ++r) {
          const int64_t i = mi * 32 + r;
          uint16_t* row = blocks + (t * 2 + r / 16) * kTile + (r % 16) * 32;
          if (i < m && valid == 32) {
            std::memcpy(row, a + i * k + k0, 64);
          } else {
            for (int64_t c = 0; c < 32; ++c) row[c] = (i < m && c < valid) ? a[i * k + k0 + c] : 0;
          }
        }
      }
      return;
    }
    // a is stored [K, M]: the pair (k, k + 1) of op(a)'s row i is a[k][i], a[k + 1][i]. Two rows
    // of a across 32 columns interleave into the pairs p of 32 tile rows; 16 such p are a 16 x 16
    // matrix per tile, transposed into its rows.
    const __m512i lo = PairsLo(), hi = PairsHi();
    const __mmask32 cols = FirstBits(m - mi * 32);
    for (int64_t t = 0; t < kb; ++t) {
      __m512i top[16], bottom[16];  // [p] lane r: pair p of tile row r (rows 0..15, 16..31)
      for (int64_t p = 0; p < 16; ++p) {
        const int64_t k0 = t * 32 + 2 * p;
        const __m512i x0 = k0 < k ? _mm512_maskz_loadu_epi16(cols, a + k0 * m + mi * 32)
                                  : _mm512_setzero_si512();
        const __m512i x1 = k0 + 1 < k ? _mm512_maskz_loadu_epi16(cols, a + (k0 + 1) * m + mi * 32)
                                      : _mm512_setzero_si512();
        top[p] = _mm512_permutex2var_epi16(x0, lo, x1);
        bottom[p] = _mm512_permutex2var_epi16(x0, hi, x1);
      }
      Transpose16x16(top);
      Transpose16x16(bottom);
      uint16_t* tiles = blocks + t * 2 * kTile;
      for (int r = 0; r < 16; ++r) {
        _mm512_storeu_si512(tiles + r * 32, top[r]);
        _mm512_storeu_si512(tiles + kTile + r * 32, bottom[r]);
      }
    }
  });
}

// 32 consecutive values (those under `mask`, the rest 0) as 32 bf16 in one register.
inline __m512i Load32Bf16(const uint16_t* src, __mmask32 mask) {
  return _mm512_maskz_loadu_epi16(mask, src);
}
inline __m512i Load32Bf16(const float* src, __mmask32 mask) {
  const __m512 lo = _mm512_maskz_loadu_ps(static_cast<__mmask16>(mask), src);
  const __m512 hi = _mm512_maskz_loadu_ps(static_cast<__mmask16>(mask >> 16), src + 16);
  return reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo));
}

// op(b) [K, N] in tile order: for each 32-column strip s and 32-deep K step t, two tiles
// (columns s*32..+15, then +16..+31), each 16 pairs of K rows x 16 columns x 2:
// offset ((s * kb + t) * 2 + h) * 512 + p * 32 + c * 2 + (k % 2). A float32 b (a weight kept in
// float32) is rounded to bf16 on the way, so no separate conversion pass reads it first.
template <typename T>
void PackB(const Par& par, const T* b, int64_t k, int64_t n, bool trans, int64_t kp,
           int64_t np, uint16_t* dst) {
  const int64_t kb = kp / 32;
  ParallelFor(par.pool, par.helpers, np / 32, false, [=](int64_t s) {
    uint16_t* strip = dst + s * kb * 2 * kTile;
    const int64_t j0 = s * 32, cols = std::min<int64_t>(32, n - j0);
    if (!trans) {
      // Rows k and k + 1 of b interleaved value by value, 32 columns per AVX-512 step.
      const __m512i lo = PairsLo(), hi = PairsHi();
      const __mmask32 mask = FirstBits(cols);
      for (int64_t t = 0; t < kb; ++t) {
        uint16_t* tiles = strip + t * 2 * kTile;
        for (int64_t p = 0; p < 16; ++p) {
          const int64_t r0 = t * 32 + 2 * p, r1 = r0 + 1;
          const __m512i x0 = r0 < k ? Load32Bf16(b + r0 * n + j0, mask) : _mm512_setzero_si512();
          const __m512i x1 = r1 < k ? Load32Bf16(b + r1 * n + j0, mask) : _mm512_setzero_si512();
          _mm512_storeu_si512(tiles + p * 32, _mm512_permutex2var_epi16(x0, lo, x1));
          _mm512_storeu_si512(tiles + kTile + p * 32, _mm512_permutex2var_epi16(x0, hi, x1));
        }
      }
      return;
    }
    // b is stored [N, K]: the pairs (k, k + 1) of column j are adjacent in b's row j, so 32 values
    // of a row are the 16 pairs of one tile column; 16 columns are transposed into the 16 pair
    // rows of a tile.
    for (int64_t t = 0; t < kb; ++t) {
      const __mmask32 depth = FirstBits(k - t * 32);
      for (int h = 0; h < 2; ++h) {
        __m512i rows[16];  // [c] lane p: pair p of column c
        for (int c = 0; c < 16; ++c) {
          const int64_t j = j0 + h * 16 + c;
          rows[c] = j < n ? Load32Bf16(b + j * k + t * 32, depth) : _mm512_setzero_si512();
        }
        Transpose16x16(rows);
        uint16_t* tile = strip + (t * 2 + h) * kTile;
        for (int p = 0; p < 16; ++p) _mm512_storeu_si512(tile + p * 32, rows[p]);
      }
    }
  });
}

// One 32x32 output block over `steps` K steps of 32: A's two tiles per step from `a`, B's from
// `b` (both in tile order, 1 KiB per tile). The float32 sums go to `acc` (row stride ldc
// floats); with `accumulate` they are added to what `acc` holds (K summed in chunks).
inline void Block(const uint16_t* a, const uint16_t* b, int64_t steps, float* acc, int64_t ldc,
                  bool accumulate) {
  const int64_t c_stride = ldc * 4;
  if (accumulate) {
    _tile_loadd(0, acc, c_stride);
    _tile_loadd(1, acc + 16, c_stride);
    _tile_loadd(2, acc + 16 * ldc, c_stride);
    _tile_loadd(3, acc + 16 * ldc + 16, c_stride);
  } else {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
  }
  for (int64_t t = 0; t < steps; ++t) {
    const uint16_t* ap = a + t * 2 * kTile;
    const uint16_t* bp = b + t * 2 * kTile;
    _tile_loadd(4, ap, 64);
    _tile_loadd(6, bp, 64);
    _tile_loadd(5, ap + kTile, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_loadd(7, bp + kTile, 64);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, acc, c_stride);
  _tile_stored(1, acc + 16, c_stride);
  _tile_stored(2, acc + 16 * ldc, c_stride);
  _tile_stored(3, acc + 16 * ldc + 16, c_stride);
}

// How far ahead the kernels prefetch, and a prefetch of `bytes` from p into L1. Attention reads
// kAhead cache positions ahead.
constexpr int64_t kAhead = 6;
constexpr int64_t kStepsAhead = 4;  // K steps of 32 read ahead by the vector matmul
inline void Prefetch(const void* p, int64_t bytes) {
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t i = 0; i < bytes; i += 64) _mm_prefetch(c + i, _MM_HINT_T0);
}

// The same 32x32 block with AVX512-BF16 instructions: for each of the two 16-row A tiles, two
// passes of 8 rows, each keeping 8 x 2 registers of float32 sums while the 16 pairs of every K
// step are broadcast from A against B's two 16-column registers.
inline void BlockVector(const uint16_t* a, const uint16_t* b, int64_t steps, float* acc,
                        int64_t ldc, bool accumulate) {
  for (int h = 0; h < 2; ++h) {
    for (int r0 = 0; r0 < 16; r0 += 8) {
      float* rows = acc + (h * 16 + r0) * ldc;
      __m512 c[8][2];
#pragma GCC unroll 8
      for (int i = 0; i < 8; ++i) {
        c[i][0] = accumulate ? _mm512_loadu_ps(rows + i * ldc) : _mm512_setzero_ps();
        c[i][1] = accumulate ? _mm512_loadu_ps(rows + i * ldc + 16) : _mm512_setzero_ps();
      }
      for (int64_t t = 0; t < steps; ++t) {
        const uint32_t* ap =
            reinterpret_cast<const uint32_t*>(a + (t * 2 + h) * kTile) + r0 * 16;
        const uint16_t* bp = b + t * 2 * kTile;
        // The first pass over the strip streams it from memory (a decode step's weights are
        // read once): fetch a few K steps ahead.
        if (h == 0 && r0 == 0 && t + kStepsAhead < steps) {
          Prefetch(bp + kStepsAhead * 2 * kTile, 4 * kTile);
        }
#pragma GCC unroll 2
        for (int p = 0; p < 16; ++p) {
          const __m512bh b0 = reinterpret_cast<__m512bh>(_mm512_loadu_si512(bp + p * 32));
          const __m512bh b1 =
              reinterpret_cast<__m512bh>(_mm512_loadu_si512(bp + kTile + p * 32));
#pragma GCC unroll 8
          for (int i = 0; i < 8; ++i) {
            const __m512bh x = reinterpret_cast<__m512bh>(_mm512_set1_epi32(ap[i * 16 + p]));
            c[i][0] = _mm512_dpbf16_ps(c[i][0], x, b0);
            c[i][1] = _mm512_dpbf16_ps(c[i][1], x, b1);
          }
        }
      }
#pragma GCC unroll 8
      for (int i = 0; i < 8; ++i) {
        _mm512_storeu_ps(rows + i * ldc, c[i][0]);
        _mm512_storeu_ps(rows + i * ldc + 16, c[i][1]);
      }
    }
  }
}

// Writes rows x cols of float32 sums (row stride ldc) into out (row stride n).
template <typename OutT>
inline void WriteBlock(const float* acc, int64_t ldc, int rows, int cols, OutT* out, int64_t n) {
  for (int r = 0; r < rows; ++r) {
    OutT* dst = out + r * n;
    const float* src = acc + r * ldc;
    if constexpr (sizeof(OutT) == 2) {
      StoreRow(dst, _mm512_loadu_ps(src), HalfMask(cols));
      if (cols > 16) StoreRow(dst + 16, _mm512_loadu_ps(src + 16), HalfMask(cols - 16));
    } else {
      std::memcpy(dst, src, cols * sizeof(float));
    }
  }
}

// K longer than this is summed in chunks of kKChunk, so that the A panel and B strip of a chunk
// stay in L2 instead of streaming the whole of B once per panel.
constexpr int64_t kKSinglePass = 1024;
constexpr int64_t kKChunk = 512;

// Which instructions a product runs on (the `isa` attribute).
constexpr int64_t kIsaAmx = 1;
constexpr int64_t kIsaAvx512Bf16 = 2;

template <bool kAmx, typename OutT>
void Multiply(const Par& par, const uint16_t* a, const uint16_t* b, int64_t m, int64_t n,
              int64_t mp, int64_t np, int64_t kp, OutT* out) {
  const int64_t kb = kp / 32;
  const bool chunked = kp > kKSinglePass;
  const int64_t kc = chunked ? kKChunk : kp;
  // Row panels of A sized to stay in L2 while a group of B's column strips passes over them.
  const int64_t panel = std::min(mp, std::max<int64_t>(32, RoundUp((256 << 10) / (kc * 2), 32)));
  const int64_t panels = (mp + panel - 1) / panel;
  const int64_t strips = np / 32;
  // Small products run on this thread alone: a helper costs more than it saves.
  const bool small = m * n * kp < (int64_t{1} << 22);
  const int workers = small ? 1 : par.helpers + 1;
  const int64_t groups = std::min<int64_t>(strips, std::max<int64_t>(1, 4 * workers / panels));
  const int64_t per_group = (strips + groups - 1) / groups;
  // Chunked sums live in a float32 [mp, np] buffer between chunks.
  float* sums_ptr = chunked ? Scratch<float, 0>(mp * np) : nullptr;
  for (int64_t k0 = 0; k0 < kp; k0 += kc) {
    const int64_t t0 = k0 / 32, steps = std::min(kc, kp - k0) / 32;
    const bool first = k0 == 0, last = k0 + kc >= kp;
    ParallelFor(par.pool, small ? 0 : par.helpers, panels * groups, kAmx, [=](int64_t chunk) {
      alignas(64) float local[32 * 32];
      const int64_t i0 = (chunk / groups) * panel, i1 = std::min(mp, i0 + panel);
      const int64_t g = chunk % groups;
      const int64_t s1 = std::min(strips, (g + 1) * per_group);
      for (int64_t s = g * per_group; s < s1; ++s) {
        const int64_t j = s * 32;
        const uint16_t* b_strip = b + (s * kb + t0) * 2 * kTile;
        for (int64_t i = i0; i < i1; i += 32) {
          float* acc = chunked ? sums_ptr + i * np + j : local;
          const int64_t ldc = chunked ? np : 32;
          const uint16_t* a_panel = a + ((i / 32) * kb + t0) * 2 * kTile;
          if constexpr (kAmx) {
            Block(a_panel, b_strip, steps, acc, ldc, !first);
          } else {
            BlockVector(a_panel, b_strip, steps, acc, ldc, !first);
          }
          if (!last) continue;
          const int rows = static_cast<int>(std::min<int64_t>(32, m - i));
          const int cols = static_cast<int>(std::min<int64_t>(32, n - j));
          if (rows > 0 && cols > 0) WriteBlock(acc, ldc, rows, cols, out + i * n + j, n);
        }
      }
    });
  }
}

int Helpers(ffi::ThreadPool& pool) {
  return std::max(0, static_cast<int>(pool.num_threads()) - 1);
}

ffi::Error AmxMatmul(ffi::ThreadPool pool, ffi::AnyBuffer a, ffi::AnyBuffer b,
                     ffi::Result<ffi::AnyBuffer> out, int64_t trans_a, int64_t trans_b,
                     int64_t b_packed, int64_t isa) {
  if (isa != kIsaAmx && isa != kIsaAvx512Bf16) {
    return ffi::Error::InvalidArgument("amx_matmul: isa must be 1 (AMX) or 2 (AVX512-BF16)");
  }
  if (isa == kIsaAmx && !RequestAmx()) {
    return ffi::Error(ffi::ErrorCode::kUnavailable,
                      "the kernel refused this process the AMX tile state (arch_prctl)");
  }
  const bool b_f32 = b.element_type() == ffi::DataType::F32;
  if (a.element_type() != ffi::DataType::BF16 ||
      (b.element_type() != ffi::DataType::BF16 && !(b_f32 && !b_packed))) {
    return ffi::Error::InvalidArgument(
        "amx_matmul takes a bf16 a, and a bf16 b (or a float32 b that is not packed)");
  }
  auto a_dims = a.dimensions();
  auto o_dims = out->dimensions();
  if (a_dims.size() != 2 || o_dims.size() != 2) {
    return ffi::Error::InvalidArgument("amx_matmul takes a 2-D a and writes a 2-D output");
  }
  const int64_t m = o_dims[0], n = o_dims[1];
  const int64_t k = trans_a ? a_dims[0] : a_dims[1];
  if ((trans_a ? a_dims[1] : a_dims[0]) != m) {
    return ffi::Error::InvalidArgument("amx_matmul: rows of op(a) differ from the output's");
  }
  const int64_t mp = RoundUp(m, 32), kp = RoundUp(k, 32), np = RoundUp(n, 32);
  const Par par{&pool, Helpers(pool)};
  uint16_t* a_tiles = Scratch<uint16_t, 0>(mp * kp);
  PackA(par, In<uint16_t>(a), m, k, trans_a, mp, kp, a_tiles);
  const uint16_t* b_tiles = In<uint16_t>(b);
  if (b_packed) {
    if (static_cast<int64_t>(b.element_count()) != kp * np) {
      return ffi::Error::InvalidArgument("amx_matmul: packed b does not match the shapes");
    }
  } else {
    auto b_dims = b.dimensions();
    if (b_dims.size() != 2 || (trans_b ? b_dims[1] : b_dims[0]) != k ||
        (trans_b ? b_dims[0] : b_dims[1]) != n) {
      return ffi::Error::InvalidArgument("amx_matmul: op(b) does not match op(a) and the output");
    }
    uint16_t* b_buf = Scratch<uint16_t, 1>(kp * np);
    ForElementType(b.element_type(), [&](auto zero) {
      PackB(par, In<decltype(zero)>(b), k, n, trans_b, kp, np, b_buf);
    });
    b_tiles = b_buf;
  }
  if (out->element_type() != ffi::DataType::BF16 && out->element_type() != ffi::DataType::F32) {
    return ffi::Error::InvalidArgument("amx_matmul writes bf16 or f32");
  }
  const bool amx = isa == kIsaAmx;
  ForElementType(out->element_type(), [&](auto zero) {
    auto* o = Out<decltype(zero)>(out);
    amx ? Multiply<true>(par, a_tiles, b_tiles, m, n, mp, np, kp, o)
        : Multiply<false>(par, a_tiles, b_tiles, m, n, mp, np, kp, o);
  });
  return ffi::Error::Success();
}

// b [K, N] (or b stored [N, K] with trans) into tile order, once, for repeated products.
ffi::Error AmxPack(ffi::ThreadPool pool, ffi::AnyBuffer b, ffi::Result<ffi::AnyBuffer> out,
                   int64_t trans) {
  if (b.element_type() != ffi::DataType::BF16 || out->element_type() != ffi::DataType::BF16) {
    return ffi::Error::InvalidArgument("amx_pack takes and writes bf16");
  }
  auto b_dims = b.dimensions();
  if (b_dims.size() != 2) return ffi::Error::InvalidArgument("amx_pack takes a 2-D operand");
  const int64_t k = trans ? b_dims[1] : b_dims[0], n = trans ? b_dims[0] : b_dims[1];
  const int64_t kp = RoundUp(k, 32), np = RoundUp(n, 32);
  if (static_cast<int64_t>(out->element_count()) != kp * np) {
    return ffi::Error::InvalidArgument("amx_pack: output size does not match the operand");
  }
  const Par par{&pool, Helpers(pool)};
  PackB(par, In<uint16_t>(b), k, n, trans, kp, np, Out<uint16_t>(out));
  return ffi::Error::Success();
}

// One decode step of attention against a KV cache of bf16 or float32 values:
//   out[b, h, :] = softmax(q[b, h, :] . k[b, :, h, :] + bias[b, h, :]) . v[b, :, h, :]
// q float32 [B, H, D]; k, v [B, L, H, D] (the layout the projections write, so a cache needs no
// transpose); bias float32 [B, H, L] (relative positions and masks); out float32 [B, H, D].
// With round_weights the softmax weights are rounded to bf16 before they weight v, as the
// model's XLA path does in a bf16 run. One batch row is one work item: k and v are walked position
// by position through whole contiguous rows (all heads at once), so the cache streams from memory
// in order, and bf16 values are widened in registers, never in memory.
inline __m512 LoadRow(const uint16_t* src, __mmask16 mask) {
  const __m256i raw = _mm256_maskz_loadu_epi16(mask, src);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

inline __m512 LoadRow(const float* src, __mmask16 mask) { return _mm512_maskz_loadu_ps(mask, src); }

inline float RoundToBf16(float x) {
  const __m128 v = _mm_set_ss(x);
  const __m128bh h = _mm_cvtneps_pbh(v);
  const uint32_t bits = static_cast<uint32_t>(_mm_extract_epi16(reinterpret_cast<__m128i>(h), 0))
                        << 16;
  float out;
  std::memcpy(&out, &bits, 4);
  return out;
}

template <typename T>
void AttendRows(const Par& par, const float* qp, const T* kp, const T* vp, const float* bp,
                float* op, int64_t B, int64_t H, int64_t L, int64_t D, bool round_weights) {
  const int64_t chunks = (D + 15) / 16;
  const __mmask16 tail = static_cast<__mmask16>(D % 16 ? (1u << (D % 16)) - 1 : 0xFFFF);
  const bool small = B * H * L * D < (int64_t{1} << 16);
  const int64_t row = H * D;  // one position of k or v: every head, contiguous
  const int64_t row_bytes = row * static_cast<int64_t>(sizeof(T));
  ParallelFor(par.pool, small ? 0 : par.helpers, B, false, [=](int64_t b) {
    float* w = Scratch<float, 2>(H * L);    // scores, then weights: [H, L]
    float* acc = Scratch<float, 3>(row);    // weighted sums: [H, D]
    const float* qb = qp + b * row;
    const T* kb = kp + b * L * row;
    const T* vb = vp + b * L * row;
    const float* bb = bp + b * H * L;
    for (int64_t l = 0; l < L; ++l) {
      const T* krow = kb + l * row;
      if (l + kAhead < L) Prefetch(krow + kAhead * row, row_bytes);
      for (int64_t h = 0; h < H; ++h) {
        __m512 dot = _mm512_setzero_ps();
        for (int64_t c = 0; c < chunks; ++c) {
          const __mmask16 m = c + 1 == chunks ? tail : 0xFFFF;
          dot = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, qb + h * D + c * 16),
                                LoadRow(krow + h * D + c * 16, m), dot);
        }
        w[h * L + l] = _mm512_reduce_add_ps(dot) + bb[h * L + l];
      }
    }
    for (int64_t h = 0; h < H; ++h) {
      float* wh = w + h * L;
      float mx = -INFINITY, total = 0.f;
      for (int64_t l = 0; l < L; ++l) mx = std::max(mx, wh[l]);
      for (int64_t l = 0; l < L; ++l) {
        wh[l] = std::exp(wh[l] - mx);
        total += wh[l];
      }
      const float inv = 1.f / total;
      for (int64_t l = 0; l < L; ++l) {
        wh[l] = round_weights ? RoundToBf16(wh[l] * inv) : wh[l] * inv;
      }
    }
    std::memset(acc, 0, row * sizeof(float));
    for (int64_t l = 0; l < L; ++l) {
      const T* vrow = vb + l * row;
      if (l + kAhead < L) Prefetch(vrow + kAhead * row, row_bytes);
      for (int64_t h = 0; h < H; ++h) {
        const __m512 wl = _mm512_set1_ps(w[h * L + l]);
        for (int64_t c = 0; c < chunks; ++c) {
          const __mmask16 m = c + 1 == chunks ? tail : 0xFFFF;
          float* a = acc + h * D + c * 16;
          _mm512_mask_storeu_ps(a, m, _mm512_fmadd_ps(wl, LoadRow(vrow + h * D + c * 16, m),
                                                       _mm512_maskz_loadu_ps(m, a)));
        }
      }
    }
    std::memcpy(op + b * row, acc, row * sizeof(float));
  });
}

ffi::Error DecodeAttention(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k,
                           ffi::AnyBuffer v, ffi::AnyBuffer bias,
                           ffi::Result<ffi::AnyBuffer> out, int64_t round_weights) {
  const ffi::DataType cache = k.element_type();
  if (q.element_type() != ffi::DataType::F32 || v.element_type() != cache ||
      (cache != ffi::DataType::BF16 && cache != ffi::DataType::F32) ||
      bias.element_type() != ffi::DataType::F32 || out->element_type() != ffi::DataType::F32) {
    return ffi::Error::InvalidArgument(
        "decode_attention takes float32 q and bias, k and v both bf16 or both float32, and "
        "writes float32");
  }
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions(), bd = bias.dimensions();
  if (qd.size() != 3 || kd.size() != 4 || vd.size() != 4 || bd.size() != 3) {
    return ffi::Error::InvalidArgument(
        "decode_attention: q [B, H, D], k and v [B, L, H, D], bias [B, H, L]");
  }
  const int64_t B = qd[0], H = qd[1], D = qd[2], L = kd[1];
  for (int i = 0; i < 4; ++i) {
    if (kd[i] != vd[i]) return ffi::Error::InvalidArgument("decode_attention: k and v differ");
  }
  if (kd[0] != B || kd[2] != H || kd[3] != D || bd[0] != B || bd[1] != H || bd[2] != L) {
    return ffi::Error::InvalidArgument("decode_attention: shapes of q, k/v and bias disagree");
  }
  const Par par{&pool, Helpers(pool)};
  ForElementType(cache, [&](auto zero) {
    using T = decltype(zero);
    AttendRows(par, In<float>(q), In<T>(k), In<T>(v), In<float>(bias), Out<float>(out), B, H, L,
               D, round_weights != 0);
  });
  return ffi::Error::Success();
}

// float32 products for decoding, where every step multiplies a few rows by the same weights:
// out[M, N] = a[M, K] . w, with w laid out once by `doa_f32_pack` in 32-column strips, each strip
// K rows of 32 contiguous values ([N/32][K][32], N zero padded). Rows of a are read as they are.
// 8 rows x 32 columns of sums live in 16 registers while a strip streams through (prefetched
// ahead on the first pass: a decode step's weights come from memory once).
void PackF32(const Par& par, const float* w, int64_t k, int64_t n, bool trans, int64_t np,
             float* dst) {
  ParallelFor(par.pool, par.helpers, np / 32, false, [=](int64_t s) {
    float* strip = dst + s * k * 32;
    const int64_t j0 = s * 32, cols = std::min<int64_t>(32, n - j0);
    const __mmask16 m0 = HalfMask(cols), m1 = HalfMask(cols - 16);
    for (int64_t kk = 0; kk < k; ++kk) {
      float* out = strip + kk * 32;
      if (!trans) {
        _mm512_storeu_ps(out, _mm512_maskz_loadu_ps(m0, w + kk * n + j0));
        _mm512_storeu_ps(out + 16, _mm512_maskz_loadu_ps(m1, w + kk * n + j0 + 16));
      } else {
        for (int64_t c = 0; c < 32; ++c) out[c] = c < cols ? w[(j0 + c) * k + kk] : 0.f;
      }
    }
  });
}

template <int kRows>
inline void StripRows(const float* const* rows, const float* strip, int64_t k, float* const* out,
                      int cols, bool prefetch) {
  __m512 c[kRows][2];
#pragma GCC unroll 8
  for (int i = 0; i < kRows; ++i) c[i][0] = c[i][1] = _mm512_setzero_ps();
  for (int64_t kk = 0; kk < k; ++kk) {
    const float* bp = strip + kk * 32;
    if (prefetch) Prefetch(bp + 24 * 32, 128);
    const __m512 b0 = _mm512_loadu_ps(bp), b1 = _mm512_loadu_ps(bp + 16);
#pragma GCC unroll 8
    for (int i = 0; i < kRows; ++i) {
      const __m512 x = _mm512_set1_ps(rows[i][kk]);
      c[i][0] = _mm512_fmadd_ps(x, b0, c[i][0]);
      c[i][1] = _mm512_fmadd_ps(x, b1, c[i][1]);
    }
  }
  const __mmask16 m0 = HalfMask(cols), m1 = HalfMask(cols - 16);
#pragma GCC unroll 8
  for (int i = 0; i < kRows; ++i) {
    _mm512_mask_storeu_ps(out[i], m0, c[i][0]);
    _mm512_mask_storeu_ps(out[i] + 16, m1, c[i][1]);
  }
}

ffi::Error F32Matmul(ffi::ThreadPool pool, ffi::AnyBuffer a, ffi::AnyBuffer packed,
                     ffi::Result<ffi::AnyBuffer> out) {
  if (a.element_type() != ffi::DataType::F32 || packed.element_type() != ffi::DataType::F32 ||
      out->element_type() != ffi::DataType::F32) {
    return ffi::Error::InvalidArgument("f32_matmul takes and writes float32");
  }
  auto a_dims = a.dimensions(), o_dims = out->dimensions();
  if (a_dims.size() != 2 || o_dims.size() != 2 || a_dims[0] != o_dims[0]) {
    return ffi::Error::InvalidArgument("f32_matmul: a [M, K] and out [M, N]");
  }
  const int64_t m = a_dims[0], k = a_dims[1], n = o_dims[1], np = RoundUp(n, 32);
  if (static_cast<int64_t>(packed.element_count()) != np * k) {
    return ffi::Error::InvalidArgument("f32_matmul: packed w does not match the shapes");
  }
  const float* ap = In<float>(a);
  const float* wp = In<float>(packed);
  float* op = Out<float>(out);
  const Par par{&pool, Helpers(pool)};
  const int64_t strips = np / 32;
  const bool small = m * n * k < (int64_t{1} << 21);
  const int workers = small ? 1 : par.helpers + 1;
  const int64_t groups = std::min<int64_t>(strips, 4 * workers);
  const int64_t per_group = (strips + groups - 1) / groups;
  ParallelFor(par.pool, small ? 0 : par.helpers, groups, false, [=](int64_t g) {
    const int64_t s1 = std::min(strips, (g + 1) * per_group);
    for (int64_t s = g * per_group; s < s1; ++s) {
      const float* strip = wp + s * k * 32;
      const int cols = static_cast<int>(std::min<int64_t>(32, n - s * 32));
      for (int64_t i0 = 0; i0 < m; i0 += 8) {
        const float* rows[8];
        float* outs[8];
        const int count = static_cast<int>(std::min<int64_t>(8, m - i0));
        for (int i = 0; i < 8; ++i) {
          const int64_t r = i0 + std::min(i, count - 1);
          rows[i] = ap + r * k;
          outs[i] = op + r * n + s * 32;
        }
        // Rows past m repeat the last row (same value written twice), so one kernel shape serves.
        StripRows<8>(rows, strip, k, outs, cols, i0 == 0);
      }
    }
  });
  return ffi::Error::Success();
}

ffi::Error F32Pack(ffi::ThreadPool pool, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> out,
                   int64_t trans) {
  if (w.element_type() != ffi::DataType::F32 || out->element_type() != ffi::DataType::F32) {
    return ffi::Error::InvalidArgument("f32_pack takes and writes float32");
  }
  auto dims = w.dimensions();
  if (dims.size() != 2) return ffi::Error::InvalidArgument("f32_pack takes a 2-D operand");
  const int64_t k = trans ? dims[1] : dims[0], n = trans ? dims[0] : dims[1];
  const int64_t np = RoundUp(n, 32);
  if (static_cast<int64_t>(out->element_count()) != np * k) {
    return ffi::Error::InvalidArgument("f32_pack: output size does not match the operand");
  }
  const Par par{&pool, Helpers(pool)};
  PackF32(par, In<float>(w), k, n, trans, np, Out<float>(out));
  return ffi::Error::Success();
}


// Training attention over whole sequences, forward and backward: out = softmax(q . k^T + bias) . v
// per batch row b and head h, q [B, Lq, H, D], k and v [B, Lk, H, D] (bf16 or float32, the
// layout the projections write, so no head-major transposes), bias float32 [B, H, Lq, Lk], each
// of its first three axes possibly 1 (broadcast; the gradient comes back full-sized). All
// arithmetic is float32 (logits, softmax, products); with round_weights the softmax weights are
// rounded to bf16 before they weight v, as the model's XLA path does in bf16. The forward pass
// keeps only the log-normalizer per row (lse [B, H, Lq]); the backward pass recomputes the
// weights from it, and writes a bias gradient only where the caller asks for one. Dropout on the
// weights comes as float32 keep scales [B, H, Lq, Lk] (0, or 1 / keep probability), drawn by the
// caller. One (b, h) pair is one work item: its q, k, v rows are gathered into float32 buffers
// that stay in L1/L2, and five small products run on register-blocked FMA loops.

// e^x for 16 floats: x = n ln2 + r with |r| <= ln2 / 2, a degree-7 Taylor polynomial for e^r,
// scaled by 2^n (VSCALEFPS). Inputs below -104 give exactly 0, as e^x rounds to 0 there.
inline __m512 Exp16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-104.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
  __m512 p = _mm512_set1_ps(1.f / 5040);
  for (const float c : {1.f / 720, 1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f}) {
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  }
  return _mm512_scalef_ps(p, n);
}

inline __m512 RoundRowToBf16(__m512 x) {
  const __m256i h = reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(x));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// Dropout on the weights: w times the keep scale (0, or 1 / keep probability), rounded to bf16
// again in a bf16 run, as the model's dropout rounds its bf16 product.
inline __m512 Dropped(__m512 w, __m512 scale, bool round_weights) {
  const __m512 x = _mm512_mul_ps(w, scale);
  return round_weights ? RoundRowToBf16(x) : x;
}

// c[R rows, NV 16-wide vectors] (= or +=) A . B over kd: A(r, k) = a[r * ars + k * acs], B rows
// of ldb floats. The sums stay in registers across k; `last` masks the last vector's columns.
template <int R, int NV>
inline void GemmTile(const float* a, int64_t ars, int64_t acs, const float* b, int64_t ldb,
                     float* c, int64_t ldc, int64_t kd, __mmask16 last) {
  __m512 acc[R][NV];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
  }
  for (int64_t k = 0; k < kd; ++k) {
    __m512 bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      bv[v] = _mm512_maskz_loadu_ps(v == NV - 1 ? last : 0xFFFF, b + k * ldb + v * 16);
    }
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const __m512 x = _mm512_set1_ps(a[r * ars + k * acs]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_fmadd_ps(x, bv[v], acc[r][v]);
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      _mm512_mask_storeu_ps(c + r * ldc + v * 16, v == NV - 1 ? last : 0xFFFF, acc[r][v]);
    }
  }
}

template <int R>
inline void GemmRows(int nv, const float* a, int64_t ars, int64_t acs, const float* b,
                     int64_t ldb, float* c, int64_t ldc, int64_t kd, __mmask16 last) {
  switch (nv) {
    case 1: return GemmTile<R, 1>(a, ars, acs, b, ldb, c, ldc, kd, last);
    case 2: return GemmTile<R, 2>(a, ars, acs, b, ldb, c, ldc, kd, last);
    case 3: return GemmTile<R, 3>(a, ars, acs, b, ldb, c, ldc, kd, last);
    default: return GemmTile<R, 4>(a, ars, acs, b, ldb, c, ldc, kd, last);
  }
}

// c[m, n] = A[m, kd] . B[kd, n] in float32, A read through strides (a transposed A is ars = 1).
void SmallGemm(const float* a, int64_t ars, int64_t acs, const float* b, int64_t ldb, float* c,
               int64_t ldc, int64_t m, int64_t kd, int64_t n) {
  for (int64_t j = 0; j < n; j += 64) {
    const int64_t cols = std::min<int64_t>(64, n - j);
    const int nv = static_cast<int>((cols + 15) / 16);
    const __mmask16 last = HalfMask(cols - (nv - 1) * 16);
    int64_t i = 0;
    for (; i + 4 <= m; i += 4) {
      GemmRows<4>(nv, a + i * ars, ars, acs, b + j, ldb, c + i * ldc + j, ldc, kd, last);
    }
    for (; i < m; ++i) {
      GemmRows<1>(nv, a + i * ars, ars, acs, b + j, ldb, c + i * ldc + j, ldc, kd, last);
    }
  }
}

// dst[cols, rows] = src[rows, cols]^T for float32, in 16 x 16 blocks.
void TransposeF32(const float* src, int64_t rows, int64_t cols, float* dst) {
  for (int64_t r0 = 0; r0 < rows; r0 += 16) {
    for (int64_t c0 = 0; c0 < cols; c0 += 16) {
      const __mmask16 cm = HalfMask(cols - c0), rm = HalfMask(rows - r0);
      __m512i blk[16];
      for (int i = 0; i < 16; ++i) {
        blk[i] = r0 + i < rows ? _mm512_maskz_loadu_epi32(cm, src + (r0 + i) * cols + c0)
                               : _mm512_setzero_si512();
      }
      Transpose16x16(blk);
      for (int i = 0; i < 16 && c0 + i < cols; ++i) {
        _mm512_mask_storeu_epi32(dst + (c0 + i) * rows + r0, rm, blk[i]);
      }
    }
  }
}

// Rows of one head, x[b, :, h, :] of a [B, L, H, D] array, into float32 [L, D].
template <typename T>
void GatherHead(const T* x, int64_t L, int64_t H, int64_t D, float* dst) {
  for (int64_t i = 0; i < L; ++i) {
    for (int64_t d = 0; d < D; d += 16) {
      const __mmask16 m = HalfMask(D - d);
      _mm512_mask_storeu_ps(dst + i * D + d, m, LoadRow(x + i * H * D + d, m));
    }
  }
}

template <typename T>
void ScatterHead(const float* src, int64_t L, int64_t H, int64_t D, T* x) {
  for (int64_t i = 0; i < L; ++i) {
    for (int64_t d = 0; d < D; d += 16) {
      const __mmask16 m = HalfMask(D - d);
      StoreRow(x + i * H * D + d, _mm512_maskz_loadu_ps(m, src + i * D + d), m);
    }
  }
}

struct AttentionShape {
  int64_t B, H, Lq, Lk, D;
  // Strides of the bias over batch rows, heads and query positions: 0 along an axis it is
  // broadcast over (a relative-position bias shared by the batch, a padding mask shared by heads).
  int64_t bias_b, bias_h, bias_q;
  const float* BiasOf(const float* bias, int64_t item) const {
    return bias + (item / H) * bias_b + (item % H) * bias_h;
  }
};

// Scores s = q . k^T + bias of one item into s [Lq, Lk]; q and k rows float32 in qf, kf, with
// kt a [D, Lk] scratch for k^T.
void Scores(const AttentionShape& a, const float* qf, const float* kf, const float* bias,
            float* kt, float* s) {
  TransposeF32(kf, a.Lk, a.D, kt);
  SmallGemm(qf, a.D, 1, kt, a.Lk, s, a.Lk, a.Lq, a.D, a.Lk);
  for (int64_t i = 0; i < a.Lq; ++i) {
    for (int64_t j = 0; j < a.Lk; j += 16) {
      const __mmask16 m = HalfMask(a.Lk - j);
      float* row = s + i * a.Lk + j;
      const __m512 b = _mm512_maskz_loadu_ps(m, bias + i * a.bias_q + j);
      _mm512_mask_storeu_ps(row, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, row), b));
    }
  }
}

template <typename T>
void AttentionForward(const Par& par, const AttentionShape& a, const T* q, const T* k,
                      const T* v, const float* bias, const float* keep, T* out, float* lse,
                      bool round_weights) {
  const int64_t Lq = a.Lq, Lk = a.Lk, D = a.D, H = a.H;
  const bool small = a.B * H * Lq * Lk * D < (int64_t{1} << 18);
  ParallelFor(par.pool, small ? 0 : par.helpers, a.B * H, false, [=](int64_t item) {
    const int64_t b = item / H, h = item % H;
    float* qf = Scratch<float, 10>(Lq * D + 2 * Lk * D + D * Lk + Lq * Lk + Lq * D);
    float* kf = qf + Lq * D;
    float* vf = kf + Lk * D;
    float* kt = vf + Lk * D;
    float* s = kt + D * Lk;
    float* o = s + Lq * Lk;
    GatherHead(q + (b * Lq * H + h) * D, Lq, H, D, qf);
    GatherHead(k + (b * Lk * H + h) * D, Lk, H, D, kf);
    GatherHead(v + (b * Lk * H + h) * D, Lk, H, D, vf);
    Scores(a, qf, kf, a.BiasOf(bias, item), kt, s);
    for (int64_t i = 0; i < Lq; ++i) {
      float* row = s + i * Lk;
      __m512 mx = _mm512_set1_ps(-INFINITY);
      for (int64_t j = 0; j < Lk; j += 16) {
        mx = _mm512_max_ps(mx, _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), HalfMask(Lk - j),
                                                    row + j));
      }
      const float top = _mm512_reduce_max_ps(mx);
      __m512 total = _mm512_setzero_ps();
      for (int64_t j = 0; j < Lk; j += 16) {
        const __mmask16 m = HalfMask(Lk - j);
        const __m512 e = Exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, row + j),
                                             _mm512_set1_ps(top)));
        total = _mm512_add_ps(total, _mm512_maskz_mov_ps(m, e));
        _mm512_mask_storeu_ps(row + j, m, e);
      }
      const float sum = _mm512_reduce_add_ps(total);
      lse[item * Lq + i] = top + std::log(sum);
      const __m512 inv = _mm512_set1_ps(1.f / sum);
      const float* keep_row = keep ? keep + (item * Lq + i) * Lk : nullptr;
      for (int64_t j = 0; j < Lk; j += 16) {
        const __mmask16 m = HalfMask(Lk - j);
        __m512 w = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, row + j), inv);
        if (round_weights) w = RoundRowToBf16(w);
        if (keep_row) w = Dropped(w, _mm512_maskz_loadu_ps(m, keep_row + j), round_weights);
        _mm512_mask_storeu_ps(row + j, m, w);
      }
    }
    SmallGemm(s, Lk, 1, vf, D, o, D, Lq, Lk, D);
    ScatterHead(o, Lq, H, D, out + (b * Lq * H + h) * D);
  });
}

template <typename T>
void AttentionBackward(const Par& par, const AttentionShape& a, const T* q, const T* k,
                       const T* v, const float* bias, const float* keep, const float* lse,
                       const T* d_out, T* dq, T* dk, T* dv, float* d_bias, bool round_weights) {
  const int64_t Lq = a.Lq, Lk = a.Lk, D = a.D, H = a.H;
  const bool small = a.B * H * Lq * Lk * D < (int64_t{1} << 18);
  ParallelFor(par.pool, small ? 0 : par.helpers, a.B * H, false, [=](int64_t item) {
    const int64_t b = item / H, h = item % H;
    float* qf = Scratch<float, 11>(3 * Lq * D + 4 * Lk * D + 2 * D * Lk + 2 * Lq * Lk);
    float* kf = qf + Lq * D;
    float* vf = kf + Lk * D;
    float* gf = vf + Lk * D;     // d_out [Lq, D]
    float* kt = gf + Lq * D;     // k^T, then v^T [D, Lk]
    float* p = kt + D * Lk;      // weights [Lq, Lk]
    float* ds = p + Lq * Lk;     // d weights, then d scores [Lq, Lk]
    float* gq = ds + Lq * Lk;    // dq [Lq, D]
    float* gk = gq + Lq * D;     // dk [Lk, D]
    float* gv = gk + Lk * D;     // dv [Lk, D]
    const int64_t q0 = (b * Lq * H + h) * D, k0 = (b * Lk * H + h) * D;
    GatherHead(q + q0, Lq, H, D, qf);
    GatherHead(k + k0, Lk, H, D, kf);
    GatherHead(v + k0, Lk, H, D, vf);
    GatherHead(d_out + q0, Lq, H, D, gf);
    Scores(a, qf, kf, a.BiasOf(bias, item), kt, p);
    for (int64_t i = 0; i < Lq; ++i) {
      const __m512 shift = _mm512_set1_ps(lse[item * Lq + i]);
      for (int64_t j = 0; j < Lk; j += 16) {
        const __mmask16 m = HalfMask(Lk - j);
        float* row = p + i * Lk + j;
        _mm512_mask_storeu_ps(row, m, Exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, row), shift)));
      }
    }
    TransposeF32(vf, Lk, D, kt);
    SmallGemm(gf, D, 1, kt, Lk, ds, Lk, Lq, D, Lk);  // d weights = d_out . v^T
    float* db = d_bias ? d_bias + item * Lq * Lk : nullptr;
    for (int64_t i = 0; i < Lq; ++i) {
      float* pr = p + i * Lk;
      float* gr = ds + i * Lk;
      const float* keep_row = keep ? keep + (item * Lq + i) * Lk : nullptr;
      __m512 dot = _mm512_setzero_ps();
      for (int64_t j = 0; j < Lk; j += 16) {
        const __mmask16 m = HalfMask(Lk - j);
        __m512 g = _mm512_maskz_loadu_ps(m, gr + j);
        // Through dropout, the weights' gradient is the dropped weights' one times the scale.
        if (keep_row) {
          g = _mm512_mul_ps(g, _mm512_maskz_loadu_ps(m, keep_row + j));
          _mm512_mask_storeu_ps(gr + j, m, g);
        }
        dot = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, pr + j), g, dot);
      }
      const __m512 centre = _mm512_set1_ps(_mm512_reduce_add_ps(dot));
      for (int64_t j = 0; j < Lk; j += 16) {
        const __mmask16 m = HalfMask(Lk - j);
        const __m512 w = _mm512_maskz_loadu_ps(m, pr + j);
        const __m512 g = _mm512_mul_ps(w, _mm512_sub_ps(_mm512_maskz_loadu_ps(m, gr + j), centre));
        _mm512_mask_storeu_ps(gr + j, m, g);
        if (db) _mm512_mask_storeu_ps(db + i * Lk + j, m, g);
        // The weights that multiplied v in the forward pass: rounded, then dropped.
        __m512 used = round_weights ? RoundRowToBf16(w) : w;
        if (keep_row) used = Dropped(used, _mm512_maskz_loadu_ps(m, keep_row + j), round_weights);
        _mm512_mask_storeu_ps(pr + j, m, used);
      }
    }
    SmallGemm(p, 1, Lk, gf, D, gv, D, Lk, Lq, D);    // dv = weights^T . d_out
    SmallGemm(ds, Lk, 1, kf, D, gq, D, Lq, Lk, D);   // dq = d scores . k
    SmallGemm(ds, 1, Lk, qf, D, gk, D, Lk, Lq, D);   // dk = d scores^T . q
    ScatterHead(gq, Lq, H, D, dq + q0);
    ScatterHead(gk, Lk, H, D, dk + k0);
    ScatterHead(gv, Lk, H, D, dv + k0);
  });
}

// Checks the operands of both passes: q [B, Lq, H, D]; k, v [B, Lk, H, D] in q's dtype (bf16 or
// float32); bias float32 [B or 1, H or 1, Lq or 1, Lk]; keep float32, [B, H, Lq, Lk] dropout
// scales or one value (no dropout; *keep_ptr stays null).
ffi::Error CheckAttention(const char* name, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                          ffi::AnyBuffer bias, ffi::AnyBuffer keep, AttentionShape* shape,
                          const float** keep_ptr) {
  const ffi::DataType t = q.element_type();
  if ((t != ffi::DataType::BF16 && t != ffi::DataType::F32) || k.element_type() != t ||
      v.element_type() != t || bias.element_type() != ffi::DataType::F32) {
    return ffi::Error::InvalidArgument(std::string(name) +
                                       ": q, k, v all bf16 or all float32, bias float32");
  }
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions(), bd = bias.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4 || bd.size() != 4) {
    return ffi::Error::InvalidArgument(
        std::string(name) + ": q [B, Lq, H, D], k and v [B, Lk, H, D], bias [B|1, H|1, Lq|1, Lk]");
  }
  *shape = {qd[0], qd[2], qd[1], kd[1], qd[3]};
  for (int i = 0; i < 4; ++i) {
    if (kd[i] != vd[i]) return ffi::Error::InvalidArgument(std::string(name) + ": k and v differ");
  }
  auto fits = [](int64_t dim, int64_t full) { return dim == full || dim == 1; };
  if (kd[0] != shape->B || kd[2] != shape->H || kd[3] != shape->D || !fits(bd[0], shape->B) ||
      !fits(bd[1], shape->H) || !fits(bd[2], shape->Lq) || bd[3] != shape->Lk) {
    return ffi::Error::InvalidArgument(std::string(name) + ": shapes of q, k/v and bias disagree");
  }
  shape->bias_q = bd[2] == 1 ? 0 : shape->Lk;
  shape->bias_h = bd[1] == 1 ? 0 : bd[2] * shape->Lk;
  shape->bias_b = bd[0] == 1 ? 0 : bd[1] * bd[2] * shape->Lk;
  const int64_t full = shape->B * shape->H * shape->Lq * shape->Lk;
  if (keep.element_type() != ffi::DataType::F32 ||
      (keep.element_count() != 1 && static_cast<int64_t>(keep.element_count()) != full)) {
    return ffi::Error::InvalidArgument(std::string(name) +
                                       ": keep is float32, [B, H, Lq, Lk] or a single value");
  }
  // (With full == 1 the one value is a scale too; 1.0 keeps everything.)
  if (static_cast<int64_t>(keep.element_count()) == full) {
    *keep_ptr = In<float>(keep);
  }
  return ffi::Error::Success();
}

ffi::Error AttentionFwd(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k,
                        ffi::AnyBuffer v, ffi::AnyBuffer bias, ffi::AnyBuffer keep,
                        ffi::Result<ffi::AnyBuffer> out, ffi::Result<ffi::AnyBuffer> lse,
                        int64_t round_weights) {
  AttentionShape a;
  const float* kp = nullptr;
  if (auto err = CheckAttention("attention", q, k, v, bias, keep, &a, &kp); err.failure()) {
    return err;
  }
  if (out->element_type() != q.element_type() || lse->element_type() != ffi::DataType::F32 ||
      static_cast<int64_t>(lse->element_count()) != a.B * a.H * a.Lq) {
    return ffi::Error::InvalidArgument("attention: out in q's dtype, lse float32 [B, H, Lq]");
  }
  const Par par{&pool, Helpers(pool)};
  ForElementType(q.element_type(), [&](auto zero) {
    using T = decltype(zero);
    AttentionForward(par, a, In<T>(q), In<T>(k), In<T>(v), In<float>(bias), kp, Out<T>(out),
                     Out<float>(lse), round_weights != 0);
  });
  return ffi::Error::Success();
}

ffi::Error AttentionBwd(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k,
                        ffi::AnyBuffer v, ffi::AnyBuffer bias, ffi::AnyBuffer keep,
                        ffi::AnyBuffer lse, ffi::AnyBuffer d_out, ffi::Result<ffi::AnyBuffer> dq,
                        ffi::Result<ffi::AnyBuffer> dk, ffi::Result<ffi::AnyBuffer> dv,
                        ffi::Result<ffi::AnyBuffer> d_bias, int64_t round_weights) {
  AttentionShape a;
  const float* kp = nullptr;
  if (auto err = CheckAttention("attention_bwd", q, k, v, bias, keep, &a, &kp); err.failure()) {
    return err;
  }
  const ffi::DataType t = q.element_type();
  if (d_out.element_type() != t || dq->element_type() != t || dk->element_type() != t ||
      dv->element_type() != t || lse.element_type() != ffi::DataType::F32 ||
      d_bias->element_type() != ffi::DataType::F32 ||
      static_cast<int64_t>(lse.element_count()) != a.B * a.H * a.Lq ||
      d_out.element_count() != q.element_count()) {
    return ffi::Error::InvalidArgument(
        "attention_bwd: d_out, dq, dk, dv in q's dtype and shapes; lse, d_bias float32");
  }
  // d_bias is [B, H, Lq, Lk], or one value where the caller needs no bias gradient (a mask).
  const int64_t full = a.B * a.H * a.Lq * a.Lk;
  const int64_t bias_grads = static_cast<int64_t>(d_bias->element_count());
  if (bias_grads != full && bias_grads != 1) {
    return ffi::Error::InvalidArgument("attention_bwd: d_bias is [B, H, Lq, Lk] or one value");
  }
  float* gb = bias_grads == full ? Out<float>(d_bias) : nullptr;
  const Par par{&pool, Helpers(pool)};
  ForElementType(t, [&](auto zero) {
    using T = decltype(zero);
    AttentionBackward(par, a, In<T>(q), In<T>(k), In<T>(v), In<float>(bias), kp,
                      In<float>(lse), In<T>(d_out), Out<T>(dq), Out<T>(dk), Out<T>(dv), gb,
                      round_weights != 0);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(DoaAmxPack, AmxPack,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("trans"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(DoaAmxMatmul, AmxMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("trans_a")
                                  .Attr<int64_t>("trans_b")
                                  .Attr<int64_t>("b_packed")
                                  .Attr<int64_t>("isa"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(DoaDecodeAttention, DecodeAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("round_weights"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(DoaF32Matmul, F32Matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(DoaF32Pack, F32Pack,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("trans"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(DoaAttentionFwd, AttentionFwd,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("round_weights"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(DoaAttentionBwd, AttentionBwd,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("round_weights"));

extern "C" int DoaAmxAvailable() { return RequestAmx() ? 1 : 0; }
