/* One LoRA layer's update for rows of bfloat16 activations, in one call.
 *
 * Built and loaded by rows_kernel.py in this folder (cc -O3
 * -march=native, called through ctypes, which shares large batches out between
 * threads, and from lora_op.cpp by its address, the compiled graph's op) for
 * vLLM-CPU: on a decode step a layer's update is a few thousand
 * multiply-adds per row, and the torch ops that computed it (casts, two small
 * matmuls, an add) cost far more in dispatch than in arithmetic; on a prompt
 * they made float32 intermediates as wide as the layer's output.
 *
 * For each row t whose slot s = slots[t] is not negative, and each slice i of
 * the layer (output columns offset_i .. offset_i + width_i):
 *
 *     h      = round(scale * (A_s x_t))            A_s: K x in, K = slices * rank_s
 *     y_t[c] = round(y_t[c] + round(h_i . B_s,i[:, c]))
 *
 * where h_i is slice i's rank_s entries of h, B_s,i slice i's rank_s x width_i
 * expand matrix and round a rounding to bfloat16: the same formula and
 * roundings as vLLM-CPU's kernels and the torch path of
 * fused.fused_add_lora_linear, up to the order of float32 additions.
 *
 * The weights stay bfloat16, as vLLM holds them: on a decode step every
 * layer's weights come from memory (the base model's pass in between evicts
 * them), and float32 copies doubled that traffic.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Sixteen lanes at a time, as GCC vector extensions: one AVX-512 register, or two or four narrower
 * ones on CPUs without it, with no intrinsics to pick per CPU. */
typedef float f32x16 __attribute__((vector_size(64)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));
typedef uint16_t u16x16 __attribute__((vector_size(32)));
enum { LANES = 16 };

/* Loads and stores of `lanes` (<= LANES) lanes: the whole-vector case is a copy of constant size,
 * which the compiler makes one vector move; only a row's last few columns take the other branch. */
#define COPY_LANES(dst, src, lanes, size) \
    ((lanes) == LANES ? memcpy(dst, src, LANES * (size)) : memcpy(dst, src, (size_t)(lanes) * (size)))

static inline f32x16 load_f32(const float *p, int64_t lanes) {
    f32x16 f = {0};
    COPY_LANES(&f, p, lanes, sizeof *p);
    return f;
}

static inline void store_f32(float *p, f32x16 f, int64_t lanes) { COPY_LANES(p, &f, lanes, sizeof *p); }

/* Each lane rounded to bfloat16, nearest and ties to even, NaN kept NaN, as c10::BFloat16 rounds. CPUs
 * with AVX512-BF16 have an instruction for it (one where the portable code takes a dozen), which also
 * flushes denormals (below 1.2e-38) to zero: no LoRA update of a language model comes near them. */
#if defined(__AVX512BF16__)
#include <immintrin.h>

static inline u16x16 to_bf16(f32x16 f) {
    __m256bh packed = _mm512_cvtneps_pbh((__m512)f);
    u16x16 h;
    memcpy(&h, &packed, sizeof h);
    return h;
}
#else
static inline u16x16 to_bf16(f32x16 f) {
    u32x16 bits;
    memcpy(&bits, &f, sizeof bits);
    u32x16 nan = (u32x16)((bits & 0x7fffffffu) > 0x7f800000u);
    u32x16 rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
    return __builtin_convertvector((rounded & ~nan) | (0x7fc0u & nan), u16x16);
}
#endif

static inline f32x16 widen(u16x16 h) {
    u32x16 bits = __builtin_convertvector(h, u32x16) << 16;
    f32x16 f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline f32x16 round_bf16(f32x16 f) { return widen(to_bf16(f)); }

static inline f32x16 load_bf16(const uint16_t *p, int64_t lanes) {
    u16x16 h = {0};
    COPY_LANES(&h, p, lanes, sizeof *p);
    return widen(h);
}

static inline void store_bf16(uint16_t *p, f32x16 f, int64_t lanes) {
    u16x16 h = to_bf16(f);
    COPY_LANES(p, &h, lanes, sizeof *p);
}

static inline int64_t lanes_from(int64_t c, int64_t n) { return n - c < LANES ? n - c : LANES; }

static inline int64_t padded(int64_t n) { return (n + LANES - 1) / LANES * LANES; }

/* `rows` rows of `n` bfloat16 values as float32, each padded with zeros to whole vectors (rows of
 * padded(n)): the dot products below run over whole vectors only, the padding adding exact zeros. */
static void widen_rows(const uint16_t *src, int64_t src_stride, int64_t rows, int64_t n, float *dst) {
    const int64_t n_p = padded(n);
    for (int64_t u = 0; u < rows; u++)
        for (int64_t j = 0; j < n_p; j += LANES)
            store_f32(dst + u * n_p + j, load_bf16(src + u * src_stride + j, lanes_from(j, n)), LANES);
}

static inline float sum_lanes(f32x16 v) {
    float s = 0.0f;
    for (int i = 0; i < LANES; i++) s += v[i];
    return s;
}

/* What stays put between calls for one layer (rows_kernel._Layer mirrors it). */
typedef struct {
    int64_t in;                    /* columns of x */
    int64_t slices;
    const int64_t *width;          /* per slice: its output columns, side by side in y */
    const uint16_t *const *shrink; /* per slot: K x in, bfloat16, row-major */
    const uint16_t *const *expand; /* per slot: rank x sum(width), bfloat16: slice i's B^T at its columns */
    const int64_t *rank;           /* per slot */
    int64_t max_k;                 /* the largest K a slot can have: slices x vLLM's max rank */
} trainq_lora_layer;

/* A tile is up to TILE_ROWS consecutive rows of one slot: each block of the slot's weights is read once
 * per tile rather than once per row. */
enum { TILE_ROWS = 8, SHRINK_BLOCK = 4 };

/* sums[r][q] = af[q] . x[r] for q < SHRINK_BLOCK and r < R, R being 1 or 2 (a constant where this is
 * inlined, so that the sums stay in registers): R rows of x (padded float32) against four rows of A. */
static inline __attribute__((always_inline)) void shrink_sums(const float *af, const float *x, int64_t in_p,
                                                              int64_t R, float sums[2][SHRINK_BLOCK]) {
    f32x16 s[2][SHRINK_BLOCK] = {{{0}}};
    for (int64_t j = 0; j < in_p; j += LANES) {
        f32x16 v[2];
        for (int64_t r = 0; r < R; r++) v[r] = load_f32(x + r * in_p + j, LANES);
        for (int q = 0; q < SHRINK_BLOCK; q++) {
            f32x16 a = load_f32(af + q * in_p + j, LANES);
            for (int64_t r = 0; r < R; r++) s[r][q] += a * v[r];
        }
    }
    for (int64_t r = 0; r < R; r++)
        for (int q = 0; q < SHRINK_BLOCK; q++) sums[r][q] = sum_lanes(s[r][q]);
}

/* h[u][k] = round(scale * A[k] . x[u]) for the tile's n rows (xf: n padded float32 rows). Four rows of A,
 * widened once per tile into af, against two rows of x at a time (eight sums in registers, six vector
 * loads for eight multiply-adds), an odd last row alone. */
static void shrink_tile(const trainq_lora_layer *layer, int64_t s, const float *xf, int64_t n, float scale,
                        float *af, float *h) {
    const int64_t in = layer->in, in_p = padded(in), k_total = layer->slices * layer->rank[s];
    for (int64_t k = 0; k < k_total; k += SHRINK_BLOCK) {
        const int64_t block = k_total - k < SHRINK_BLOCK ? k_total - k : SHRINK_BLOCK;
        widen_rows(layer->shrink[s] + k * in, in, block, in, af);
        memset(af + block * in_p, 0, sizeof(float) * (size_t)((SHRINK_BLOCK - block) * in_p));
        for (int64_t u = 0; u < n; u += 2) {
            const int64_t pair = u + 1 < n ? 2 : 1;
            float sums[2][SHRINK_BLOCK];
            if (pair == 2)
                shrink_sums(af, xf + u * in_p, in_p, 2, sums);
            else
                shrink_sums(af, xf + u * in_p, in_p, 1, sums);
            for (int64_t r = 0; r < pair; r++)
                for (int64_t q = 0; q < block; q++) h[(u + r) * k_total + k + q] = sums[r][q];
        }
    }
    for (int64_t j = 0; j < n * k_total; j += LANES) {
        int64_t lanes = lanes_from(j, n * k_total);
        store_f32(h + j, round_bf16(scale * load_f32(h + j, lanes)), lanes);
    }
}

/* y[u][c] = round(y[u][c] + round(sum_k h[u][k] * e[k][c])) for the tile's N rows, k < r and `lanes`
 * (<= LANES) columns c: `e` advances by `e_stride` a k, `h` and `y` by `h_stride` and `y_stride` a row.
 * Each row's sums stay in a register across the loop over k, and each vector of e is loaded once for all
 * N rows (N a constant where this is inlined: see expand_tile). */
static inline __attribute__((always_inline)) void expand_columns(
    const float *h, int64_t h_stride, int64_t N, int64_t r, const uint16_t *e, int64_t e_stride, uint16_t *y,
    int64_t y_stride, int64_t lanes) {
    f32x16 sum[TILE_ROWS] = {{0}};
    for (int64_t k = 0; k < r; k++) {
        f32x16 e_k = load_bf16(e + k * e_stride, lanes);
        for (int64_t u = 0; u < N; u++) sum[u] += h[u * h_stride + k] * e_k;
    }
    for (int64_t u = 0; u < N; u++) {
        uint16_t *y_row = y + u * y_stride;
        store_bf16(y_row, load_bf16(y_row, lanes) + round_bf16(sum[u]), lanes);
    }
}

static inline __attribute__((always_inline)) void expand_rows(const trainq_lora_layer *layer, int64_t s,
                                                              const float *h, int64_t N, uint16_t *y,
                                                              int64_t y_stride) {
    const int64_t r = layer->rank[s], k_total = layer->slices * r;
    int64_t total_width = 0;
    for (int64_t i = 0; i < layer->slices; i++) total_width += layer->width[i];
    const uint16_t *e = layer->expand[s];
    for (int64_t i = 0, offset = 0; i < layer->slices; offset += layer->width[i], i++) {
        const float *h_i = h + i * r;
        const int64_t end = offset + layer->width[i];
        int64_t c = offset;
        for (; c + LANES <= end; c += LANES)  /* LANES a constant here: whole vector moves */
            expand_columns(h_i, k_total, N, r, e + c, total_width, y + c, y_stride, LANES);
        if (c < end) expand_columns(h_i, k_total, N, r, e + c, total_width, y + c, y_stride, end - c);
    }
}

/* One copy of expand_rows per row count, so that each keeps its N sums in registers. */
static void expand_tile(const trainq_lora_layer *layer, int64_t s, const float *h, int64_t n, uint16_t *y,
                        int64_t y_stride) {
    switch (n) {
#define EXPAND_CASE(N) \
    case N: expand_rows(layer, s, h, N, y, y_stride); break;
        EXPAND_CASE(1) EXPAND_CASE(2) EXPAND_CASE(3) EXPAND_CASE(4)
        EXPAND_CASE(5) EXPAND_CASE(6) EXPAND_CASE(7) EXPAND_CASE(8)
#undef EXPAND_CASE
    }
}

_Static_assert(TILE_ROWS == 8, "expand_tile has a case for each row count of a tile");

/* Returns 0, or -1 (nothing written) when its scratch memory cannot be allocated. */
int trainq_lora_rows(const trainq_lora_layer *layer, const uint16_t *x, int64_t x_stride, int64_t rows,
                     uint16_t *y, int64_t y_stride, const int64_t *slots, float scale) {
    const int64_t in_p = padded(layer->in);
    float *xf = malloc(sizeof(float) * (size_t)((TILE_ROWS + SHRINK_BLOCK) * in_p + TILE_ROWS * layer->max_k));
    if (xf == NULL) return -1;
    float *af = xf + TILE_ROWS * in_p, *h = af + SHRINK_BLOCK * in_p;
    for (int64_t t = 0; t < rows;) {
        int64_t s = slots[t], n = 1;
        if (s < 0) {
            t++;
            continue;
        }
        while (n < TILE_ROWS && t + n < rows && slots[t + n] == s) n++;
        widen_rows(x + t * x_stride, x_stride, n, layer->in, xf);
        shrink_tile(layer, s, xf, n, scale, af, h);
        expand_tile(layer, s, h, n, y + t * y_stride, y_stride);
        t += n;
    }
    free(xf);
    return 0;
}
