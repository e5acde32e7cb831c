// pcpp CUDA kernels, part of KERNEL_SOURCE (the files cuda/mod.rs lists, concatenated in that
// order: each part may use what the earlier ones define):
// the small-row GEMMs of linear layers on Hopper's warpgroup MMAs (sm_90a), for the few hundred
// token rows of a PCPP band (paper §3: each rank's band is a small share of the image, and its
// transformer blocks' GEMMs are latency-bound there).

// ---- Y = X·Wᵀ (+ bias) (+ acc), or GEGLU(X·Wᵀ + bias), f16/bf16 with f32 accumulation ----
// X: [m, k] rows, W: [n, k] (PyTorch Linear), Y: [m, n] (GEGLU: W is [2n, k], its first n rows
// the value and the last n the gate; Y = value · gelu(gate), exact erf GELU as `geglu`).
// Grid (ceil(n/64), ceil(m/64), splits); a block is one warpgroup (128 threads) and a 64 × 64
// output tile (GEGLU: the value and the gate tile of the same columns). K streams through ST
// shared-memory stages of 64 columns (cp.async, wgmma's 128-byte-swizzle layout of
// flash_hopper.cu), with up to two MMA groups in flight. With splits > 1 the blocks of one tile
// form a cluster along z, each takes an even share of the 64-column chunks, and the first adds
// the others' f32 accumulators from their shared memory (distributed shared memory, in rank
// order, so the sum is deterministic) before the epilogue. The epilogue adds bias and acc to the
// f32 accumulator and rounds once, as cuBLASLt's epilogue does; with stats_out it also writes,
// per row and 64-column tile, the mean and M2 (sum of squared deviations) of the rounded outputs.
// The LN kernels read X through a layer norm: its row statistics merged from such partials (those
// of the GEMM that wrote X), each X tile normalised in shared memory while the MMAs of the tile
// before it run (the bits a separate layer norm would have stored).
// Before its programmatic wait a block asks L2 for its share of W: an L2 prefetch observes no
// value (L2 is the device's point of coherence), so it overlaps the previous kernel's tail
// without racing with it.

// The weight rows of this block (n0 .. n0 + 64, and the gate's rows n + n0 .. for GEGLU), its
// share of the columns, prefetched into L2; then the programmatic wait (pdl_begin).
__device__ __forceinline__ void pdl_l2_then_wait(const unsigned short* w, int n, int k, int geglu) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    int chunks = (k + 63) / 64, splits = gridDim.z, rank = blockIdx.z;
    int col0 = min(k, 64 * (chunks * rank / splits)), col1 = min(k, 64 * (chunks * (rank + 1) / splits));
    unsigned bytes = (unsigned)(col1 - col0) * 2u;
    int n0 = blockIdx.x * 64, rows = geglu ? 128 : 64;
    for (int r = threadIdx.x; r < rows && bytes > 0; r += blockDim.x) {
        int row = n0 + (r & 63);
        if (row >= n) continue;
        if (r >= 64) row += n;
        unsigned long long g = global_addr(w + (long)row * k + col0);
        asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(g), "r"(bytes) : "memory");
    }
#endif
    pdl_begin();
}

// Rows r0 .. r0 + R of a [*, ld] matrix (rows below nrows valid) and columns col0 .. col0 + 64
// (below k valid; the rest zeros) into a swizzled 64-column tile at shared address dst.
template <int R, int NT>
__device__ __forceinline__ void gw_load(unsigned dst, const unsigned short* src, long ld, int r0, int nrows, int col0,
                                        int k) {
    static_assert(R * 8 % NT == 0, "whole rows of chunks per pass");
#pragma unroll
    for (int t = 0; t < R * 8 / NT; ++t) {
        int i = t * NT + threadIdx.x, r = i >> 3, cc = i & 7, row = r0 + r, col = col0 + cc * 8;
        bool ok = row < nrows && col < k;
        unsigned long long g = global_addr(src + (ok ? (long)row * ld + col : 0));
        cp_async16_at(dst + wg_chunk<R>(r, cc), g, ok ? 16 : 0);
    }
}

template <int BF>
__device__ __forceinline__ float gw_f(unsigned short v) {
    if (BF) return __uint_as_float(((unsigned)v) << 16);
    f16_t h;
    h.x = v;
    return to_f(h);
}

#if PCPP_WGMMA
__device__ __forceinline__ void gw_cluster_sync() {
    asm volatile("barrier.cluster.arrive.release.aligned;" ::: "memory");
    asm volatile("barrier.cluster.wait.acquire.aligned;" ::: "memory");
}
#endif

// Row statistics of a layer norm over k columns from the partial statistics its producer wrote
// (one (mean, M2) pair per row and 64-column tile, M2 the sum of squared deviations from the
// tile's mean): two threads a row merge half the tiles each (Chan's parallel update, in tile
// order), then the two halves, into (mean, rstd) pairs at ms[r] for the block's 64 rows.
__device__ __forceinline__ void gw_row_stats(const float* stats, int m, int m0, int k, float eps, float2* ms) {
    int r = threadIdx.x >> 1, half = threadIdx.x & 1, row = m0 + r;
    int tiles = (k + 63) / 64, split = tiles / 2;
    int t0 = half ? split : 0, t1 = half ? tiles : split;
    float cnt = 0.0f, mean = 0.0f, m2 = 0.0f;
    if (row < m) {
        const float2* p = (const float2*)stats + (long)row * tiles;
#pragma unroll 4
        for (int t = t0; t < t1; ++t) {
            float2 v = p[t];
            float nb = (float)min(64, k - 64 * t), n = cnt + nb, delta = v.x - mean;
            mean += delta * nb / n;
            m2 += v.y + delta * delta * cnt * nb / n;
            cnt = n;
        }
    }
    // Both lanes of the pair merge (first half, second half) in that order: the same bits.
    float oc = __shfl_xor_sync(0xffffffffu, cnt, 1), om = __shfl_xor_sync(0xffffffffu, mean, 1),
          o2 = __shfl_xor_sync(0xffffffffu, m2, 1);
    float ca = half ? oc : cnt, ma = half ? om : mean, qa = half ? o2 : m2;
    float cb = half ? cnt : oc, mb = half ? mean : om, qb = half ? m2 : o2;
    float n = ca + cb, delta = mb - ma;
    float mu = n > 0.0f ? ma + delta * cb / n : 0.0f;
    float q = n > 0.0f ? qa + qb + delta * delta * ca * cb / n : 0.0f;
    if (!half) ms[r] = make_float2(mu, row < m ? rsqrtf(fmaxf(q / (float)k, 0.0f) + eps) : 0.0f);
}

// The layer norm of the X tile of one stage, in place: each thread its column chunk (tid % 8) of
// four rows, (x − mean) · rstd · gamma + beta, rounded to the storage type (what a separate
// layer norm would have written).
template <int BF>
__device__ __forceinline__ void gw_norm_tile(unsigned s, int col0, int k, const float2* ms,
                                             const unsigned short* gamma, const unsigned short* beta) {
    int cc = threadIdx.x & 7, col = col0 + cc * 8;
    float g[8], b[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) {
        bool ok = col + e < k;
        g[e] = ok && gamma ? gw_f<BF>(gamma[col + e]) : (ok ? 1.0f : 0.0f);
        b[e] = ok && beta ? gw_f<BF>(beta[col + e]) : 0.0f;
    }
#pragma unroll
    for (int t = 0; t < 4; ++t) {
        int r = (t * 128 + threadIdx.x) >> 3;
        unsigned a = s + wg_chunk<64>(r, cc);
        unsigned v[4];
        asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];"
                     : "=r"(v[0]), "=r"(v[1]), "=r"(v[2]), "=r"(v[3])
                     : "r"(a));
        float2 st = ms[r];
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            float lo = (gw_f<BF>((unsigned short)(v[e] & 0xFFFFu)) - st.x) * st.y;
            float hi = (gw_f<BF>((unsigned short)(v[e] >> 16)) - st.x) * st.y;
            v[e] = pack2<BF>(fmaf(lo, g[2 * e], b[2 * e]), fmaf(hi, g[2 * e + 1], b[2 * e + 1]));
        }
        asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};" ::"r"(a), "r"(v[0]), "r"(v[1]), "r"(v[2]), "r"(v[3])
                     : "memory");
    }
}

// Partial statistics of this block's output tile for the layer norm that reads it: per row the
// mean and M2 of its valid columns of the rounded outputs rs (this thread's two rows, 16 values
// each), reduced over the quad that holds the row; one (mean, M2) pair per row and tile.
__device__ __forceinline__ void gw_tile_stats(float (*rs)[16], float* stats, int row0, int m, int n0, int n) {
    int lane = threadIdx.x & 31, cnt = min(64, n - n0);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        float s = 0.0f;
#pragma unroll
        for (int e = 0; e < 16; ++e) s += rs[h][e];
        s += __shfl_xor_sync(0xffffffffu, s, 1);
        s += __shfl_xor_sync(0xffffffffu, s, 2);
        float mu = s / (float)cnt, q = 0.0f;
#pragma unroll
        for (int e = 0; e < 16; ++e) {
            float d = rs[h][e] - mu;
            q += n0 + (e >> 1) * 8 < n ? d * d : 0.0f;
        }
        q += __shfl_xor_sync(0xffffffffu, q, 1);
        q += __shfl_xor_sync(0xffffffffu, q, 2);
        int row = row0 + 8 * h;
        if (lane % 4 == 0 && row < m) ((float2*)stats)[(long)row * gridDim.x + blockIdx.x] = make_float2(mu, q);
    }
}

// The first block of a K-split cluster adds the others' f32 accumulators (NA values of d0, and of
// d1 for GEGLU) from their shared memory, in rank order; returns whether this block goes on to
// the epilogue (the first one).
template <int NA, int GG>
__device__ __forceinline__ bool gw_split_reduce(unsigned base, float* d0, float* d1) {
#if PCPP_WGMMA
    int splits = gridDim.z, rank = blockIdx.z, tid = threadIdx.x;
    constexpr int NV = NA / 4, NT = 128;
    // Every block's copies landed and its MMAs finished: stage memory is free for the partial
    // sums, stored thread-major (float4 v of thread t at (v * NT + t) * 16).
    asm volatile("cp.async.wait_group 0;" ::: "memory");
    __syncthreads();
    if (rank != 0) {
#pragma unroll
        for (int v = 0; v < NV * (1 + GG); ++v) {
            const float* d = v < NV ? d0 + 4 * v : d1 + 4 * (v - NV);
            asm volatile("st.shared.v4.f32 [%0], {%1, %2, %3, %4};" ::"r"(base + (unsigned)(v * NT + tid) * 16u),
                         "f"(d[0]), "f"(d[1]), "f"(d[2]), "f"(d[3])
                         : "memory");
        }
    }
    gw_cluster_sync();
    if (rank == 0) {
        for (int r = 1; r < splits; ++r) {
            unsigned peer;
            asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(peer) : "r"(base), "r"(r));
#pragma unroll
            for (int v = 0; v < NV * (1 + GG); ++v) {
                float p[4];
                asm volatile("ld.shared::cluster.v4.f32 {%0, %1, %2, %3}, [%4];"
                             : "=f"(p[0]), "=f"(p[1]), "=f"(p[2]), "=f"(p[3])
                             : "r"(peer + (unsigned)(v * NT + tid) * 16u)
                             : "memory");
                float* d = v < NV ? d0 + 4 * v : d1 + 4 * (v - NV);
#pragma unroll
                for (int e = 0; e < 4; ++e) d[e] += p[e];
            }
        }
    }
    // The others keep their shared memory until the first block has read it.
    gw_cluster_sync();
    return rank == 0;
#else
    return false;
#endif
}

// Shared-memory stages: ST of them, each a 64-row X tile and one W tile (two for GEGLU); more
// with the layer norm, which needs the next chunk landed one iteration earlier.
template <int GG, int LN>
struct GwStages {
    static constexpr int ST = GG ? (LN ? 5 : 4) : (LN ? 6 : 5);
    static constexpr unsigned BYTES = 64 * 128 * (2 + GG);
};

template <int BF, int GG, int LN>
__device__ void gemm_wg_impl(const unsigned short* x, const unsigned short* w, const unsigned short* bias,
                             const unsigned short* acc, unsigned short* y, int m, int n, int k, float* stats_out,
                             const float* stats_in, const unsigned short* gamma, const unsigned short* beta, float eps,
                             unsigned short* dyn) {
#if PCPP_WGMMA
    constexpr int BM = 64, BN = 64, NT = 128, ST = GwStages<GG, LN>::ST, NA = BN / 2;
    constexpr unsigned ABYTES = BM * 128, BBYTES = BN * 128, SBYTES = GwStages<GG, LN>::BYTES;
    const unsigned base = (smem_addr(dyn) + 1023u) & ~1023u;
    // The layer norm's (mean, rstd) of the block's rows, after the stages.
    float2* ms = (float2*)((char*)dyn + (base - smem_addr(dyn)) + ST * SBYTES);
    int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    int n0 = blockIdx.x * BN, m0 = blockIdx.y * BM;
    int chunks = (k + 63) / 64;
    int c0 = chunks * blockIdx.z / gridDim.z, nk = chunks * (blockIdx.z + 1) / gridDim.z - c0;
    auto stage = [&](int j) { return base + (unsigned)(j % ST) * SBYTES; };
    auto load = [&](int j) {
        unsigned s = stage(j);
        int col0 = (c0 + j) * 64;
        gw_load<BM, NT>(s, x, k, m0, m, col0, k);
        gw_load<BN, NT>(s + ABYTES, w, k, n0, n, col0, k);
        if (GG) gw_load<BN, NT>(s + ABYTES + BBYTES, w + (long)n * k, k, n0, n, col0, k);
    };
    auto commit = [] { asm volatile("cp.async.commit_group;" ::: "memory"); };
    float d0[NA], d1[GG ? NA : 4];
#pragma unroll
    for (int i = 0; i < NA; ++i) d0[i] = 0.0f;
#pragma unroll
    for (int i = 0; i < (GG ? NA : 4); ++i) d1[i] = 0.0f;
    // Chunks 0 .. ST - 3 in flight; each iteration adds one, so that the stage it overwrites was
    // read by the MMAs two iterations back (done: at most one MMA group stays in flight).
#pragma unroll
    for (int j = 0; j < ST - 2; ++j) {
        if (j < nk) load(j);
        commit();
    }
    if (LN) {
        gw_row_stats(stats_in, m, m0, k, eps, ms);
        asm volatile("cp.async.wait_group %0;" ::"n"(ST - 3) : "memory");
        __syncthreads();
        if (nk > 0) gw_norm_tile<BF>(stage(0), c0 * 64, k, ms, gamma, beta);
    }
    for (int i = 0; i < nk; ++i) {
        // Chunk i landed (and, with the layer norm, chunk i + 1, normalised below while the MMAs
        // of chunk i run; chunk i was normalised in the previous iteration).
        if (LN) asm volatile("cp.async.wait_group %0;" ::"n"(ST - 4) : "memory");
        else asm volatile("cp.async.wait_group %0;" ::"n"(ST - 3) : "memory");
        asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
        __syncthreads();
        if (i + ST - 2 < nk) load(i + ST - 2);
        commit();
        unsigned s = stage(i);
        wg_fence();
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
            auto a = wg_desc(s + kk * 32, 16, 1024);
            wg_ss<BF, BN, 0>(d0, a, wg_desc(s + ABYTES + kk * 32, 16, 1024));
            if (GG) wg_ss<BF, BN, 0>(d1, a, wg_desc(s + ABYTES + BBYTES + kk * 32, 16, 1024));
        }
        asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
        if (LN && i + 1 < nk) gw_norm_tile<BF>(stage(i + 1), (c0 + i + 1) * 64, k, ms, gamma, beta);
        asm volatile("wgmma.wait_group.sync.aligned 1;" ::: "memory");
    }
    asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
    wg_hold<NA>(d0);
    wg_hold<(GG ? NA : 4)>(d1);
    if (gridDim.z > 1 && !gw_split_reduce<NA, GG>(base, d0, d1)) return;
    // This thread's rows g and g + 8 of its warp's 16; columns c, c + 1 of each 8-column chunk.
    int row0 = m0 + warp * 16 + lane / 4, c = 2 * (lane % 4);
    float rs[2][16];
#pragma unroll
    for (int j = 0; j < BN / 8; ++j) {
        int col = n0 + j * 8 + c;
        rs[0][2 * j] = rs[0][2 * j + 1] = rs[1][2 * j] = rs[1][2 * j + 1] = 0.0f;
        if (col >= n) continue;
        float b0 = 0.0f, b1 = 0.0f, g0 = 0.0f, g1 = 0.0f;
        if (bias) {
            b0 = gw_f<BF>(bias[col]);
            b1 = gw_f<BF>(bias[col + 1]);
            if (GG) {
                g0 = gw_f<BF>(bias[n + col]);
                g1 = gw_f<BF>(bias[n + col + 1]);
            }
        }
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            int row = row0 + 8 * h;
            if (row >= m) continue;
            float v0 = d0[j * 4 + 2 * h] + b0, v1 = d0[j * 4 + 2 * h + 1] + b1;
            if (GG) {
                v0 *= gelu_f(d1[(j * 4 + 2 * h) % (GG ? NA : 4)] + g0);
                v1 *= gelu_f(d1[(j * 4 + 2 * h + 1) % (GG ? NA : 4)] + g1);
            }
            if (acc) {
                unsigned a = *(const unsigned*)(acc + (long)row * n + col);
                v0 += gw_f<BF>((unsigned short)(a & 0xFFFFu));
                v1 += gw_f<BF>((unsigned short)(a >> 16));
            }
            unsigned packed = pack2<BF>(v0, v1);
            *(unsigned*)(y + (long)row * n + col) = packed;
            rs[h][2 * j] = gw_f<BF>((unsigned short)(packed & 0xFFFFu));
            rs[h][2 * j + 1] = gw_f<BF>((unsigned short)(packed >> 16));
        }
    }
    if (stats_out) gw_tile_stats(rs, stats_out, row0, m, n0, n);
#else
    __trap();
#endif
}
// Dynamic shared memory: 1 KiB of alignment slack, the ST stages of GwStages and 512 bytes of
// row statistics.
#define GEMM_WG(NAME, BF, GG, LN)                                                                              \
    extern "C" __global__ void __launch_bounds__(128) NAME(const unsigned short* x, const unsigned short* w,   \
        const unsigned short* bias, const unsigned short* acc, unsigned short* y, int m, int n, int k,           \
        float* stats_out, const float* stats_in, const unsigned short* gamma, const unsigned short* beta,       \
        float eps) {                                                                                           \
        pdl_l2_then_wait(w, n, k, GG);                                                                         \
        extern __shared__ __align__(1024) unsigned short gemm_wg_dyn[];                                         \
        gemm_wg_impl<BF, GG, LN>(x, w, bias, acc, y, m, n, k, stats_out, stats_in, gamma, beta, eps,             \
                                 gemm_wg_dyn);                                                                 \
    }
GEMM_WG(gemm_wg_f16, 0, 0, 0)
GEMM_WG(gemm_wg_bf16, 1, 0, 0)
GEMM_WG(gemm_wg_geglu_f16, 0, 1, 0)
GEMM_WG(gemm_wg_geglu_bf16, 1, 1, 0)
GEMM_WG(gemm_wg_ln_f16, 0, 0, 1)
GEMM_WG(gemm_wg_ln_bf16, 1, 0, 1)
GEMM_WG(gemm_wg_ln_geglu_f16, 0, 1, 1)
GEMM_WG(gemm_wg_ln_geglu_bf16, 1, 1, 1)
