// pcpp CUDA kernels, part of KERNEL_SOURCE (the files cuda/mod.rs lists, concatenated in that
// order: each part may use what the earlier ones define):
// the small-row GEMMs of linear layers on Hopper's warpgroup MMAs (sm_90a), for the few hundred
// token rows of a PCPP band (paper §3: each rank's band is a small share of the image;
// docs/small-gemm.md).

// ---- Y = X·Wᵀ (+ bias) (+ acc), or GEGLU(X·Wᵀ + bias), f16/bf16 with f32 accumulation ----
// X: [m, k] rows, W: [n, k] (PyTorch Linear), Y: [m, n] (GEGLU: W is [2n, k], its first n rows
// the value and the last n the gate; Y = value · gelu(gate), exact erf GELU as `geglu`).
// The shape was chosen for what the blocks read from L2 at a band's few hundred rows (a block of
// BM rows and BN columns reads X n/BN times and W m/BM times); measured, each block's chain of
// dependent phases sets the time instead, and these kernels are slower than cuBLASLt and off by
// default (docs/small-gemm.md). A block takes up to 256 rows, all of a band's level-2 tokens
// (NW = blockDim.x / 128 warpgroups, each its own 64 rows, BM = 64·NW), and 128 rows of W
// (plain: 128 output columns; GEGLU: the 64 value and the 64 gate rows of 64 output columns), so
// that W is read once.
// Grid (ceil(n / cols), ceil(m / BM), splits). K streams through GW_ST shared-memory stages of
// 64 columns (cp.async, wgmma's 128-byte-swizzle layout of flash_hopper.cu), with up to two MMA
// groups in flight. With splits > 1 the blocks of one tile form a cluster along z and each takes
// an even share of the 64-column chunks. Every block leaves its f32 partial tile in its shared
// memory; block r of the cluster then sums rows r·BM/splits .. of every block's tile
// (distributed shared memory, in rank order, so the sum is deterministic) and runs the epilogue
// for them. The epilogue adds bias and acc to the f32 sum and rounds once, as cuBLASLt's
// epilogue does, eight columns a thread (16-byte loads and stores); with stats_out it also
// writes, per row and 64-column tile, the mean and M2 (sum of squared deviations) of the rounded
// outputs.
// The LN kernels read X through a layer norm: its row statistics merged from such partials (those
// of the GEMM that wrote X), each X tile normalised in shared memory while the MMAs of the tile
// before it run (the bits a separate layer norm would have stored).
// Before its programmatic wait a block asks L2 for its share of W: an L2 prefetch observes no
// value (L2 is the device's point of coherence), so it overlaps the previous kernel's tail
// without racing with it.

// Shared-memory stages; the f32 row stride of the partial tile (136: conflict-free stores of the
// accumulators' column pairs).
#define GW_ST 4
#define GW_PAD 136

// The weight rows of this block (plain: n0 .. n0 + 128; GEGLU: n0 .. n0 + 64 and the gate's rows
// n + n0 ..), its share of the columns, prefetched into L2; then the programmatic wait
// (pdl_begin).
__device__ __forceinline__ void pdl_l2_then_wait(const unsigned short* w, int n, int k, int geglu) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    int chunks = (k + 63) / 64, splits = gridDim.z, rank = blockIdx.z;
    int col0 = min(k, 64 * (chunks * rank / splits)), col1 = min(k, 64 * (chunks * (rank + 1) / splits));
    unsigned bytes = (unsigned)(col1 - col0) * 2u;
    int n0 = blockIdx.x * (geglu ? 64 : 128);
    for (int r = threadIdx.x; r < 128 && bytes > 0; r += blockDim.x) {
        int row = n0 + (geglu ? (r & 63) : r);
        if (row >= n) continue;
        if (geglu && r >= 64) row += n;
        unsigned long long g = global_addr(w + (long)row * k + col0);
        asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(g), "r"(bytes) : "memory");
    }
#endif
    pdl_begin();
}

// Rows r0 .. r0 + R of a [*, ld] matrix (rows below nrows valid) and columns col0 .. col0 + 64
// (below k valid; the rest zeros) into a swizzled 64-column tile at shared address dst, the
// block's threads one 16-byte chunk at a time.
__device__ __forceinline__ void gw_load(unsigned dst, const unsigned short* src, long ld, int r0, int R, int nrows,
                                        int col0, int k) {
    for (int i = threadIdx.x; i < R * 8; i += blockDim.x) {
        int r = i >> 3, cc = i & 7, row = r0 + r, col = col0 + cc * 8;
        bool ok = row < nrows && col < k;
        unsigned long long g = global_addr(src + (ok ? (long)row * ld + col : 0));
        cp_async16_at(dst + wg_chunk<64>(r, cc), g, ok ? 16 : 0);
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
// order), then the two halves, into (mean, rstd) pairs at ms[r] for the block's BM = blockDim.x / 2 rows.
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

// The layer norm of the X tile of one stage (BM rows), in place: each thread its column chunk
// (tid % 8) of every (blockDim.x / 8)-th row, (x − mean) · rstd · gamma + beta, rounded to the
// storage type (what a separate layer norm would have written).
template <int BF>
__device__ __forceinline__ void gw_norm_tile(unsigned s, int bm, int col0, int k, const float2* ms,
                                             const unsigned short* gamma, const unsigned short* beta) {
    int cc = threadIdx.x & 7, col = col0 + cc * 8;
    float g[8], b[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) {
        bool ok = col + e < k;
        g[e] = ok && gamma ? gw_f<BF>(gamma[col + e]) : (ok ? 1.0f : 0.0f);
        b[e] = ok && beta ? gw_f<BF>(beta[col + e]) : 0.0f;
    }
    for (int i = threadIdx.x; i < bm * 8; i += blockDim.x) {
        int r = i >> 3;
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

// Eight f32 of a partial tile at shared address a: of this block (cluster = 0), or of the
// cluster's block at the same offset (a from mapa).
__device__ __forceinline__ void gw_ld8(unsigned a, int cluster, float* v) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        float p[4];
        if (cluster)
            asm volatile("ld.shared::cluster.v4.f32 {%0, %1, %2, %3}, [%4];"
                         : "=f"(p[0]), "=f"(p[1]), "=f"(p[2]), "=f"(p[3])
                         : "r"(a + 16u * h)
                         : "memory");
        else
            asm volatile("ld.shared.v4.f32 {%0, %1, %2, %3}, [%4];"
                         : "=f"(p[0]), "=f"(p[1]), "=f"(p[2]), "=f"(p[3])
                         : "r"(a + 16u * h)
                         : "memory");
#pragma unroll
        for (int e = 0; e < 4; ++e) v[4 * h + e] += p[e];
    }
}

// The epilogue of eight output columns col .. col + 8 of one row from their f32 sums v (and the
// gate's g for GEGLU): bias, GELU of the gate, acc, one rounding, a 16-byte store; the rounded
// values in rs (zeros where the row or the columns are out of range).
template <int BF, int GG>
__device__ __forceinline__ void gw_store8(const float* v, const float* g, const unsigned short* bias,
                                          const unsigned short* acc, unsigned short* y, int row, int col, int m,
                                          int n, float* rs) {
#pragma unroll
    for (int e = 0; e < 8; ++e) rs[e] = 0.0f;
    if (row >= m || col >= n) return;
    float o[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) {
        o[e] = v[e] + (bias ? gw_f<BF>(bias[col + e]) : 0.0f);
        if (GG) o[e] *= gelu_f(g[e] + (bias ? gw_f<BF>(bias[n + col + e]) : 0.0f));
    }
    if (acc) {
        uint4 a = *(const uint4*)(acc + (long)row * n + col);
        unsigned av[4] = {a.x, a.y, a.z, a.w};
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            o[2 * e] += gw_f<BF>((unsigned short)(av[e] & 0xFFFFu));
            o[2 * e + 1] += gw_f<BF>((unsigned short)(av[e] >> 16));
        }
    }
    unsigned q[4];
#pragma unroll
    for (int e = 0; e < 4; ++e) {
        q[e] = pack2<BF>(o[2 * e], o[2 * e + 1]);
        rs[2 * e] = gw_f<BF>((unsigned short)(q[e] & 0xFFFFu));
        rs[2 * e + 1] = gw_f<BF>((unsigned short)(q[e] >> 16));
    }
    *(uint4*)(y + (long)row * n + col) = make_uint4(q[0], q[1], q[2], q[3]);
}

// Partial statistics of one row's 64-column output tile (first column t0) for the layer norm
// that reads it: the eight lanes of an aligned group hold its eight 8-column pieces rs; the mean
// and M2 of its valid columns, written by the group's first lane as one (mean, M2) pair per row
// and tile.
__device__ __forceinline__ void gw_tile_stats(const float* rs, float* stats, int row, int m, int t0, int n) {
    int cnt = min(64, n - t0);
    bool ok = row < m && t0 < n;
    float s = 0.0f;
#pragma unroll
    for (int e = 0; e < 8; ++e) s += rs[e];
    s += __shfl_xor_sync(0xffffffffu, s, 1);
    s += __shfl_xor_sync(0xffffffffu, s, 2);
    s += __shfl_xor_sync(0xffffffffu, s, 4);
    float mu = ok ? s / (float)cnt : 0.0f, q = 0.0f;
    // This lane's columns are valid as a whole (n is a multiple of 8).
    bool mine = ok && t0 + 8 * (threadIdx.x & 7) < n;
#pragma unroll
    for (int e = 0; e < 8; ++e) {
        float d = rs[e] - mu;
        q += mine ? d * d : 0.0f;
    }
    q += __shfl_xor_sync(0xffffffffu, q, 1);
    q += __shfl_xor_sync(0xffffffffu, q, 2);
    q += __shfl_xor_sync(0xffffffffu, q, 4);
    if ((threadIdx.x & 7) == 0 && ok) ((float2*)stats)[(long)row * ((n + 63) / 64) + t0 / 64] = make_float2(mu, q);
}

template <int BF, int GG, int LN>
__device__ void gemm_wg_impl(const unsigned short* x, const unsigned short* w, const unsigned short* bias,
                             const unsigned short* acc, unsigned short* y, int m, int n, int k, float* stats_out,
                             const float* stats_in, const unsigned short* gamma, const unsigned short* beta, float eps,
                             unsigned short* dyn) {
#if PCPP_WGMMA
    constexpr int ST = GW_ST, COLS = GG ? 64 : 128, OG = COLS / 8;
    const int NT = blockDim.x, BM = NT / 2;
    const unsigned XB = (unsigned)BM * 128u, SB = XB + 128u * 128u;
    const unsigned base = (smem_addr(dyn) + 1023u) & ~1023u;
    // The layer norm's (mean, rstd) of the block's rows, after the stages.
    float2* ms = (float2*)((char*)dyn + (base - smem_addr(dyn)) + ST * SB);
    int tid = threadIdx.x, wg = tid >> 7, warp = (tid >> 5) & 3, lane = tid & 31;
    int n0 = blockIdx.x * COLS, m0 = blockIdx.y * BM;
    int chunks = (k + 63) / 64;
    int c0 = chunks * blockIdx.z / gridDim.z, nk = chunks * (blockIdx.z + 1) / gridDim.z - c0;
    auto stage = [&](int j) { return base + (unsigned)(j % ST) * SB; };
    auto load = [&](int j) {
        unsigned s = stage(j);
        int col0 = (c0 + j) * 64;
        gw_load(s, x, k, m0, BM, m, col0, k);
        if (GG) {
            gw_load(s + XB, w, k, n0, 64, n, col0, k);
            gw_load(s + XB + 8192u, w + (long)n * k, k, n0, 64, n, col0, k);
        } else {
            gw_load(s + XB, w, k, n0, 128, n, col0, k);
        }
    };
    auto commit = [] { asm volatile("cp.async.commit_group;" ::: "memory"); };
    // The warpgroup's 64 × 128 accumulator (GEGLU: value columns in d[0, 32), the gate's in
    // d[32, 64)): rows g and g + 8 of its warp's 16, columns c, c + 1 of each 8-column chunk j.
    float d[64];
#pragma unroll
    for (int i = 0; i < 64; ++i) d[i] = 0.0f;
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
        if (nk > 0) gw_norm_tile<BF>(stage(0), BM, c0 * 64, k, ms, gamma, beta);
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
        // Every warpgroup multiplies, also one whose rows are all past m (zeros, no loads):
        // MMAs under a branch would be serialised.
        unsigned s = stage(i);
        wg_fence();
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
            auto a = wg_desc(s + (unsigned)wg * 8192u + kk * 32, 16, 1024);
            if (GG) {
                wg_ss<BF, 64, 0>(d, a, wg_desc(s + XB + kk * 32, 16, 1024));
                wg_ss<BF, 64, 0>(d + 32, a, wg_desc(s + XB + 8192u + kk * 32, 16, 1024));
            } else {
                wg_ss<BF, 128, 0>(d, a, wg_desc(s + XB + kk * 32, 16, 1024));
            }
        }
        asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
        if (LN && i + 1 < nk) gw_norm_tile<BF>(stage(i + 1), BM, (c0 + i + 1) * 64, k, ms, gamma, beta);
        asm volatile("wgmma.wait_group.sync.aligned 1;" ::: "memory");
    }
    asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
    wg_hold<64>(d);
    // Every copy landed and every MMA finished: the stages hold the f32 partial tile now, row r
    // at r · GW_PAD floats (the value columns first, then the gate's for GEGLU).
    asm volatile("cp.async.wait_group 0;" ::: "memory");
    __syncthreads();
    {
        int r0 = wg * 64 + warp * 16 + lane / 4, c = 2 * (lane % 4);
#pragma unroll
        for (int j = 0; j < 16; ++j) {
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                unsigned a = base + (unsigned)(((r0 + 8 * h) * GW_PAD + j * 8 + c) * 4);
                asm volatile("st.shared.v2.f32 [%0], {%1, %2};" ::"r"(a), "f"(d[j * 4 + 2 * h]),
                             "f"(d[j * 4 + 2 * h + 1])
                             : "memory");
            }
        }
    }
    int splits = gridDim.z, rank = blockIdx.z;
    if (splits > 1) gw_cluster_sync();
    else __syncthreads();
    // This block's rows of the tile: the sums over the cluster's partial tiles, then the
    // epilogue, eight columns an item; the eight items of a 64-column output tile are an aligned
    // group of eight lanes (rows · OG is a multiple of 32, so whole warps take each step).
    int rows = BM / splits, items = rows * OG;
    for (int it = tid; it < items; it += NT) {
        int r = rank * rows + it / OG, g = it % OG, row = m0 + r, col = n0 + 8 * g;
        unsigned off = base + (unsigned)((r * GW_PAD + 8 * g) * 4);
        float v[8], gt[8];
#pragma unroll
        for (int e = 0; e < 8; ++e) v[e] = gt[e] = 0.0f;
        for (int p = 0; p < splits; ++p) {
            unsigned a = off;
            if (splits > 1) asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(a) : "r"(off), "r"(p));
            gw_ld8(a, splits > 1, v);
            if (GG) gw_ld8(a + 64u * 4u, splits > 1, gt);
        }
        float rs[8];
        gw_store8<BF, GG>(v, gt, bias, acc, y, row, col, m, n, rs);
        if (stats_out) gw_tile_stats(rs, stats_out, row, m, n0 + 64 * (g / 8), n);
    }
    // The others keep their shared memory until every block has read it.
    if (splits > 1) gw_cluster_sync();
#else
    __trap();
#endif
}
// Dynamic shared memory: 1 KiB of alignment slack, the GW_ST stages (each BM rows of X and 128
// of W) and BM (mean, rstd) pairs; at most 512 threads (BM = 256).
#define GEMM_WG(NAME, BF, GG, LN)                                                                              \
    extern "C" __global__ void __launch_bounds__(512, 1) NAME(const unsigned short* x, const unsigned short* w, \
        const unsigned short* bias, const unsigned short* acc, unsigned short* y, int m, int n, int k,           \
        float* stats_out, const float* stats_in, const unsigned short* gamma, const unsigned short* beta,       \
        float eps) {                                                                                           \
        pdl_l2_then_wait(w, n, k, GG);                                                                         \
        extern __shared__ __align__(1024) unsigned short gemm_wg_dyn[];                                         \
        gemm_wg_impl<BF, GG, LN>(x, w, bias, acc, y, m, n, k, stats_out, stats_in, gamma, beta, eps,             \
                                 gemm_wg_dyn);                                                                 \
    }
#if PCPP_IN_PART(7)
GEMM_WG(gemm_wg_f16, 0, 0, 0)
GEMM_WG(gemm_wg_bf16, 1, 0, 0)
GEMM_WG(gemm_wg_geglu_f16, 0, 1, 0)
GEMM_WG(gemm_wg_geglu_bf16, 1, 1, 0)
GEMM_WG(gemm_wg_ln_f16, 0, 0, 1)
GEMM_WG(gemm_wg_ln_bf16, 1, 0, 1)
GEMM_WG(gemm_wg_ln_geglu_f16, 0, 1, 1)
GEMM_WG(gemm_wg_ln_geglu_bf16, 1, 1, 1)
#endif
