// pcpp CUDA kernels, part of KERNEL_SOURCE (the files cuda/mod.rs lists, concatenated in that
// order: each part may use what the earlier ones define):
// the Hopper (sm_90a) flash attention of PCPP's attention layers and Flux.1's joint attention.

// ---- flash attention with warpgroup MMAs (wgmma), head sizes 64 and 128, f16/bf16 ----
// The online softmax of flash_attn.cu on Hopper's asynchronous warpgroup MMAs. A block is two
// warpgroups (256 threads) and 128 query rows, 64 per warpgroup; Q stays in shared memory, K and
// V stream through shared-memory stages of BN = 128 keys (cp.async), one block barrier per tile.
//   S = Q·Kᵀ: wgmma m64nBNk16, A (Q) and B (K) read from shared memory;
//   O += P·V: wgmma m64nDk16, A (P) from registers (the f32 scores packed to 16 bits in place),
//             B (V) read from shared memory in its stored [key][dim] order (transposed operand).
// Per tile: S, then the softmax, then P·V, two stages; the two warpgroups overlap each other's
// softmax and MMAs. (A variant with FlashAttention-3's intra-warpgroup overlap measured 1-2 %
// slower on an H200 with the block barrier per tile and was dropped; flash_ws.cu has the overlap
// without the barrier.) The default on sm_90a is flash_ws.cu; this kernel is taken where its TMA
// tensor maps cannot be made, or when chosen.
// Tiles sit in shared memory in wgmma's 128-byte-swizzle layout, the same for Q, K and V: per 64
// columns a block of rows of 128 bytes, the 16-byte chunk c of row r at chunk c ^ (r % 8), so
// that 8 consecutive rows form a 1024-byte swizzle atom (K-major for Q and K, N-major for V).
// Compiled only for sm_90a (NVRTC defines __CUDA_ARCH_FEAT_SM90_ALL there); elsewhere the
// kernels exist but trap, and the host never launches them.
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define PCPP_WGMMA 1
#else
#define PCPP_WGMMA 0
#endif

// Shared-memory matrix descriptor: start address, leading- and stride-dimension byte offsets,
// 128-byte swizzle, base offset 0 (every swizzle atom starts at a multiple of 1024 bytes).
__device__ __forceinline__ unsigned long long wg_desc(unsigned addr, unsigned lbo, unsigned sbo) {
    return (unsigned long long)((addr & 0x3FFFF) >> 4) | ((unsigned long long)((lbo & 0x3FFFF) >> 4) << 16) |
           ((unsigned long long)((sbo & 0x3FFFF) >> 4) << 32) | (1ull << 62);
}
// The accumulator operands d[0..N/2) with constraint C ("+f": read and written, "=f": written).
#define WG_F8(C, b) C(d[b]), C(d[b + 1]), C(d[b + 2]), C(d[b + 3]), C(d[b + 4]), C(d[b + 5]), C(d[b + 6]), C(d[b + 7])
#define WG_D32(C) WG_F8(C, 0), WG_F8(C, 8), WG_F8(C, 16), WG_F8(C, 24)
#define WG_D64(C) WG_D32(C), WG_F8(C, 32), WG_F8(C, 40), WG_F8(C, 48), WG_F8(C, 56)
#define WG_R32                                                                                                \
    "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27," \
    "%28,%29,%30,%31}"
#define WG_R64                                                                                                 \
    "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,"  \
    "%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53," \
    "%54,%55,%56,%57,%58,%59,%60,%61,%62,%63}"
// One wgmma statement per element type: M("bf16", ...) when BF, else M("f16", ...).
#define WG_TYPED(M, ...)              \
    do {                              \
        if (BF) M("bf16", __VA_ARGS__); \
        else M("f16", __VA_ARGS__);     \
    } while (0)
// D (64 x N, f32) = A·B (FIRST: D is only written, so that it carries no dependence on earlier
// values) or D += A·B, A and B from shared memory (both K-major).
#define WG_SS(TY, N, NA, NB, SCALE_D, REGS, ...)                                                              \
    asm volatile("wgmma.mma_async.sync.aligned.m64n" N "k16.f32." TY "." TY " " REGS ", %" NA ", %" NB ", "    \
                 SCALE_D ", 1, 1, 0, 0;"                                                                       \
                 : __VA_ARGS__                                                                                 \
                 : "l"(a), "l"(b))
template <int BF, int N, int FIRST>
__device__ __forceinline__ void wg_ss(float* d, unsigned long long a, unsigned long long b) {
#if PCPP_WGMMA
    if constexpr (FIRST && N == 64) WG_TYPED(WG_SS, "64", "32", "33", "0", WG_R32, WG_D32("=f"));
    else if constexpr (FIRST) WG_TYPED(WG_SS, "128", "64", "65", "0", WG_R64, WG_D64("=f"));
    else if constexpr (N == 64) WG_TYPED(WG_SS, "64", "32", "33", "1", WG_R32, WG_D32("+f"));
    else WG_TYPED(WG_SS, "128", "64", "65", "1", WG_R64, WG_D64("+f"));
#endif
}
// D (64 x N, f32) += A·B, A from registers (mma.sync's m16k16 fragment per warp), B from shared
// memory stored N-major (the transposed operand).
#define WG_RS(TY, N, AREGS, NB, REGS, ...)                                                                    \
    asm volatile("wgmma.mma_async.sync.aligned.m64n" N "k16.f32." TY "." TY " " REGS ", " AREGS ", %" NB       \
                 ", 1, 1, 1, 1;"                                                                               \
                 : __VA_ARGS__                                                                                 \
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b))
template <int BF, int N>
__device__ __forceinline__ void wg_rs_t(float* d, const unsigned* a, unsigned long long b) {
#if PCPP_WGMMA
    if constexpr (N == 64) WG_TYPED(WG_RS, "64", "{%32,%33,%34,%35}", "36", WG_R32, WG_D32("+f"));
    else WG_TYPED(WG_RS, "128", "{%64,%65,%66,%67}", "68", WG_R64, WG_D64("+f"));
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

// Byte offset of the 16-byte chunk cc (columns 8cc..) of row r in a tile of R rows.
template <int R>
__device__ __forceinline__ unsigned wg_chunk(int r, int cc) {
    return (cc >> 3) * R * 128 + r * 128 + (((cc & 7) ^ (r & 7)) << 4);
}
// Rows r0.. of a [*, dm] matrix (n valid rows; the others read as zeros) into a tile of R rows,
// D columns, at shared address `dst`; 8 consecutive threads fill one swizzled 128-byte row.
template <int R, int D, int NT>
__device__ __forceinline__ void wg_load(unsigned dst, const unsigned short* src, long dm, int r0, int n) {
    constexpr int CH = D / 8;
    for (int i = threadIdx.x; i < R * CH; i += NT) {
        int r = i / CH, cc = i % CH, row = r0 + r;
        unsigned long long g = global_addr(src + (long)(row < n ? row : 0) * dm + cc * 8);
        cp_async16_at(dst + wg_chunk<R>(r, cc), g, row < n ? 16 : 0);
    }
}
// Online softmax of one tile of scores (this thread's rows g and g + 8 of its warp, 8-key chunks
// j): masks keys past lk (and above the diagonal when causal), updates the running maxima m and
// sums l, returns the rescale factors of the old accumulators in al and leaves P = exp2(S − m)
// in s (f32).
template <int BN>
__device__ __forceinline__ void wg_softmax(float* s, int kb, int lk, int causal, int row0, int c, float scale_log2,
                                           float* m, float* l, float* al) {
    constexpr int NJ = BN / 8;
    bool edge = (kb + BN > lk) || causal;
    float mx0 = NEG_INF, mx1 = NEG_INF;
#pragma unroll
    for (int j = 0; j < NJ; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            float val = s[j * 4 + e];
            if (edge) {
                int key = kb + j * 8 + c + (e & 1);
                int row = row0 + 8 * (e >> 1);
                if (key >= lk || (causal && key > row)) val = NEG_INF;
            }
            s[j * 4 + e] = val;
            if (e < 2) mx0 = fmaxf(mx0, val);
            else mx1 = fmaxf(mx1, val);
        }
    }
#pragma unroll
    for (int off = 1; off < 4; off <<= 1) {
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, off));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, off));
    }
    float mn0 = fmaxf(m[0], mx0), mn1 = fmaxf(m[1], mx1);
    float sub0 = mn0 == NEG_INF ? 0.0f : mn0 * scale_log2;
    float sub1 = mn1 == NEG_INF ? 0.0f : mn1 * scale_log2;
    al[0] = fast_exp2(fmaf(m[0], scale_log2, -sub0));
    al[1] = fast_exp2(fmaf(m[1], scale_log2, -sub1));
    m[0] = mn0;
    m[1] = mn1;
    float ls0 = 0.0f, ls1 = 0.0f;
#pragma unroll
    for (int j = 0; j < NJ; ++j) {
        s[j * 4 + 0] = fast_exp2(fmaf(s[j * 4 + 0], scale_log2, -sub0));
        s[j * 4 + 1] = fast_exp2(fmaf(s[j * 4 + 1], scale_log2, -sub0));
        s[j * 4 + 2] = fast_exp2(fmaf(s[j * 4 + 2], scale_log2, -sub1));
        s[j * 4 + 3] = fast_exp2(fmaf(s[j * 4 + 3], scale_log2, -sub1));
        ls0 += s[j * 4 + 0] + s[j * 4 + 1];
        ls1 += s[j * 4 + 2] + s[j * 4 + 3];
    }
    l[0] = l[0] * al[0] + ls0;
    l[1] = l[1] * al[1] + ls1;
}
// P (f32, the scores' accumulator layout) in 16 bits as the A fragments of the P·V MMAs, 16 keys
// each: mma.sync's m16k16 A fragment is two n8 accumulator chunks side by side.
template <int BF, int BN>
__device__ __forceinline__ void wg_pack(const float* p, unsigned (*pa)[4]) {
#pragma unroll
    for (int j = 0; j < BN / 8; ++j) {
        pa[j >> 1][(j & 1) * 2] = pack2<BF>(p[j * 4 + 0], p[j * 4 + 1]);
        pa[j >> 1][(j & 1) * 2 + 1] = pack2<BF>(p[j * 4 + 2], p[j * 4 + 3]);
    }
}

// S = Q·Kᵀ of one tile: the warpgroup's 64 query rows of a BM-row Q tile at qaddr, the BN keys
// of the K tile at kaddr() (both K-major, 64-column blocks of BM or BN rows of 128 bytes).
template <int BF, int D, int BM, int BN, class KA>
__device__ __forceinline__ void wg_scores(float* sacc, unsigned qaddr, KA kaddr) {
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
        unsigned off = (kk & 3) * 32;
        auto a = wg_desc(qaddr + (kk >> 2) * BM * 128 + off, 16, 1024);
        auto b = wg_desc(kaddr() + (kk >> 2) * BN * 128 + off, 16, 1024);
        if (kk == 0) wg_ss<BF, BN, 1>(sacc, a, b);
        else wg_ss<BF, BN, 0>(sacc, a, b);
    }
}
// O += P·V of one tile, V at vaddr as the N-major operand (64-column blocks BN * 128 bytes
// apart, 8-key groups 1024 bytes apart).
template <int BF, int D, int BN, class VA>
__device__ __forceinline__ void wg_values(float* oacc, unsigned (*pa)[4], VA vaddr) {
#pragma unroll
    for (int t = 0; t < BN / 16; ++t) wg_rs_t<BF, D>(oacc, pa[t], wg_desc(vaddr() + t * 2048, BN * 128, 1024));
}
// The accumulators of rows g (a[0]) and g + 8 (a[1]) times the softmax's rescale factors.
template <int D>
__device__ __forceinline__ void wg_rescale(float* oacc, const float* a) {
#pragma unroll
    for (int d = 0; d < D / 8; ++d) {
        oacc[d * 4 + 0] *= a[0];
        oacc[d * 4 + 1] *= a[0];
        oacc[d * 4 + 2] *= a[1];
        oacc[d * 4 + 3] *= a[1];
    }
}
// O / l of this thread's rows row0 and row0 + 8 (those below lq) into the head's columns at ob
// (rows dm elements apart): the row sums of the quad reduced first.
template <int BF, int D>
__device__ __forceinline__ void wg_store(unsigned short* ob, long dm, int lq, int row0, int c, const float* oacc,
                                         const float* lrow) {
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
}

template <int BF, int D>
__device__ void flash_wg_impl(const unsigned short* q, const unsigned short* k, const unsigned short* v,
                              unsigned short* o, int lq, int lk, int heads, float scale_log2, int causal,
                              unsigned short* dyn) {
#if PCPP_WGMMA
    constexpr int BM = 128, BN = 128, NT = 256, ST = 2;
    constexpr unsigned QBYTES = BM * D * 2, TBYTES = BN * D * 2;
    // Q tile, then ST stages of K and V (each stage: K, then V), from a 1024-byte boundary.
    const unsigned base = (smem_addr(dyn) + 1023u) & ~1023u;
    auto kst = [&](int st) { return base + QBYTES + st * 2 * TBYTES; };
    auto vst = [&](int st) { return base + QBYTES + st * 2 * TBYTES + TBYTES; };
    int tid = threadIdx.x, wg = tid >> 7, warp = (tid >> 5) & 3, lane = tid & 31;
    int bi = blockIdx.z, h = blockIdx.y;
    long dm = (long)heads * D;
    int qblk = blockIdx.x * BM;
    const unsigned short* qb = q + (long)bi * lq * dm + h * D;
    const unsigned short* kg = k + (long)bi * lk * dm + h * D;
    const unsigned short* vg = v + (long)bi * lk * dm + h * D;
    unsigned short* ob = o + (long)bi * lq * dm + h * D;
    int kend = causal ? min(lk, qblk + BM) : lk;
    int ntiles = (kend + BN - 1) / BN;
    auto load_tile = [&](int tile) {
        wg_load<BN, D, NT>(kst(tile % ST), kg, dm, tile * BN, lk);
        wg_load<BN, D, NT>(vst(tile % ST), vg, dm, tile * BN, lk);
    };
    auto commit = [] { asm volatile("cp.async.commit_group;" ::: "memory"); };
    // Every copy of this thread landed, visible to the MMAs (async proxy) of the whole block.
    auto landed = [] {
        asm volatile("cp.async.wait_group 0;" ::: "memory");
        asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
        __syncthreads();
    };
    // This thread's rows of the warpgroup's 64: g and g + 8 of its warp's 16.
    int row0 = qblk + wg * 64 + warp * 16 + lane / 4, c = 2 * (lane % 4);
    float oacc[D / 2], sacc[BN / 2];
#pragma unroll
    for (int i = 0; i < D / 2; ++i) oacc[i] = 0.0f;
    float mrow[2] = {NEG_INF, NEG_INF}, lrow[2] = {0.0f, 0.0f}, al[2];
    unsigned pa[BN / 16][4];
    // The warpgroup's Q rows: 64 rows of 128 bytes into each 64-column block.
    const unsigned qaddr = base + wg * 64 * 128;
    auto scores = [&](int st) { wg_scores<BF, D, BM, BN>(sacc, qaddr, [&] { return kst(st); }); };
    auto values = [&](int st) { wg_values<BF, D, BN>(oacc, pa, [&] { return vst(st); }); };
    auto rescale = [&](const float* a) { wg_rescale<D>(oacc, a); };
    wg_load<BM, D, NT>(base, qb, dm, qblk, lq);
    if (ntiles > 0) load_tile(0);
    commit();
    for (int tile = 0; tile < ntiles; ++tile) {
        // Past the barrier every warpgroup is done with the previous tile, whose stage the
        // next tile's copies overwrite while this one is computed.
        landed();
        if (tile + 1 < ntiles) {
            load_tile(tile + 1);
            commit();
        }
        wg_fence();
        scores(tile % ST);
        wg_commit_wait();
        wg_hold<BN / 2>(sacc);
        wg_softmax<BN>(sacc, tile * BN, lk, causal, row0, c, scale_log2, mrow, lrow, al);
        wg_pack<BF, BN>(sacc, pa);
        rescale(al);
        wg_hold<D / 2>(oacc);
        wg_fence();
        values(tile % ST);
        wg_commit_wait();
        wg_hold<D / 2>(oacc);
    }
    wg_store<BF, D>(ob, dm, lq, row0, c, oacc, lrow);
#else
    __trap();
#endif
}
// Dynamic shared memory: 1 KiB of alignment slack, a 128-row Q tile and two stages of 128-row K
// and V tiles, D halves a row: 1 KiB + (128 + 4 * 128) * D * 2 bytes.
#define FLASH_WG(NAME, BF, D)                                                                          \
    extern "C" __global__ void __launch_bounds__(256, 1) NAME(const unsigned short* q, const unsigned short* k, \
        const unsigned short* v, unsigned short* o, int lq, int lk, int heads, float scale_log2, int causal) { pdl_begin(); \
        extern __shared__ __align__(1024) unsigned short flash_wg_dyn[];                                      \
        flash_wg_impl<BF, D>(q, k, v, o, lq, lk, heads, scale_log2, causal, flash_wg_dyn);              \
    }
#if PCPP_IN_PART(2)
FLASH_WG(flash_wg64_f16, 0, 64)
FLASH_WG(flash_wg64_bf16, 1, 64)
FLASH_WG(flash_wg128_f16, 0, 128)
FLASH_WG(flash_wg128_bf16, 1, 128)
#endif
