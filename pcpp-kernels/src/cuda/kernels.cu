// pcpp CUDA kernels, compiled at run time with NVRTC (no CUDA headers needed).
// Element types: float (f32), f16_t and bf16_t (raw 16-bit storage, converted with PTX cvt).
// Every kernel computes in f32 and is the GPU twin of the CPU function of the same role in
// pcpp-kernels/src/cpu/mod.rs.

struct f16_t { unsigned short x; };
struct bf16_t { unsigned short x; };

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(f16_t v) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v.x));
    return f;
}
__device__ __forceinline__ float to_f(bf16_t v) { return __uint_as_float(((unsigned)v.x) << 16); }

template <typename T> __device__ __forceinline__ T from_f(float f);
template <> __device__ __forceinline__ float from_f<float>(float f) { return f; }
template <> __device__ __forceinline__ f16_t from_f<f16_t>(float f) {
    f16_t r;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r.x) : "f"(f));
    return r;
}
template <> __device__ __forceinline__ bf16_t from_f<bf16_t>(float f) {
    bf16_t r;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r.x) : "f"(f));
    return r;
}

__device__ __forceinline__ float silu_f(float x) { return x / (1.0f + expf(-x)); }
__device__ __forceinline__ float gelu_f(float x) { return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f)); }
__device__ __forceinline__ float gelu_tanh_f(float x) {
    return 0.5f * x * (1.0f + tanhf(0.79788456080286536f * (x + 0.044715f * x * x * x)));
}
__device__ __forceinline__ float quick_gelu_f(float x) { return x / (1.0f + expf(-1.702f * x)); }

#define GRID_STRIDE(i, n) for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (long)blockDim.x * gridDim.x)

// ---- casts ----
template <typename S, typename D>
__device__ void cast_impl(const S* x, D* y, long n) {
    GRID_STRIDE(i, n) y[i] = from_f<D>(to_f(x[i]));
}

// ---- unary: 0 affine(a, b), 1 clamp(a, b), 2 silu, 3 gelu, 4 gelu_tanh, 5 quick_gelu, 6 relu ----
__device__ __forceinline__ float unary_op(float v, int op, float a, float b) {
    switch (op) {
    case 0: return v * a + b;
    case 1: return fminf(fmaxf(v, a), b);
    case 2: return silu_f(v);
    case 3: return gelu_f(v);
    case 4: return gelu_tanh_f(v);
    case 5: return quick_gelu_f(v);
    default: return fmaxf(v, 0.0f);
    }
}
template <typename T>
__device__ void unary_impl(const T* x, T* y, long n, int op, float a, float b) {
    GRID_STRIDE(i, n) y[i] = from_f<T>(unary_op(to_f(x[i]), op, a, b));
}

// ---- binary with broadcasting: 0 add, 1 sub, 2 mul, 3 div ----
struct Bcast {
    int rank;
    long shape[6];
    long sa[6];
    long sb[6];
};
__device__ __forceinline__ float binary_op(float a, float b, int op) {
    switch (op) {
    case 0: return a + b;
    case 1: return a - b;
    case 2: return a * b;
    default: return a / b;
    }
}
template <typename T>
__device__ void binary_impl(const T* a, const T* b, T* y, long n, int op, Bcast bc) {
    GRID_STRIDE(i, n) {
        long rem = i, oa = 0, ob = 0;
        for (int d = bc.rank - 1; d >= 0; --d) {
            long c = rem % bc.shape[d];
            rem /= bc.shape[d];
            oa += c * bc.sa[d];
            ob += c * bc.sb[d];
        }
        y[i] = from_f<T>(binary_op(to_f(a[oa]), to_f(b[ob]), op));
    }
}
template <typename T>
__device__ void binary_same_impl(const T* a, const T* b, T* y, long n, int op) {
    GRID_STRIDE(i, n) y[i] = from_f<T>(binary_op(to_f(a[i]), to_f(b[i]), op));
}

// ---- GEGLU: rows of [h | gate] -> h * gelu(gate) ----
template <typename T>
__device__ void geglu_impl(const T* x, T* y, long rows, long h) {
    GRID_STRIDE(i, rows * h) {
        long r = i / h, j = i % h;
        const T* row = x + r * 2 * h;
        y[i] = from_f<T>(to_f(row[j]) * gelu_f(to_f(row[h + j])));
    }
}

// ---- block reductions ----
__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
__device__ float block_sum(float v, float* sh) {
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) sh[w] = v;
    __syncthreads();
    float t = lane < nw ? sh[lane] : 0.0f;
    return warp_sum(t);
}
__device__ float block_max(float v, float* sh) {
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) sh[w] = v;
    __syncthreads();
    float t = lane < nw ? sh[lane] : -3.0e38f;
    return warp_max(t);
}

// ---- group norm ----
// sums[(b*groups+g)*2 + {0,1}] += (Σx, Σx²) over one chunk of the group's contiguous range.
// grid: (chunks, b*groups). sums must be zeroed first.
template <typename T>
__device__ void gn_sums_impl(const T* x, double* sums, long group_len, long chunk) {
    __shared__ float sh[32];
    long bg = blockIdx.y;
    long start = (long)blockIdx.x * chunk;
    long end = min(start + chunk, group_len);
    const T* base = x + bg * group_len;
    float s = 0.0f, s2 = 0.0f;
    for (long i = start + threadIdx.x; i < end; i += blockDim.x) {
        float v = to_f(base[i]);
        s += v;
        s2 += v * v;
    }
    float ts = block_sum(s, sh);
    float ts2 = block_sum(s2, sh);
    if (threadIdx.x == 0) {
        atomicAdd(&sums[bg * 2], (double)ts);
        atomicAdd(&sums[bg * 2 + 1], (double)ts2);
    }
}
// mean_rstd[bg*2] = mean, [bg*2+1] = 1/sqrt(var + eps), from sums over n elements.
extern "C" __global__ void gn_finalize(const double* sums, float* mean_rstd, int count, double n, double eps) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < count) {
        double m = sums[i * 2] / n;
        double v = sums[i * 2 + 1] / n - m * m;
        if (v < 0.0) v = 0.0;
        mean_rstd[i * 2] = (float)m;
        mean_rstd[i * 2 + 1] = (float)(1.0 / sqrt(v + eps));
    }
}
// moments[bg*2] = mean, [bg*2+1] = m2 = sum of (x - mean)^2, from sums over n elements (both 0 when
// n is 0): the twin of cpu::group_moments (m2 = max(s2 - s*mean, 0), product not fused).
extern "C" __global__ void gn_moments(const double* sums, float* moments, int count, double n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < count) {
        double mean = 0.0, m2 = 0.0;
        if (n > 0.0) {
            mean = sums[i * 2] / n;
            m2 = sums[i * 2 + 1] - __dmul_rn(sums[i * 2], mean);
            if (m2 < 0.0) m2 = 0.0;
        }
        moments[i * 2] = (float)mean;
        moments[i * 2 + 1] = (float)m2;
    }
}
// ---- merged group-norm statistics from per-band moments (twin of cpu::merge_group_moments) ----
// Element counts of up to 64 bands, passed by value.
struct GnCounts { double n[64]; };
struct Moments { double n, mean, m2; };
// Chan et al.'s pairwise merge, in the CPU twin's operation order.
__device__ __forceinline__ Moments mom_merge(Moments a, Moments b) {
    double n = a.n + b.n;
    if (n == 0.0) return a;
    double d = b.mean - a.mean;
    Moments r;
    r.n = n;
    r.mean = a.mean + __dmul_rn(d, b.n) / n;
    r.m2 = a.m2 + b.m2 + __dmul_rn(__dmul_rn(__dmul_rn(d, d), a.n), b.n) / n;
    return r;
}
__device__ __forceinline__ double mom_var(Moments m) { return m.n > 0.0 ? m.m2 / m.n : 0.0; }
__device__ __forceinline__ double mom_ex2(Moments m) { return mom_var(m) + __dmul_rn(m.mean, m.mean); }
// bands: [p, count, 2] (mean, m2); fresh: [count, 2] when own >= 0 (corrected stale statistics: band
// `own` holds this rank's previous moments). Writes mean_rstd[i*2] = mean, [i*2+1] = 1/sqrt(var + eps).
extern "C" __global__ void gn_merge(const float* bands, const float* fresh, float* mean_rstd, int p, int count,
                                    GnCounts counts, int own, double eps) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= count) return;
    Moments t = {0.0, 0.0, 0.0};
    for (int j = 0; j < p; ++j) {
        const float* r = bands + ((long)j * count + i) * 2;
        Moments m = {counts.n[j], (double)r[0], (double)r[1]};
        t = mom_merge(t, m);
    }
    double mean = t.mean, var = mom_var(t);
    if (own >= 0) {
        const float* r = bands + ((long)own * count + i) * 2;
        Moments prev = {counts.n[own], (double)r[0], (double)r[1]};
        Moments cur = {counts.n[own], (double)fresh[i * 2], (double)fresh[i * 2 + 1]};
        mean = t.mean + (cur.mean - prev.mean);
        double e2 = mom_ex2(t) + (mom_ex2(cur) - mom_ex2(prev));
        var = e2 - __dmul_rn(mean, mean);
        if (var < 0.0) var = mom_var(cur);
    }
    if (var < 0.0) var = 0.0;
    mean_rstd[i * 2] = (float)mean;
    mean_rstd[i * 2 + 1] = (float)(1.0 / sqrt(var + eps));
}
// y = (x - mean) * rstd * gamma[c] + beta[c], optional SiLU. x: [b, c, s].
template <typename T>
__device__ void gn_apply_impl(const T* x, const float* mean_rstd, const T* gamma, const T* beta, T* y,
                              long c, long s, long groups, int silu, long n) {
    long cg = c / groups;
    GRID_STRIDE(i, n) {
        long ch = (i / s) % c;
        long bi = i / (s * c);
        long bg = bi * groups + ch / cg;
        float v = (to_f(x[i]) - mean_rstd[bg * 2]) * mean_rstd[bg * 2 + 1];
        if (gamma) v *= to_f(gamma[ch]);
        if (beta) v += to_f(beta[ch]);
        if (silu) v = silu_f(v);
        y[i] = from_f<T>(v);
    }
}

// ---- layer norm over the last axis: one block per row ----
template <typename T>
__device__ void layer_norm_impl(const T* x, const T* gamma, const T* beta, T* y, long d, float eps) {
    __shared__ float sh[32];
    const T* row = x + (long)blockIdx.x * d;
    T* out = y + (long)blockIdx.x * d;
    float s = 0.0f;
    for (long j = threadIdx.x; j < d; j += blockDim.x) s += to_f(row[j]);
    float mean = block_sum(s, sh) / (float)d;
    float s2 = 0.0f;
    for (long j = threadIdx.x; j < d; j += blockDim.x) {
        float v = to_f(row[j]) - mean;
        s2 += v * v;
    }
    float var = block_sum(s2, sh) / (float)d;
    float rstd = rsqrtf(var + eps);
    for (long j = threadIdx.x; j < d; j += blockDim.x) {
        float v = (to_f(row[j]) - mean) * rstd;
        if (gamma) v *= to_f(gamma[j]);
        if (beta) v += to_f(beta[j]);
        out[j] = from_f<T>(v);
    }
}

// ---- RMS norm over the last axis (one block per row): x / sqrt(mean(x^2) + eps) * gamma ----
template <typename T>
__device__ void rms_norm_impl(const T* x, const T* gamma, T* y, long d, float eps) {
    __shared__ float sh[32];
    const T* row = x + (long)blockIdx.x * d;
    T* out = y + (long)blockIdx.x * d;
    float s2 = 0.0f;
    for (long j = threadIdx.x; j < d; j += blockDim.x) {
        float v = to_f(row[j]);
        s2 += v * v;
    }
    float rstd = rsqrtf(block_sum(s2, sh) / (float)d + eps);
    for (long j = threadIdx.x; j < d; j += blockDim.x) {
        float v = to_f(row[j]) * rstd;
        if (gamma) v *= to_f(gamma[j]);
        out[j] = from_f<T>(v);
    }
}

// ---- row softmax of f32 scores (already scaled) into T probabilities; one block per row.
// Causal: row r (query index r0 + r within the chunk) sees keys 0..=r0+r only.
template <typename T>
__device__ void softmax_impl(const float* s, T* p, long cols, int causal, long q0, long rows_per_head) {
    __shared__ float sh[32];
    long r = blockIdx.x;
    const float* row = s + r * cols;
    T* out = p + r * cols;
    long lim = causal ? min(cols, q0 + (r % rows_per_head) + 1) : cols;
    float m = -3.0e38f;
    for (long j = threadIdx.x; j < lim; j += blockDim.x) m = fmaxf(m, row[j]);
    m = block_max(m, sh);
    float sum = 0.0f;
    for (long j = threadIdx.x; j < lim; j += blockDim.x) sum += expf(row[j] - m);
    sum = block_sum(sum, sh);
    float inv = 1.0f / sum;
    for (long j = threadIdx.x; j < cols; j += blockDim.x)
        out[j] = from_f<T>(j < lim ? expf(row[j] - m) * inv : 0.0f);
}

// ---- nearest x2 up-sampling of [n, h, w] planes ----
template <typename T>
__device__ void upsample2x_impl(const T* x, T* y, long n, long h, long w) {
    long w2 = 2 * w, h2 = 2 * h;
    GRID_STRIDE(i, n * h2 * w2) {
        long xo = i % w2, yo = (i / w2) % h2, p = i / (w2 * h2);
        y[i] = x[(p * h + yo / 2) * w + xo / 2];
    }
}

// ---- bias over channels of [b, c, s] ----
template <typename T>
__device__ void bias_nchw_impl(T* y, const T* bias, long c, long s, long n) {
    GRID_STRIDE(i, n) {
        long ch = (i / s) % c;
        y[i] = from_f<T>(to_f(y[i]) + to_f(bias[ch]));
    }
}

// ---- sinusoidal timestep embedding: t [b] -> [b, dim] ----
template <typename T>
__device__ void timestep_emb_impl(const T* t, T* y, long b, long dim, int flip, float shift) {
    long half = dim / 2;
    GRID_STRIDE(i, b * dim) {
        long r = i / dim, j = i % dim;
        float v = 0.0f;
        if (j < 2 * half) {
            long k = j < half ? j : j - half;
            bool first = j < half;
            float e = -logf(10000.0f) * (float)k;
            float f = expf(e / ((float)half - shift));
            float a = to_f(t[r]) * f;
            bool use_cos = flip ? first : !first;
            v = use_cos ? cosf(a) : sinf(a);
        }
        y[i] = from_f<T>(v);
    }
}

// ---- deterministic uniform fill (random weights for benchmarks) ----
__device__ __forceinline__ unsigned long long splitmix(unsigned long long z) {
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}
template <typename T>
__device__ void fill_uniform_impl(T* y, long n, unsigned long long seed, float lo, float hi) {
    GRID_STRIDE(i, n) {
        unsigned long long r = splitmix(seed * 0x100000001B3ull + (unsigned long long)i);
        float u = (float)(r >> 40) * (1.0f / 16777216.0f);
        y[i] = from_f<T>(lo + (hi - lo) * u);
    }
}

// ---- dtype-agnostic data movement on 16- or 32-bit words ----
// rows of `cols` words: dst[r*dpitch + j] = src[r*spitch + j]
template <typename W>
__device__ void copy2d_impl(const W* src, W* dst, long rows, long cols, long spitch, long dpitch) {
    GRID_STRIDE(i, rows * cols) {
        long r = i / cols, j = i % cols;
        dst[r * dpitch + j] = src[r * spitch + j];
    }
}
struct Perm {
    int rank;
    long shape[6];   // output shape
    long stride[6];  // source stride of each output axis
};
template <typename W>
__device__ void permute_impl(const W* src, W* dst, long n, Perm p) {
    GRID_STRIDE(i, n) {
        long rem = i, off = 0;
        for (int d = p.rank - 1; d >= 0; --d) {
            off += (rem % p.shape[d]) * p.stride[d];
            rem /= p.shape[d];
        }
        dst[i] = src[off];
    }
}
// zero padding of [n, h, w] planes to [n, h+pt+pb, w+pl+pr]
template <typename W>
__device__ void pad2d_impl(const W* src, W* dst, long n, long h, long w, long pt, long pl, long ho, long wo) {
    GRID_STRIDE(i, n * ho * wo) {
        long xo = i % wo, yo = (i / wo) % ho, p = i / (wo * ho);
        long yi = yo - pt, xi = xo - pl;
        W v;
        if (yi >= 0 && yi < h && xi >= 0 && xi < w) v = src[(p * h + yi) * w + xi];
        else v = (W)0;
        dst[i] = v;
    }
}
// rows of a [rows, d] table picked by ids
template <typename W>
__device__ void gather_rows_impl(const unsigned* ids, const W* table, W* y, long n, long d) {
    GRID_STRIDE(i, n * d) y[i] = table[(long)ids[i / d] * d + i % d];
}



// ---- per-plane kernels on [planes, s] data, grid (x, planes): no per-element index division ----
// y = op(a, v[plane % vmod]) (op codes of `binary_op`): a [b, c, 1, 1]-shaped operand (vmod = b*c)
// or a per-channel bias (vmod = c) against [b, c, h, w]. `y` may be `a`.
template <typename T>
__device__ void plane_binary_impl(const T* a, const T* v, T* y, long s, int op, long vmod) {
    long p = blockIdx.y;
    float w = to_f(v[p % vmod]);
    const T* ap = a + p * s;
    T* yp = y + p * s;
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < s; i += (long)blockDim.x * gridDim.x)
        yp[i] = from_f<T>(binary_op(to_f(ap[i]), w, op));
}
// Group-norm apply with the plane's statistics and affine fetched once per block.
template <typename T>
__device__ void gn_apply_planes_impl(const T* x, const float* mean_rstd, const T* gamma, const T* beta, T* y,
                                     int c, long s, int groups, int silu) {
    long p = blockIdx.y;
    int ch = (int)(p % c);
    long bg = (p / c) * groups + ch / (c / groups);
    float rstd = mean_rstd[bg * 2 + 1];
    float scale = rstd * (gamma ? to_f(gamma[ch]) : 1.0f);
    float shift = (beta ? to_f(beta[ch]) : 0.0f) - mean_rstd[bg * 2] * scale;
    const T* xp = x + p * s;
    T* yp = y + p * s;
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < s; i += (long)blockDim.x * gridDim.x) {
        float v = to_f(xp[i]) * scale + shift;
        if (silu) v = silu_f(v);
        yp[i] = from_f<T>(v);
    }
}

// ---- fused flash attention (FlashAttention-2 style) for head sizes 64 and 128, f16/bf16 ----
// Tensor-core mma.sync m16n8k16 with f32 accumulation; the score matrix lives only in registers,
// one BN-key tile at a time. q, o: [b, lq, heads*D]; k, v: [b, lk, heads*D].
// grid (ceil(lq/BM), heads, b), block 128: 4 warps x (16*MT) query rows, BM = 64*MT.
// D = 64 (SDXL): MT = 2, BN = 64; D = 128 (Flux.1): MT = 1, BN = 32, so that the registers of the
// accumulators and the two K/V stages (2*2*BN*(D+8) halves) stay within the static limits.
#define NEG_INF (-__int_as_float(0x7f800000))
template <int BF>
__device__ __forceinline__ void mma16816(float* c, const unsigned* a, const unsigned* b) {
    if (BF)
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                     : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    else
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                     : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
__device__ __forceinline__ float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}
template <int BF>
__device__ __forceinline__ unsigned pack2(float lo, float hi) {
    unsigned r;
    if (BF) asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    else asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}
struct alignas(16) U4 { unsigned x, y, z, w; };
__device__ __forceinline__ unsigned smem_addr(const void* p) {
    unsigned a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}
// 16-byte global -> shared copy, asynchronous; `bytes` = 0 fills zeros (nothing is read).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, int bytes) {
    unsigned long long g;
    asm("cvta.to.global.u64 %0, %1;" : "=l"(g) : "l"(src));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(smem_addr(dst)), "l"(g), "r"(bytes)
                 : "memory");
}
// Four 8x8 b16 matrices from shared memory (row addresses from lanes 8m..8m+7).
__device__ __forceinline__ void ldmatrix_x4(unsigned* r, const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p)));
}
// Four 8x8 b16 matrices, transposed, from shared memory (row addresses from lanes 8m..8m+7).
__device__ __forceinline__ void ldmatrix_x4_trans(unsigned* r, const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p)));
}
// The same at a 32-bit shared-memory address (base + constant offsets fold into the instruction).
__device__ __forceinline__ void ldsm_x4(unsigned* r, unsigned a) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
}
__device__ __forceinline__ void ldsm_x4_trans(unsigned* r, unsigned a) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
}
// QS = 0: each warp keeps its Q fragments in registers, K/V stages in static shared memory.
// QS = 1: the block's Q tile sits in (dynamic) shared memory beside the K/V stages and each warp
// loads its fragments with ldmatrix per 32 dims: this frees the registers that two m16 tiles per
// warp need at head size 128 (every K/V fragment then feeds two MMAs).
template <int BF, int D, int MT, int BN, int QS>
__device__ void flash_attn_impl(const unsigned short* q, const unsigned short* k, const unsigned short* v,
                                unsigned short* o, int lq, int lk, int heads, float scale_log2, int causal,
                                unsigned short* dyn) {
    // 4 warps x 16*MT query rows (the MT m16 tiles of a warp share every K/V fragment).
    constexpr int BM = 64 * MT, LDS = D + 8, NT = 128, KD = D / 16, ND = D / 8, NJ = BN / 8;
    // Two stages of K and V tiles: the next tile streams in (cp.async) while this one is used.
    __shared__ __align__(16) unsigned short Kstat[QS ? 1 : 2][QS ? 1 : BN * LDS];
    __shared__ __align__(16) unsigned short Vstat[QS ? 1 : 2][QS ? 1 : BN * LDS];
    unsigned short* Qsm = dyn;
    // Stage `st` of the K and V tiles.
    auto kst = [&](int st) -> unsigned short* {
        if constexpr (QS) return dyn + BM * LDS + st * BN * LDS;
        else return Kstat[st];
    };
    auto vst = [&](int st) -> unsigned short* {
        if constexpr (QS) return dyn + BM * LDS + (2 + st) * BN * LDS;
        else return Vstat[st];
    };
    int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    int bi = blockIdx.z, h = blockIdx.y;
    long dm = (long)heads * D;
    int q0 = blockIdx.x * BM + warp * 16 * MT;
    const unsigned short* qb = q + (long)bi * lq * dm + h * D;
    const unsigned short* kg = k + (long)bi * lk * dm + h * D;
    const unsigned short* vg = v + (long)bi * lk * dm + h * D;
    unsigned short* ob = o + (long)bi * lq * dm + h * D;
    int c = 2 * (lane % 4);
    int rr[MT][2];
    unsigned qa[QS ? 1 : MT][QS ? 1 : KD][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
        rr[mt][0] = q0 + mt * 16 + lane / 4;
        rr[mt][1] = rr[mt][0] + 8;
        if constexpr (QS == 0) {
#pragma unroll
            for (int kk = 0; kk < KD; ++kk) {
                int col = kk * 16 + c;
                int r0 = rr[mt][0], r1 = rr[mt][1];
                qa[mt][kk][0] = r0 < lq ? *(const unsigned*)(qb + (long)r0 * dm + col) : 0u;
                qa[mt][kk][1] = r1 < lq ? *(const unsigned*)(qb + (long)r1 * dm + col) : 0u;
                qa[mt][kk][2] = r0 < lq ? *(const unsigned*)(qb + (long)r0 * dm + col + 8) : 0u;
                qa[mt][kk][3] = r1 < lq ? *(const unsigned*)(qb + (long)r1 * dm + col + 8) : 0u;
            }
        }
    }
    float acc[MT][ND][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int d = 0; d < ND; ++d) acc[mt][d][0] = acc[mt][d][1] = acc[mt][d][2] = acc[mt][d][3] = 0.0f;
    float mrow[MT][2], lrow[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
        mrow[mt][0] = mrow[mt][1] = NEG_INF;
        lrow[mt][0] = lrow[mt][1] = 0.0f;
    }
    int kend = causal ? min(lk, (int)(blockIdx.x * BM + BM)) : lk;
    int ntiles = (kend + BN - 1) / BN;
    auto load_tile = [&](int tile, int stage) {
        for (int i = tid; i < BN * ND; i += NT) {
            int row = i / ND, ch = (i % ND) * 8;
            int key = tile * BN + row;
            int ok = key < lk ? 16 : 0;
            long src = (long)(key < lk ? key : 0) * dm + ch;
            cp_async16(kst(stage) + row * LDS + ch, kg + src, ok);
            cp_async16(vst(stage) + row * LDS + ch, vg + src, ok);
        }
        asm volatile("cp.async.commit_group;" ::: "memory");
    };
    if constexpr (QS) {
        int qrow0 = blockIdx.x * BM;
        for (int i = tid; i < BM * ND; i += NT) {
            int row = i / ND, ch = (i % ND) * 8;
            int r = qrow0 + row;
            cp_async16(&Qsm[row * LDS + ch], qb + (long)(r < lq ? r : 0) * dm + ch, r < lq ? 16 : 0);
        }
        asm volatile("cp.async.commit_group;" ::: "memory");
    }
    if (ntiles > 0) load_tile(0, 0);
    for (int tile = 0; tile < ntiles; ++tile) {
        int kb = tile * BN;
        const unsigned short* Ks = kst(tile & 1);
        const unsigned short* Vs = vst(tile & 1);
        if (tile + 1 < ntiles) {
            load_tile(tile + 1, (tile + 1) & 1);
            asm volatile("cp.async.wait_group 1;" ::: "memory");
        } else {
            asm volatile("cp.async.wait_group 0;" ::: "memory");
        }
        __syncthreads();
        float s[MT][NJ][4];
#pragma unroll
        for (int j = 0; j < NJ; ++j)
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) s[mt][j][0] = s[mt][j][1] = s[mt][j][2] = s[mt][j][3] = 0.0f;
        if constexpr (QS && BN >= 64) {
            // 64-key tiles: one 16-dim slice of Q and K at a time, so that the scores of the
            // whole tile, the output accumulators and the fragments fit the registers.
            const unsigned qa0 =
                smem_addr(Qsm + (warp * 16 * MT + (lane & 15)) * LDS + (lane >> 4) * 8);
            const unsigned ka0 = smem_addr(Ks + ((lane & 7) + ((lane >> 4) << 3)) * LDS + ((lane >> 3) & 1) * 8);
#pragma unroll
            for (int kk = 0; kk < KD; ++kk) {
                unsigned qf[MT][4];
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) ldsm_x4(qf[mt], qa0 + (mt * 16 * LDS + kk * 16) * 2);
#pragma unroll
                for (int j = 0; j < NJ; j += 2) {
                    // Keys j*8.. (matrices 0, 1) and (j+1)*8.. (matrices 2, 3), dims kk*16...
                    unsigned bk[4];
                    ldsm_x4(bk, ka0 + (j * 8 * LDS + kk * 16) * 2);
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt) {
                        mma16816<BF>(s[mt][j], qf[mt], bk);
                        mma16816<BF>(s[mt][j + 1], qf[mt], bk + 2);
                    }
                }
            }
        } else if constexpr (QS) {
#pragma unroll
            for (int kk = 0; kk < KD; kk += 2) {
                // This warp's Q fragments of dims kk*16.. and (kk+1)*16.., from shared memory.
                unsigned qf[MT][2][4];
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    const unsigned short* qrow =
                        Qsm + (warp * 16 * MT + mt * 16 + (lane & 15)) * LDS + (lane >> 4) * 8;
                    ldmatrix_x4(qf[mt][0], qrow + kk * 16);
                    ldmatrix_x4(qf[mt][1], qrow + (kk + 1) * 16);
                }
#pragma unroll
                for (int j = 0; j < NJ; ++j) {
                    // Keys j*8.., dims kk*16.. (matrices 0, 1) and (kk+1)*16.. (matrices 2, 3).
                    unsigned bk[4];
                    ldmatrix_x4(bk, Ks + (j * 8 + (lane & 7)) * LDS + kk * 16 + (lane >> 3) * 8);
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt) {
                        mma16816<BF>(s[mt][j], qf[mt][0], bk);
                        mma16816<BF>(s[mt][j], qf[mt][1], bk + 2);
                    }
                }
            }
        } else {
#pragma unroll
            for (int j = 0; j < NJ; ++j) {
#pragma unroll
                for (int kk = 0; kk < KD; kk += 2) {
                    // Keys j*8.., dims kk*16.. (matrices 0, 1) and (kk+1)*16.. (matrices 2, 3).
                    unsigned bk[4];
                    ldmatrix_x4(bk, Ks + (j * 8 + (lane & 7)) * LDS + kk * 16 + (lane >> 3) * 8);
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt) {
                        mma16816<BF>(s[mt][j], qa[mt][kk], bk);
                        mma16816<BF>(s[mt][j], qa[mt][kk + 1], bk + 2);
                    }
                }
            }
        }
        bool edge = (kb + BN > lk) || causal;
        // P = exp2(S − m) of this tile as the A fragments of the P·V MMAs, per 16 keys.
        unsigned pa[MT][BN / 16][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
            // Maxima in raw score units; the scale folds into the exponent's FMA below.
            float mx0 = NEG_INF, mx1 = NEG_INF;
#pragma unroll
            for (int j = 0; j < NJ; ++j) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    float val = s[mt][j][e];
                    if (edge) {
                        int key = kb + j * 8 + c + (e & 1);
                        int row = rr[mt][e >> 1];
                        if (key >= lk || (causal && key > row)) val = NEG_INF;
                    }
                    s[mt][j][e] = val;
                    if (e < 2) mx0 = fmaxf(mx0, val);
                    else mx1 = fmaxf(mx1, val);
                }
            }
#pragma unroll
            for (int off = 1; off < 4; off <<= 1) {
                mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, off));
                mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, off));
            }
            float mn0 = fmaxf(mrow[mt][0], mx0), mn1 = fmaxf(mrow[mt][1], mx1);
            float sub0 = mn0 == NEG_INF ? 0.0f : mn0 * scale_log2;
            float sub1 = mn1 == NEG_INF ? 0.0f : mn1 * scale_log2;
            float al0 = fast_exp2(fmaf(mrow[mt][0], scale_log2, -sub0));
            float al1 = fast_exp2(fmaf(mrow[mt][1], scale_log2, -sub1));
            mrow[mt][0] = mn0;
            mrow[mt][1] = mn1;
            float ls0 = 0.0f, ls1 = 0.0f;
#pragma unroll
            for (int j = 0; j < NJ; ++j) {
                float p0 = fast_exp2(fmaf(s[mt][j][0], scale_log2, -sub0));
                float p1 = fast_exp2(fmaf(s[mt][j][1], scale_log2, -sub0));
                float p2 = fast_exp2(fmaf(s[mt][j][2], scale_log2, -sub1));
                float p3 = fast_exp2(fmaf(s[mt][j][3], scale_log2, -sub1));
                ls0 += p0 + p1;
                ls1 += p2 + p3;
                // Packed at once into the A fragments of the P·V MMAs (keys 16t.., t = j / 2),
                // so the f32 scores need not stay live through them.
                pa[mt][j >> 1][(j & 1) * 2] = pack2<BF>(p0, p1);
                pa[mt][j >> 1][(j & 1) * 2 + 1] = pack2<BF>(p2, p3);
            }
            lrow[mt][0] = lrow[mt][0] * al0 + ls0;
            lrow[mt][1] = lrow[mt][1] * al1 + ls1;
#pragma unroll
            for (int d = 0; d < ND; ++d) {
                acc[mt][d][0] *= al0;
                acc[mt][d][1] *= al0;
                acc[mt][d][2] *= al1;
                acc[mt][d][3] *= al1;
            }
        }
        const unsigned va0 = smem_addr(Vs + (lane & 15) * LDS + (lane >> 4) * 8);
#pragma unroll
        for (int t = 0; t < BN / 16; ++t) {
#pragma unroll
            for (int d = 0; d < ND; d += 2) {
                unsigned bv[4];
                ldsm_x4_trans(bv, va0 + (t * 16 * LDS + d * 8) * 2);
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    mma16816<BF>(acc[mt][d], pa[mt][t], bv);
                    mma16816<BF>(acc[mt][d + 1], pa[mt][t], bv + 2);
                }
            }
        }
        // The next iteration's prefetch overwrites this stage.
        __syncthreads();
    }
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
        float l0 = lrow[mt][0], l1 = lrow[mt][1];
#pragma unroll
        for (int off = 1; off < 4; off <<= 1) {
            l0 += __shfl_xor_sync(0xffffffffu, l0, off);
            l1 += __shfl_xor_sync(0xffffffffu, l1, off);
        }
        float i0 = l0 > 0.0f ? 1.0f / l0 : 0.0f, i1 = l1 > 0.0f ? 1.0f / l1 : 0.0f;
        int r0 = rr[mt][0], r1 = rr[mt][1];
#pragma unroll
        for (int d = 0; d < ND; ++d) {
            int col = d * 8 + c;
            if (r0 < lq) *(unsigned*)(ob + (long)r0 * dm + col) = pack2<BF>(acc[mt][d][0] * i0, acc[mt][d][1] * i0);
            if (r1 < lq) *(unsigned*)(ob + (long)r1 * dm + col) = pack2<BF>(acc[mt][d][2] * i1, acc[mt][d][3] * i1);
        }
    }
}
#define FLASH_ATTN(NAME, BF, D, MT, BN)                                                                     \
    extern "C" __global__ void __launch_bounds__(128) NAME(const unsigned short* q, const unsigned short* k,  \
        const unsigned short* v, unsigned short* o, int lq, int lk, int heads, float scale_log2, int causal) { \
        flash_attn_impl<BF, D, MT, BN, 0>(q, k, v, o, lq, lk, heads, scale_log2, causal, nullptr);          \
    }
FLASH_ATTN(flash_attn_f16, 0, 64, 2, 64)
FLASH_ATTN(flash_attn_bf16, 1, 64, 2, 64)
FLASH_ATTN(flash_attn128_f16, 0, 128, 1, 32)
FLASH_ATTN(flash_attn128_bf16, 1, 128, 1, 32)
// Head size 128, two m16 tiles per warp (128 query rows per block), Q in shared memory:
// 2 * 32 * 136 * 2 (K/V stages) + 128 * 136 halves = 69 632 bytes of dynamic shared memory.
#define FLASH_ATTN_QS(NAME, BF, BN)                                                                         \
    extern "C" __global__ void __launch_bounds__(128) NAME(const unsigned short* q, const unsigned short* k,  \
        const unsigned short* v, unsigned short* o, int lq, int lk, int heads, float scale_log2, int causal) { \
        extern __shared__ __align__(16) unsigned short flash_dyn[];                                         \
        flash_attn_impl<BF, 128, 2, BN, 1>(q, k, v, o, lq, lk, heads, scale_log2, causal, flash_dyn);       \
    }
FLASH_ATTN_QS(flash_attn128q_f16, 0, 32)
FLASH_ATTN_QS(flash_attn128q_bf16, 1, 32)
// The same with 64-key tiles (FlashAttention-2's tile for head size 128 on Hopper): half the
// softmax rescales and barriers per key; 128 * 136 + 4 * 64 * 136 halves = 104 448 bytes.
FLASH_ATTN_QS(flash_attn128q64_f16, 0, 64)
FLASH_ATTN_QS(flash_attn128q64_bf16, 1, 64)


// ---- vectorised element-wise kernels and row norms (16 bytes per access: 8 halves or 4 floats) ----
// The host takes these only when every pointer is 16-byte aligned and the vectorised extent is a
// multiple of the vector; each is the twin of the scalar kernel above with the same math in f32.
template <typename T> struct VecN { static constexpr int N = 16 / (int)sizeof(T); };
template <typename T>
__device__ __forceinline__ void vload(const T* p, float* f) {
    U4 u = *(const U4*)p;
    const T* e = (const T*)&u;
#pragma unroll
    for (int i = 0; i < VecN<T>::N; ++i) f[i] = to_f(e[i]);
}
template <typename T>
__device__ __forceinline__ void vstore(T* p, const float* f) {
    U4 u;
    T* e = (T*)&u;
#pragma unroll
    for (int i = 0; i < VecN<T>::N; ++i) e[i] = from_f<T>(f[i]);
    *(U4*)p = u;
}
// nv vectors of a and b
template <typename T>
__device__ void binary_same_vec_impl(const T* a, const T* b, T* y, long nv, int op) {
    constexpr int N = VecN<T>::N;
    GRID_STRIDE(i, nv) {
        float x[N], z[N];
        vload(a + i * N, x);
        vload(b + i * N, z);
#pragma unroll
        for (int k = 0; k < N; ++k) x[k] = binary_op(x[k], z[k], op);
        vstore(y + i * N, x);
    }
}
template <typename T>
__device__ void unary_vec_impl(const T* x, T* y, long nv, int op, float a, float b) {
    constexpr int N = VecN<T>::N;
    GRID_STRIDE(i, nv) {
        float f[N];
        vload(x + i * N, f);
#pragma unroll
        for (int k = 0; k < N; ++k) f[k] = unary_op(f[k], op, a, b);
        vstore(y + i * N, f);
    }
}
// Row broadcast: `full` viewed as [P, R, C] (rows = P*R), `bc` as [P, C]: y = full op bc, or
// bc op full with `bleft`. grid (column blocks, row blocks), block 256; `vec`: C % N == 0 and
// aligned pointers, each thread then takes N columns.
template <typename T>
__device__ void rowb_binary_impl(const T* full, const T* bc, T* y, long rows, long rpp, long cols, int op,
                                 int bleft, int vec) {
    constexpr int N = VecN<T>::N;
    long cstart = (long)blockIdx.x * blockDim.x + threadIdx.x, cstep = (long)blockDim.x * gridDim.x;
    for (long r = blockIdx.y; r < rows; r += gridDim.y) {
        const T* fr = full + r * cols;
        const T* br = bc + (r / rpp) * cols;
        T* yr = y + r * cols;
        if (vec) {
            for (long c = cstart; c < cols / N; c += cstep) {
                float f[N], g[N];
                vload(fr + c * N, f);
                vload(br + c * N, g);
#pragma unroll
                for (int k = 0; k < N; ++k) f[k] = bleft ? binary_op(g[k], f[k], op) : binary_op(f[k], g[k], op);
                vstore(yr + c * N, f);
            }
        } else {
            for (long c = cstart; c < cols; c += cstep) {
                float f = to_f(fr[c]), g = to_f(br[c]);
                yr[c] = from_f<T>(bleft ? binary_op(g, f, op) : binary_op(f, g, op));
            }
        }
    }
}
// GEGLU with N columns per thread (h % N == 0, aligned).
template <typename T>
__device__ void geglu_vec_impl(const T* x, T* y, long rows, long h) {
    constexpr int N = VecN<T>::N;
    long hv = h / N;
    GRID_STRIDE(i, rows * hv) {
        long r = i / hv, j = (i % hv) * N;
        const T* row = x + r * 2 * h;
        float a[N], g[N];
        vload(row + j, a);
        vload(row + h + j, g);
#pragma unroll
        for (int k = 0; k < N; ++k) a[k] *= gelu_f(g[k]);
        vstore(y + r * h + j, a);
    }
}
// Sum over row r of one warp's lanes (vector loads when `vec`).
template <typename T>
__device__ __forceinline__ float row_sum(const T* row, long d, int vec, float shift, int squares) {
    constexpr int N = VecN<T>::N;
    int lane = threadIdx.x & 31;
    float s = 0.0f;
    if (vec) {
        for (long j = (long)lane * N; j < d; j += 32 * N) {
            float f[N];
            vload(row + j, f);
#pragma unroll
            for (int k = 0; k < N; ++k) {
                float v = f[k] - shift;
                s += squares ? v * v : v;
            }
        }
    } else {
        for (long j = lane; j < d; j += 32) {
            float v = to_f(row[j]) - shift;
            s += squares ? v * v : v;
        }
    }
    return warp_sum(s);
}
// One warp per row (8 rows per block of 256): layer norm (`mean_too`) or RMS norm, with optional
// gamma / beta. The twin of layer_norm_impl / rms_norm_impl for rows of at most a few thousand.
// With `ms` / `mt` (AdaLN modulation, [rows / rpp, d]): v = v * (1 + ms[row / rpp]) + mt[row / rpp].
template <typename T>
__device__ void row_norm_warp_impl(const T* x, const T* gamma, const T* beta, T* y, long rows, long d, float eps,
                                   int mean_too, int vec, const T* ms, const T* mt, long rpp) {
    constexpr int N = VecN<T>::N;
    long r = (long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (r >= rows) return;
    int lane = threadIdx.x & 31;
    const T* row = x + r * d;
    T* out = y + r * d;
    const T* msr = ms ? ms + (r / rpp) * d : nullptr;
    const T* mtr = mt ? mt + (r / rpp) * d : nullptr;
    float mean = mean_too ? row_sum(row, d, vec, 0.0f, 0) / (float)d : 0.0f;
    float rstd = rsqrtf(row_sum(row, d, vec, mean, 1) / (float)d + eps);
    if (vec) {
        for (long j = (long)lane * N; j < d; j += 32 * N) {
            float f[N], g[N], b[N], sc[N], sh[N];
            vload(row + j, f);
            if (gamma) vload(gamma + j, g);
            if (beta) vload(beta + j, b);
            if (msr) vload(msr + j, sc);
            if (mtr) vload(mtr + j, sh);
#pragma unroll
            for (int k = 0; k < N; ++k) {
                float v = (f[k] - mean) * rstd;
                if (gamma) v *= g[k];
                if (beta) v += b[k];
                if (msr) v = v * (sc[k] + 1.0f);
                if (mtr) v = v + sh[k];
                f[k] = v;
            }
            vstore(out + j, f);
        }
    } else {
        for (long j = lane; j < d; j += 32) {
            float v = (to_f(row[j]) - mean) * rstd;
            if (gamma) v *= to_f(gamma[j]);
            if (beta) v += to_f(beta[j]);
            if (msr) v = v * (to_f(msr[j]) + 1.0f);
            if (mtr) v = v + to_f(mtr[j]);
            out[j] = from_f<T>(v);
        }
    }
}
// AdaLN gate: out = x + gate[row / rpp] * y over rows of `cols` (vectorised with `vec`).
template <typename T>
__device__ void gated_add_impl(const T* x, const T* gate, const T* y, T* out, long rows, long rpp, long cols,
                               int vec) {
    constexpr int N = VecN<T>::N;
    long cstart = (long)blockIdx.x * blockDim.x + threadIdx.x, cstep = (long)blockDim.x * gridDim.x;
    for (long r = blockIdx.y; r < rows; r += gridDim.y) {
        const T* xr = x + r * cols;
        const T* yr = y + r * cols;
        const T* gr = gate + (r / rpp) * cols;
        T* orow = out + r * cols;
        if (vec) {
            for (long c = cstart; c < cols / N; c += cstep) {
                float a[N], g[N], b[N];
                vload(xr + c * N, a);
                vload(gr + c * N, g);
                vload(yr + c * N, b);
#pragma unroll
                for (int k = 0; k < N; ++k) a[k] = __fadd_rn(a[k], __fmul_rn(g[k], b[k]));
                vstore(orow + c * N, a);
            }
        } else {
            for (long c = cstart; c < cols; c += cstep)
                orow[c] = from_f<T>(__fadd_rn(to_f(xr[c]), __fmul_rn(to_f(gr[c]), to_f(yr[c]))));
        }
    }
}

// ---- rotary embedding of adjacent pairs (Tensor::rotate_pairs): rows = b*len of `heads*half`
// pairs; pair p of row r turns by the angle of (r % len, p % half); f32 math without contraction,
// as the CPU twin. grid (pair blocks, row blocks), block 256.
template <typename T>
__device__ void rotate_pairs_impl(const T* x, const float* cs, const float* sn, T* y, long rows, long len,
                                  long pairs, long half) {
    for (long r = blockIdx.y; r < rows; r += gridDim.y) {
        long l = r % len;
        const float* c = cs + l * half;
        const float* s = sn + l * half;
        const T* xr = x + r * pairs * 2;
        T* yr = y + r * pairs * 2;
        for (long p = (long)blockIdx.x * blockDim.x + threadIdx.x; p < pairs; p += (long)blockDim.x * gridDim.x) {
            long i = p % half;
            float x0 = to_f(xr[2 * p]), x1 = to_f(xr[2 * p + 1]), co = c[i], si = s[i];
            yr[2 * p] = from_f<T>(__fsub_rn(__fmul_rn(x0, co), __fmul_rn(x1, si)));
            yr[2 * p + 1] = from_f<T>(__fadd_rn(__fmul_rn(x1, co), __fmul_rn(x0, si)));
        }
    }
}

// ---- concatenation of up to 8 inputs in one launch: input i's rows of len[i] words go to offset
// off[i] of each output row of `total` words; grid (element blocks, inputs), block 256 ----
struct CatSrc {
    int n;
    long src[8];
    long len[8];
    long off[8];
};
template <typename W>
__device__ void cat_multi_impl(W* dst, long outer, long total, CatSrc c) {
    int i = blockIdx.y;
    if (i >= c.n) return;
    const W* s = (const W*)c.src[i];
    long len = c.len[i], off = c.off[i];
    for (long e = (long)blockIdx.x * blockDim.x + threadIdx.x; e < outer * len; e += (long)blockDim.x * gridDim.x) {
        long r = e / len, j = e - r * len;
        dst[r * total + off + j] = s[e];
    }
}
extern "C" __global__ void cat_multi_u16(unsigned short* d, long outer, long total, CatSrc c) {
    cat_multi_impl<unsigned short>(d, outer, total, c);
}
extern "C" __global__ void cat_multi_u128(U4* d, long outer, long total, CatSrc c) {
    cat_multi_impl<U4>(d, outer, total, c);
}

// ---- batched 2-D transpose: src [n, rows, cols] -> dst [n, cols, rows]; block (32, 8) ----
template <typename W>
__device__ void transpose_impl(const W* src, W* dst, long rows, long cols) {
    __shared__ W tile[32][33];
    long n = blockIdx.z;
    long r0 = (long)blockIdx.y * 32, c0 = (long)blockIdx.x * 32;
    const W* s = src + n * rows * cols;
    W* d = dst + n * rows * cols;
    for (int i = threadIdx.y; i < 32; i += 8) {
        long r = r0 + i, c = c0 + threadIdx.x;
        if (r < rows && c < cols) tile[i][threadIdx.x] = s[r * cols + c];
    }
    __syncthreads();
    for (int i = threadIdx.y; i < 32; i += 8) {
        long c = c0 + i, r = r0 + threadIdx.x;
        if (r < rows && c < cols) d[c * rows + r] = tile[threadIdx.x][i];
    }
}
extern "C" __global__ void copy2d_u128(const U4* s, U4* d, long rows, long cols, long sp, long dp) {
    copy2d_impl<U4>(s, d, rows, cols, sp, dp);
}

// ---- non-finite watch: flag = min(flag, code) when any element is NaN or ±inf ----
// The flag is one non-negative f32; for non-negative floats the int order of the bit patterns is
// the float order, so an integer atomicMin keeps the smallest code.
template <typename T>
__device__ void nonfinite_mark_impl(const T* x, long n, int* flag, float code) {
    bool bad = false;
    GRID_STRIDE(i, n) bad |= !isfinite(to_f(x[i]));
    if (bad) atomicMin(flag, __float_as_int(code));
}

// ---- extern "C" instances ----
#define FOR_TYPES(M) M(f32, float) M(f16, f16_t) M(bf16, bf16_t)

#define INST_CAST(SN, S, DN, D) \
    extern "C" __global__ void cast_##SN##_##DN(const S* x, D* y, long n) { cast_impl<S, D>(x, y, n); }
INST_CAST(f32, float, f16, f16_t)
INST_CAST(f32, float, bf16, bf16_t)
INST_CAST(f16, f16_t, f32, float)
INST_CAST(bf16, bf16_t, f32, float)
INST_CAST(f16, f16_t, bf16, bf16_t)
INST_CAST(bf16, bf16_t, f16, f16_t)

#define INST_TYPED(N, T)                                                                                     \
    extern "C" __global__ void unary_##N(const T* x, T* y, long n, int op, float a, float b) {              \
        unary_impl<T>(x, y, n, op, a, b);                                                                    \
    }                                                                                                        \
    extern "C" __global__ void binary_##N(const T* a, const T* b, T* y, long n, int op, Bcast bc) {         \
        binary_impl<T>(a, b, y, n, op, bc);                                                                  \
    }                                                                                                        \
    extern "C" __global__ void binary_same_##N(const T* a, const T* b, T* y, long n, int op) {              \
        binary_same_impl<T>(a, b, y, n, op);                                                                 \
    }                                                                                                        \
    extern "C" __global__ void geglu_##N(const T* x, T* y, long rows, long h) { geglu_impl<T>(x, y, rows, h); } \
    extern "C" __global__ void rotate_pairs_##N(const T* x, const float* c, const float* s, T* y, long rows, \
                                                long len, long pairs, long half) {                           \
        rotate_pairs_impl<T>(x, c, s, y, rows, len, pairs, half);                                            \
    }                                                                                                        \
    extern "C" __global__ void geglu_vec_##N(const T* x, T* y, long rows, long h) {                          \
        geglu_vec_impl<T>(x, y, rows, h);                                                                    \
    }                                                                                                        \
    extern "C" __global__ void binary_same_vec_##N(const T* a, const T* b, T* y, long nv, int op) {          \
        binary_same_vec_impl<T>(a, b, y, nv, op);                                                            \
    }                                                                                                        \
    extern "C" __global__ void unary_vec_##N(const T* x, T* y, long nv, int op, float a, float b) {          \
        unary_vec_impl<T>(x, y, nv, op, a, b);                                                               \
    }                                                                                                        \
    extern "C" __global__ void rowb_binary_##N(const T* f, const T* g, T* y, long rows, long rpp, long cols, \
                                               int op, int bleft, int vec) {                                 \
        rowb_binary_impl<T>(f, g, y, rows, rpp, cols, op, bleft, vec);                                       \
    }                                                                                                        \
    extern "C" __global__ void row_norm_warp_##N(const T* x, const T* g, const T* b, T* y, long rows, long d, \
                                                 float eps, int mean_too, int vec, const T* ms, const T* mt, \
                                                 long rpp) {                                                 \
        row_norm_warp_impl<T>(x, g, b, y, rows, d, eps, mean_too, vec, ms, mt, rpp);                         \
    }                                                                                                        \
    extern "C" __global__ void gated_add_##N(const T* x, const T* g, const T* y, T* o, long rows, long rpp,  \
                                             long cols, int vec) {                                           \
        gated_add_impl<T>(x, g, y, o, rows, rpp, cols, vec);                                                 \
    }                                                                                                        \
    extern "C" __global__ void gn_sums_##N(const T* x, double* sums, long group_len, long chunk) {          \
        gn_sums_impl<T>(x, sums, group_len, chunk);                                                          \
    }                                                                                                        \
    extern "C" __global__ void gn_apply_##N(const T* x, const float* mr, const T* g, const T* bt, T* y,      \
                                            long c, long s, long groups, int silu, long n) {                 \
        gn_apply_impl<T>(x, mr, g, bt, y, c, s, groups, silu, n);                                            \
    }                                                                                                        \
    extern "C" __global__ void plane_binary_##N(const T* a, const T* v, T* y, long s, int op, long vmod) {  \
        plane_binary_impl<T>(a, v, y, s, op, vmod);                                                          \
    }                                                                                                        \
    extern "C" __global__ void gn_apply_planes_##N(const T* x, const float* mr, const T* g, const T* bt, T* y, \
                                                   int c, long s, int groups, int silu) {                    \
        gn_apply_planes_impl<T>(x, mr, g, bt, y, c, s, groups, silu);                                        \
    }                                                                                                        \
    extern "C" __global__ void layer_norm_##N(const T* x, const T* g, const T* b, T* y, long d, float eps) { \
        layer_norm_impl<T>(x, g, b, y, d, eps);                                                              \
    }                                                                                                        \
    extern "C" __global__ void rms_norm_##N(const T* x, const T* g, T* y, long d, float eps) {               \
        rms_norm_impl<T>(x, g, y, d, eps);                                                                   \
    }                                                                                                        \
    extern "C" __global__ void softmax_##N(const float* s, T* p, long cols, int causal, long q0, long rph) { \
        softmax_impl<T>(s, p, cols, causal, q0, rph);                                                        \
    }                                                                                                        \
    extern "C" __global__ void upsample2x_##N(const T* x, T* y, long n, long h, long w) {                   \
        upsample2x_impl<T>(x, y, n, h, w);                                                                   \
    }                                                                                                        \
    extern "C" __global__ void bias_nchw_##N(T* y, const T* bias, long c, long s, long n) {                 \
        bias_nchw_impl<T>(y, bias, c, s, n);                                                                 \
    }                                                                                                        \
    extern "C" __global__ void timestep_emb_##N(const T* t, T* y, long b, long dim, int flip, float shift) { \
        timestep_emb_impl<T>(t, y, b, dim, flip, shift);                                                     \
    }                                                                                                        \
    extern "C" __global__ void fill_uniform_##N(T* y, long n, unsigned long long seed, float lo, float hi) { \
        fill_uniform_impl<T>(y, n, seed, lo, hi);                                                            \
    }                                                                                                        \
    extern "C" __global__ void nonfinite_mark_##N(const T* x, long n, int* flag, float code) {              \
        nonfinite_mark_impl<T>(x, n, flag, code);                                                            \
    }
FOR_TYPES(INST_TYPED)

#define INST_WORD(N, W)                                                                                       \
    extern "C" __global__ void copy2d_##N(const W* s, W* d, long rows, long cols, long sp, long dp) {        \
        copy2d_impl<W>(s, d, rows, cols, sp, dp);                                                             \
    }                                                                                                         \
    extern "C" __global__ void permute_##N(const W* s, W* d, long n, Perm p) { permute_impl<W>(s, d, n, p); } \
    extern "C" __global__ void pad2d_##N(const W* s, W* d, long n, long h, long w, long pt, long pl, long ho, \
                                         long wo) {                                                           \
        pad2d_impl<W>(s, d, n, h, w, pt, pl, ho, wo);                                                         \
    }                                                                                                         \
    extern "C" __global__ void gather_rows_##N(const unsigned* ids, const W* t, W* y, long n, long d) {      \
        gather_rows_impl<W>(ids, t, y, n, d);                                                                 \
    }                                                                                                         \
    extern "C" __global__ void transpose_##N(const W* s, W* d, long rows, long cols) {                       \
        transpose_impl<W>(s, d, rows, cols);                                                                  \
    }
INST_WORD(u16, unsigned short)
INST_WORD(u32, unsigned int)
