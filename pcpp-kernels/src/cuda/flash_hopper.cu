// pcpp CUDA kernels, part of KERNEL_SOURCE (kernels.cu, flash_attn.cu, flash_hopper.cu, vector.cu
// and instances.cu, concatenated in that order: each part may use what the earlier ones define):
// the Hopper (sm_90a) flash attention of PCPP's attention layers and Flux.1's joint attention.

// ---- flash attention with warpgroup MMAs (wgmma), head sizes 64 and 128, f16/bf16 ----
// The same online softmax as flash_attn.cu, on Hopper's asynchronous warpgroup MMAs: a block is
// two warpgroups (256 threads) and 128 query rows, 64 per warpgroup; K and V stream through two
// shared-memory stages of BN keys (cp.async, the next tile's while this one is computed, one
// barrier per tile), Q stays in shared memory.
//   S = Q·Kᵀ: wgmma m64nBNk16, A (Q) and B (K) read from shared memory;
//   O += P·V: wgmma m64nDk16, A (P) from registers (the f32 scores packed to 16 bits in place),
//             B (V) read from shared memory in its stored [key][dim] order (transposed operand).
// Tiles sit in shared memory in wgmma's canonical layout without swizzle: 8x8 core matrices of
// 8 rows x 16 bytes, the 16-byte chunk c of row r of a D-wide tile at chunk index
// ((r / 8) * (D / 8) + c) * 8 + r % 8. Core matrices adjacent along a row are 128 bytes apart,
// along a column D * 16 bytes.
// Compiled only for sm_90a (NVRTC defines __CUDA_ARCH_FEAT_SM90_ALL there); elsewhere the
// kernels exist but trap, and the host never launches them.
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define PCPP_WGMMA 1
#else
#define PCPP_WGMMA 0
#endif

// Shared-memory matrix descriptor: start address, leading- and stride-dimension byte offsets,
// no swizzle, base offset 0.
__device__ __forceinline__ unsigned long long wg_desc(unsigned addr, unsigned lbo, unsigned sbo) {
    return (unsigned long long)((addr & 0x3FFFF) >> 4) | ((unsigned long long)((lbo & 0x3FFFF) >> 4) << 16) |
           ((unsigned long long)((sbo & 0x3FFFF) >> 4) << 32);
}
#define WG_F8(b) "+f"(d[b]), "+f"(d[b + 1]), "+f"(d[b + 2]), "+f"(d[b + 3]), "+f"(d[b + 4]), "+f"(d[b + 5]), \
                 "+f"(d[b + 6]), "+f"(d[b + 7])
#define WG_D32 WG_F8(0), WG_F8(8), WG_F8(16), WG_F8(24)
#define WG_D64 WG_D32, WG_F8(32), WG_F8(40), WG_F8(48), WG_F8(56)
#define WG_R32                                                                                                \
    "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27," \
    "%28,%29,%30,%31}"
#define WG_R64                                                                                                 \
    "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,"  \
    "%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53," \
    "%54,%55,%56,%57,%58,%59,%60,%61,%62,%63}"
// D (64 x N, f32) = A·B (+ D when `acc`), A and B from shared memory (both K-major).
template <int BF, int N>
__device__ __forceinline__ void wg_ss(float* d, unsigned long long a, unsigned long long b, int acc) {
#if PCPP_WGMMA
    if constexpr (N == 64) {
        if (BF)
            asm volatile("{ .reg .pred p; setp.ne.b32 p, %34, 0; wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " WG_R32
                         ", %32, %33, p, 1, 1, 0, 0; }" : WG_D32 : "l"(a), "l"(b), "r"(acc));
        else
            asm volatile("{ .reg .pred p; setp.ne.b32 p, %34, 0; wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 " WG_R32
                         ", %32, %33, p, 1, 1, 0, 0; }" : WG_D32 : "l"(a), "l"(b), "r"(acc));
    } else {
        if (BF)
            asm volatile("{ .reg .pred p; setp.ne.b32 p, %66, 0; wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 " WG_R64
                         ", %64, %65, p, 1, 1, 0, 0; }" : WG_D64 : "l"(a), "l"(b), "r"(acc));
        else
            asm volatile("{ .reg .pred p; setp.ne.b32 p, %66, 0; wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 " WG_R64
                         ", %64, %65, p, 1, 1, 0, 0; }" : WG_D64 : "l"(a), "l"(b), "r"(acc));
    }
#endif
}
// D (64 x N, f32) += A·B, A from registers (mma.sync's m16k16 fragment per warp), B from shared
// memory stored N-major (the transposed operand).
template <int BF, int N>
__device__ __forceinline__ void wg_rs_t(float* d, const unsigned* a, unsigned long long b) {
#if PCPP_WGMMA
    if constexpr (N == 64) {
        if (BF)
            asm volatile("wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " WG_R32
                         ", {%32,%33,%34,%35}, %36, 1, 1, 1, 1;" : WG_D32
                         : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b));
        else
            asm volatile("wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 " WG_R32
                         ", {%32,%33,%34,%35}, %36, 1, 1, 1, 1;" : WG_D32
                         : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b));
    } else {
        if (BF)
            asm volatile("wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 " WG_R64
                         ", {%64,%65,%66,%67}, %68, 1, 1, 1, 1;" : WG_D64
                         : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b));
        else
            asm volatile("wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 " WG_R64
                         ", {%64,%65,%66,%67}, %68, 1, 1, 1, 1;" : WG_D64
                         : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b));
    }
#endif
}
__device__ __forceinline__ void wg_fence() {
#if PCPP_WGMMA
    asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
#endif
}
__device__ __forceinline__ void wg_commit_wait() {
#if PCPP_WGMMA
    asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
    asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
#endif
}
// Keeps the compiler from moving reads or writes of accumulator registers across the
// asynchronous MMAs that own them.
template <int N>
__device__ __forceinline__ void wg_hold(float* r) {
#pragma unroll
    for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}

template <int BF, int D, int BN>
__device__ void flash_wg_impl(const unsigned short* q, const unsigned short* k, const unsigned short* v,
                              unsigned short* o, int lq, int lk, int heads, float scale_log2, int causal,
                              unsigned short* sm) {
#if PCPP_WGMMA
    constexpr int BM = 128, NT = 256, CH = D / 8, NJ = BN / 8;
    // Q tile, then two stages of K, then two of V.
    unsigned short* Qs = sm;
    auto kst = [&](int st) { return sm + BM * D + st * BN * D; };
    auto vst = [&](int st) { return sm + BM * D + (2 + st) * BN * D; };
    int tid = threadIdx.x, wg = tid >> 7, warp = (tid >> 5) & 3, lane = tid & 31;
    int bi = blockIdx.z, h = blockIdx.y;
    long dm = (long)heads * D;
    int qblk = blockIdx.x * BM;
    const unsigned short* qb = q + (long)bi * lq * dm + h * D;
    const unsigned short* kg = k + (long)bi * lk * dm + h * D;
    const unsigned short* vg = v + (long)bi * lk * dm + h * D;
    unsigned short* ob = o + (long)bi * lq * dm + h * D;
    // Rows r0.. of a [*, dm] matrix (n valid rows; the others read as zeros) into a tile of R rows.
    auto load = [&](unsigned short* dst, const unsigned short* src, int r0, int n, int R) {
        for (int i = tid; i < R * CH; i += NT) {
            int r = r0 + (i / (8 * CH)) * 8 + (i & 7);
            int ch = (i >> 3) % CH;
            cp_async16(dst + i * 8, src + (long)(r < n ? r : 0) * dm + ch * 8, r < n ? 16 : 0);
        }
    };
    int kend = causal ? min(lk, qblk + BM) : lk;
    int ntiles = (kend + BN - 1) / BN;
    load(Qs, qb, qblk, lq, BM);
    asm volatile("cp.async.commit_group;" ::: "memory");
    if (ntiles > 0) {
        load(kst(0), kg, 0, lk, BN);
        load(vst(0), vg, 0, lk, BN);
        asm volatile("cp.async.commit_group;" ::: "memory");
    }
    // This thread's rows (within the block) of the warpgroup's 64: g and g + 8 of its warp's 16.
    int row0 = qblk + wg * 64 + warp * 16 + lane / 4, c = 2 * (lane % 4);
    float oacc[D / 2], sacc[BN / 2];
#pragma unroll
    for (int i = 0; i < D / 2; ++i) oacc[i] = 0.0f;
    float mrow[2] = {NEG_INF, NEG_INF}, lrow[2] = {0.0f, 0.0f};
    const unsigned qaddr = smem_addr(Qs) + wg * 64 * D * 2;
    for (int tile = 0; tile < ntiles; ++tile) {
        int kb = tile * BN;
        // This tile's copies (and Q's) are the only ones in flight.
        asm volatile("cp.async.wait_group 0;" ::: "memory");
        // The copies wrote through the generic proxy; the MMAs read through the async one.
        asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
        // One barrier per tile: past it, this tile is in shared memory and every warpgroup is
        // done with the previous one, whose stage the next tile's copies then overwrite while
        // this one is computed.
        __syncthreads();
        if (tile + 1 < ntiles) {
            load(kst((tile + 1) & 1), kg, kb + BN, lk, BN);
            load(vst((tile + 1) & 1), vg, kb + BN, lk, BN);
            asm volatile("cp.async.commit_group;" ::: "memory");
        }
        const unsigned kaddr = smem_addr(kst(tile & 1)), vaddr = smem_addr(vst(tile & 1));
        wg_fence();
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk)
            wg_ss<BF, BN>(sacc, wg_desc(qaddr + kk * 256, 128, D * 16), wg_desc(kaddr + kk * 256, 128, D * 16), kk);
        wg_commit_wait();
        wg_hold<BN / 2>(sacc);
        bool edge = (kb + BN > lk) || causal;
        float mx0 = NEG_INF, mx1 = NEG_INF;
#pragma unroll
        for (int j = 0; j < NJ; ++j) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                float val = sacc[j * 4 + e];
                if (edge) {
                    int key = kb + j * 8 + c + (e & 1);
                    int row = row0 + 8 * (e >> 1);
                    if (key >= lk || (causal && key > row)) val = NEG_INF;
                }
                sacc[j * 4 + e] = val;
                if (e < 2) mx0 = fmaxf(mx0, val);
                else mx1 = fmaxf(mx1, val);
            }
        }
#pragma unroll
        for (int off = 1; off < 4; off <<= 1) {
            mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, off));
            mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, off));
        }
        float mn0 = fmaxf(mrow[0], mx0), mn1 = fmaxf(mrow[1], mx1);
        float sub0 = mn0 == NEG_INF ? 0.0f : mn0 * scale_log2;
        float sub1 = mn1 == NEG_INF ? 0.0f : mn1 * scale_log2;
        float al0 = fast_exp2(fmaf(mrow[0], scale_log2, -sub0));
        float al1 = fast_exp2(fmaf(mrow[1], scale_log2, -sub1));
        mrow[0] = mn0;
        mrow[1] = mn1;
        // P as the A fragments of the P·V MMAs, 16 keys each.
        unsigned pa[BN / 16][4];
        float ls0 = 0.0f, ls1 = 0.0f;
#pragma unroll
        for (int j = 0; j < NJ; ++j) {
            float p0 = fast_exp2(fmaf(sacc[j * 4 + 0], scale_log2, -sub0));
            float p1 = fast_exp2(fmaf(sacc[j * 4 + 1], scale_log2, -sub0));
            float p2 = fast_exp2(fmaf(sacc[j * 4 + 2], scale_log2, -sub1));
            float p3 = fast_exp2(fmaf(sacc[j * 4 + 3], scale_log2, -sub1));
            ls0 += p0 + p1;
            ls1 += p2 + p3;
            pa[j >> 1][(j & 1) * 2] = pack2<BF>(p0, p1);
            pa[j >> 1][(j & 1) * 2 + 1] = pack2<BF>(p2, p3);
        }
        lrow[0] = lrow[0] * al0 + ls0;
        lrow[1] = lrow[1] * al1 + ls1;
#pragma unroll
        for (int d = 0; d < D / 8; ++d) {
            oacc[d * 4 + 0] *= al0;
            oacc[d * 4 + 1] *= al0;
            oacc[d * 4 + 2] *= al1;
            oacc[d * 4 + 3] *= al1;
        }
        wg_hold<D / 2>(oacc);
        wg_fence();
#pragma unroll
        for (int t = 0; t < BN / 16; ++t)
            wg_rs_t<BF, D>(oacc, pa[t], wg_desc(vaddr + t * 2 * D * 16, D * 16, 128));
        wg_commit_wait();
        wg_hold<D / 2>(oacc);
    }
    float l0 = lrow[0], l1 = lrow[1];
#pragma unroll
    for (int off = 1; off < 4; off <<= 1) {
        l0 += __shfl_xor_sync(0xffffffffu, l0, off);
        l1 += __shfl_xor_sync(0xffffffffu, l1, off);
    }
    float i0 = l0 > 0.0f ? 1.0f / l0 : 0.0f, i1 = l1 > 0.0f ? 1.0f / l1 : 0.0f;
    int r1 = row0 + 8;
#pragma unroll
    for (int d = 0; d < D / 8; ++d) {
        int col = d * 8 + c;
        if (row0 < lq) *(unsigned*)(ob + (long)row0 * dm + col) = pack2<BF>(oacc[d * 4] * i0, oacc[d * 4 + 1] * i0);
        if (r1 < lq) *(unsigned*)(ob + (long)r1 * dm + col) = pack2<BF>(oacc[d * 4 + 2] * i1, oacc[d * 4 + 3] * i1);
    }
#else
    __trap();
#endif
}
// Dynamic shared memory: a 128-row Q tile and two stages of BN-row K and V tiles, D halves a row:
// (128 + 4 * 128) * D * 2 bytes = 80 KiB (D = 64), 160 KiB (D = 128).
#define FLASH_WG(NAME, BF, D, BN)                                                                            \
    extern "C" __global__ void __launch_bounds__(256, 1) NAME(const unsigned short* q, const unsigned short* k, \
        const unsigned short* v, unsigned short* o, int lq, int lk, int heads, float scale_log2, int causal) {  \
        extern __shared__ __align__(128) unsigned short flash_wg_dyn[];                                       \
        flash_wg_impl<BF, D, BN>(q, k, v, o, lq, lk, heads, scale_log2, causal, flash_wg_dyn);                \
    }
FLASH_WG(flash_wg64_f16, 0, 64, 128)
FLASH_WG(flash_wg64_bf16, 1, 64, 128)
FLASH_WG(flash_wg128_f16, 0, 128, 128)
FLASH_WG(flash_wg128_bf16, 1, 128, 128)
