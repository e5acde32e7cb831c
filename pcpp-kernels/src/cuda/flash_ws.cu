// pcpp CUDA kernels, part of KERNEL_SOURCE (the files cuda/mod.rs lists, concatenated in that
// order: each part may use what the earlier ones define):
// the warp-specialised Hopper (sm_90a) flash attention of PCPP's attention
// layers and Flux.1's joint attention, FlashAttention-3's structure on flash_hopper.cu's MMAs.

// ---- warp-specialised flash attention: a TMA producer and two MMA warpgroups ----
// A block is three warpgroups (384 threads) and 128 query rows. Warpgroup 0 is the producer: one
// thread loads the Q tile and then the K and V tiles of BN = 128 keys into two shared-memory
// stages with the tensor memory accelerator (cp.async.bulk.tensor, 128-byte swizzle, the layout
// flash_hopper.cu's descriptors read), each stage guarded by a "full" mbarrier (the copy's bytes
// arrived) and an "empty" one (both MMA warpgroups are done with it). Warpgroups 1 and 2 each
// take 64 query rows and run flash_hopper.cu's S = Q·Kᵀ and O += P·V wgmma with the online
// softmax; the producer gives its registers to them (setmaxnreg). No block-wide barrier runs in
// the loop, so the two MMA warpgroups drift apart instead of meeting once per tile.
// Per tile the MMAs of the scores of tile t and of P·V of tile t − 1 are issued together; then
//   PIPE = 1: the softmax of tile t runs while P·V of tile t − 1 is still in the tensor cores
//             (FlashAttention-3's intra-warpgroup overlap); PIPE = 0: after both finished;
//   PP = 1:   the two warpgroups take turns to issue (named barriers 1 and 2, FlashAttention-3's
//             ping-pong), so that one's softmax runs under the other's MMAs.
// Compiled only for sm_90a (PCPP_WGMMA); elsewhere the kernels exist but trap, and the host never
// launches them.

// A TMA tensor map as the driver encodes it (CUtensorMap): 128 opaque bytes.
struct __align__(128) TmaMap {
    unsigned long long v[16];
};

__device__ __forceinline__ void mbar_init(unsigned bar, unsigned count) {
#if PCPP_WGMMA
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count) : "memory");
#endif
}
// Arrives on the barrier and adds `bytes` to the transaction count its phase waits for.
__device__ __forceinline__ void mbar_expect(unsigned bar, unsigned bytes) {
#if PCPP_WGMMA
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes) : "memory");
#endif
}
__device__ __forceinline__ void mbar_arrive(unsigned bar) {
#if PCPP_WGMMA
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(bar) : "memory");
#endif
}
// Waits until the phase of the given parity completed (a fresh barrier counts its phase before the
// first, parity 1, as completed).
__device__ __forceinline__ void mbar_wait(unsigned bar, unsigned parity) {
#if PCPP_WGMMA
    unsigned ok = 0;
    do {
        asm volatile(
            "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}"
            : "=r"(ok)
            : "r"(bar), "r"(parity)
            : "memory");
    } while (!ok);
#endif
}
// The box of `map` at columns x.., rows y.. of matrix z (64 columns, 128 rows) into shared memory
// at dst; its bytes complete a transaction on the barrier. Rows past the matrix read as zeros.
__device__ __forceinline__ void tma_box(unsigned dst, const TmaMap* map, int x, int y, int z, unsigned bar) {
#if PCPP_WGMMA
    asm volatile(
        "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], "
        "[%5];" ::"r"(dst),
        "l"((unsigned long long)map), "r"(x), "r"(y), "r"(z), "r"(bar)
        : "memory");
#endif
}
// A tile of R rows and D columns (D / 64 boxes side by side, R * 128 bytes apart in shared
// memory) from columns x.., rows y.. of matrix z.
template <int R, int D>
__device__ __forceinline__ void tma_tile(unsigned dst, const TmaMap* map, int x, int y, int z, unsigned bar) {
#pragma unroll
    for (int j = 0; j < D / 64; ++j) tma_box(dst + j * R * 128, map, x + j * 64, y, z, bar);
}
// Named barrier `id` of two MMA warpgroups: wait for the other's arrival, or arrive for it.
__device__ __forceinline__ void ws_sync(int id) {
    asm volatile("bar.sync %0, 256;" ::"r"(id) : "memory");
}
__device__ __forceinline__ void ws_arrive(int id) {
    asm volatile("bar.arrive %0, 256;" ::"r"(id) : "memory");
}

template <int BF, int D, int PIPE, int PP, int NC, int PST>
__device__ void flash_ws_impl(const TmaMap* tq, const TmaMap* tk, const TmaMap* tv, unsigned short* o, int lq,
                              int lk, int heads, int batch, int q0, int q1, float scale_log2, int causal,
                              unsigned short* dyn, unsigned long long* bars) {
#if PCPP_WGMMA
    constexpr int BM = 64 * NC, BN = 128, ST = 2;
    constexpr unsigned QBYTES = BM * D * 2, TBYTES = BN * D * 2;
    // Q tile, then ST stages of K and V (each stage: K, then V), from a 1024-byte boundary.
    const unsigned base = (smem_addr(dyn) + 1023u) & ~1023u;
    auto kst = [&](int st) { return base + QBYTES + st * 2 * TBYTES; };
    auto vst = [&](int st) { return base + QBYTES + st * 2 * TBYTES + TBYTES; };
    // Barriers: Q full, Q empty, then per stage K full, V full, K empty, V empty.
    const unsigned b0 = smem_addr(bars);
    const unsigned qfull = b0, qempty = b0 + 8;
    auto kfull = [&](int st) { return b0 + 8 * (2 + 4 * st); };
    auto vfull = [&](int st) { return b0 + 8 * (3 + 4 * st); };
    auto kempty = [&](int st) { return b0 + 8 * (4 + 4 * st); };
    auto vempty = [&](int st) { return b0 + 8 * (5 + 4 * st); };
    int tid = threadIdx.x, wg = tid >> 7;
    // The query rows q0 .. q1 of every head and image (the host may split a grid's rows between
    // two launches of different tile heights) in tiles numbered query block fastest, then head,
    // then image. A persistent block (PST) takes tiles blockIdx.x, blockIdx.x + gridDim.x, ...;
    // otherwise the block's one tile is its grid position.
    const int qtiles = (q1 - q0 + BM - 1) / BM, total = qtiles * heads * batch;
    const int first = PST ? blockIdx.x : blockIdx.x + qtiles * (blockIdx.y + heads * blockIdx.z);
    const int step = PST ? gridDim.x : total;
    auto tile_at = [&](int tile, int& qblk, int& h, int& bi) {
        qblk = q0 + (tile % qtiles) * BM;
        h = (tile / qtiles) % heads;
        bi = tile / (qtiles * heads);
        int kend = causal ? min(lk, qblk + BM) : lk;
        return (kend + BN - 1) / BN;
    };
    if (tid == 0) {
        mbar_init(qfull, 1);
        mbar_init(qempty, 128 * NC);
        for (int st = 0; st < ST; ++st) {
            mbar_init(kfull(st), 1);
            mbar_init(vfull(st), 1);
            mbar_init(kempty(st), 128 * NC);
            mbar_init(vempty(st), 128 * NC);
        }
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    __syncthreads();
    if (wg == 0) {
        asm volatile("setmaxnreg.dec.sync.aligned.u32 24;");
        if (tid == 0) {
            // `it` counts K/V tiles over all of this block's query tiles: the stage and phase.
            int it = 0, n = 0;
            for (int tile = first; tile < total; tile += step, ++n) {
                int qblk, h, bi;
                int ntiles = tile_at(tile, qblk, h, bi);
                mbar_wait(qempty, (n & 1) ^ 1);
                mbar_expect(qfull, QBYTES);
                tma_tile<BM, D>(base, tq, h * D, qblk, bi, qfull);
                for (int t = 0; t < ntiles; ++t, ++it) {
                    int st = it % ST;
                    unsigned ph = ((it / ST) & 1) ^ 1;
                    mbar_wait(kempty(st), ph);
                    mbar_expect(kfull(st), TBYTES);
                    tma_tile<BN, D>(kst(st), tk, h * D, t * BN, bi, kfull(st));
                    mbar_wait(vempty(st), ph);
                    mbar_expect(vfull(st), TBYTES);
                    tma_tile<BN, D>(vst(st), tv, h * D, t * BN, bi, vfull(st));
                }
            }
        }
        return;
    }
    if constexpr (NC == 3) asm volatile("setmaxnreg.inc.sync.aligned.u32 160;");
    else asm volatile("setmaxnreg.inc.sync.aligned.u32 240;");
    // This MMA warpgroup (0 .. NC - 1) and this thread's rows g and g + 8 of its warp's 16.
    int cw = wg - 1, warp = (tid >> 5) & 3, lane = tid & 31;
    int c = 2 * (lane % 4);
    float oacc[D / 2], sacc[BN / 2];
    unsigned pa[BN / 16][4];
    const unsigned qaddr = base + cw * 64 * 128;
    auto scores = [&](int st) { wg_scores<BF, D, BM, BN>(sacc, qaddr, [&] { return kst(st); }); };
    auto values = [&](int st) { wg_values<BF, D, BN>(oacc, pa, [&] { return vst(st); }); };
    auto rescale = [&](const float* a) { wg_rescale<D>(oacc, a); };
    auto commit = [] { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); };
    // Ping-pong: this warpgroup's turn to issue MMAs (barrier 1 + cw), then the next one's. The
    // turns run on from one query tile to the next: the last warpgroup's first arrival opens
    // them and the first warpgroup takes its last one after the last tile, so that no named
    // barrier is left half-passed.
    auto turn = [&] {
        if constexpr (PP) ws_sync(1 + cw);
    };
    auto pass = [&] {
        if constexpr (PP) ws_arrive(1 + (cw + 1) % NC);
    };
    if constexpr (PP) {
        if (cw == NC - 1) ws_arrive(1);
    }
    int it = 0, n = 0;
    for (int tile = first; tile < total; tile += step, ++n) {
        int qblk, h, bi;
        const int ntiles = tile_at(tile, qblk, h, bi);
        const int row0 = qblk + cw * 64 + warp * 16 + lane / 4;
#pragma unroll
        for (int i = 0; i < D / 2; ++i) oacc[i] = 0.0f;
        float mrow[2] = {NEG_INF, NEG_INF}, lrow[2] = {0.0f, 0.0f}, al[2];
        mbar_wait(qfull, n & 1);
        if (ntiles > 0) {
            int st0 = it % ST;
            mbar_wait(kfull(st0), (it / ST) & 1);
            turn();
            wg_fence();
            scores(st0);
            commit();
            pass();
            asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
            wg_hold<BN / 2>(sacc);
            mbar_arrive(kempty(st0));
            // The Q tile is free once its last scores are in (the producer loads the next one).
            if (ntiles == 1) mbar_arrive(qempty);
            wg_softmax<BN>(sacc, 0, lk, causal, row0, c, scale_log2, mrow, lrow, al);
            wg_pack<BF, BN>(sacc, pa);
            for (int t = 1; t < ntiles; ++t) {
                int g = it + t, st = g % ST, pst = (g - 1) % ST;
                mbar_wait(kfull(st), (g / ST) & 1);
                mbar_wait(vfull(pst), ((g - 1) / ST) & 1);
                turn();
                wg_fence();
                scores(st);
                commit();
                values(pst);
                commit();
                pass();
                if constexpr (PIPE) asm volatile("wgmma.wait_group.sync.aligned 1;" ::: "memory");
                else asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
                wg_hold<BN / 2>(sacc);
                mbar_arrive(kempty(st));
                if (t == ntiles - 1) mbar_arrive(qempty);
                wg_softmax<BN>(sacc, t * BN, lk, causal, row0, c, scale_log2, mrow, lrow, al);
                asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
                wg_hold<D / 2>(oacc);
                mbar_arrive(vempty(pst));
                rescale(al);
                wg_pack<BF, BN>(sacc, pa);
            }
            int g = it + ntiles - 1, lst = g % ST;
            mbar_wait(vfull(lst), (g / ST) & 1);
            turn();
            wg_hold<D / 2>(oacc);
            wg_fence();
            values(lst);
            commit();
            pass();
            asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
            wg_hold<D / 2>(oacc);
            mbar_arrive(vempty(lst));
        } else {
            mbar_arrive(qempty);
        }
        it += ntiles;
        long dm = (long)heads * D;
        wg_store<BF, D>(o + (long)bi * lq * dm + h * D, dm, q1, row0, c, oacc, lrow);
    }
    if constexpr (PP) {
        if (cw == 0) ws_sync(1);
    }
#else
    __trap();
#endif
}
// Q, K and V come as TMA tensor maps of their [batch, rows, heads · D] matrices (64-column boxes
// of 64 · NC rows for Q and 128 rows for K and V, 128-byte swizzle). NC MMA warpgroups of 64 query
// rows each (2, or 3 for head size 64: FlashAttention-3's 192-row tiles, more MMA work per K/V
// tile; the consumers get 160 registers instead of 240). Dynamic shared memory: 1 KiB of
// alignment slack, the Q tile and two stages of 128-row K and V tiles:
// 1 KiB + (64 · NC + 4 · 128) · D · 2 bytes. The kernel covers query rows q0 .. q1 of each head
// (of lq; the output keeps lq rows per image) over `batch` images: as a grid of one block per
// tile (qtiles, heads, batch), or with PST = 1 as a persistent grid of any size.
#define FLASH_WS(NAME, BF, D, PIPE, PP) FLASH_WSN(NAME, BF, D, PIPE, PP, 2, 0)
#define FLASH_WSN(NAME, BF, D, PIPE, PP, NC, PST)                                                               \
    extern "C" __global__ void __launch_bounds__(128 * (NC + 1), 1)                                           \
        NAME(const __grid_constant__ TmaMap tq, const __grid_constant__ TmaMap tk,                           \
             const __grid_constant__ TmaMap tv, unsigned short* o, int lq, int lk, int heads, int batch,      \
             int q0, int q1, float scale_log2, int causal) {                                                  \
        pdl_begin();                                                                                          \
        extern __shared__ __align__(1024) unsigned short flash_ws_dyn[];                                      \
        __shared__ __align__(8) unsigned long long flash_ws_bars[10];                                        \
        flash_ws_impl<BF, D, PIPE, PP, NC, PST>(&tq, &tk, &tv, o, lq, lk, heads, batch, q0, q1, scale_log2,   \
                                                causal, flash_ws_dyn, flash_ws_bars);                         \
    }
// Head size 64 and 128, one block per tile (the schedules `ws`, `wsp`, `wso`).
#if PCPP_IN_PART(3)
FLASH_WS(flash_ws64_f16, 0, 64, 1, 1)
FLASH_WS(flash_ws64_bf16, 1, 64, 1, 1)
FLASH_WS(flash_wsp64_f16, 0, 64, 0, 1)
FLASH_WS(flash_wsp64_bf16, 1, 64, 0, 1)
FLASH_WS(flash_wso64_f16, 0, 64, 1, 0)
FLASH_WS(flash_wso64_bf16, 1, 64, 1, 0)
#endif
#if PCPP_IN_PART(4)
FLASH_WS(flash_ws128_f16, 0, 128, 1, 1)
FLASH_WS(flash_ws128_bf16, 1, 128, 1, 1)
FLASH_WS(flash_wsp128_f16, 0, 128, 0, 1)
FLASH_WS(flash_wsp128_bf16, 1, 128, 0, 1)
FLASH_WS(flash_wso128_f16, 0, 128, 1, 0)
FLASH_WS(flash_wso128_bf16, 1, 128, 1, 0)
#endif
// Three MMA warpgroups (192-row tiles), head size 64.
#if PCPP_IN_PART(5)
FLASH_WSN(flash_ws3w64_f16, 0, 64, 1, 1, 3, 0)
FLASH_WSN(flash_ws3w64_bf16, 1, 64, 1, 1, 3, 0)
FLASH_WSN(flash_ws3wo64_f16, 0, 64, 1, 0, 3, 0)
FLASH_WSN(flash_ws3wo64_bf16, 1, 64, 1, 0, 3, 0)
#endif
// Persistent forms of the default schedule (`r`): one block per multiprocessor, each looping over
// query tiles; its producer loads the next tile's Q and first K/V while the MMA warpgroups finish
// the last P·V and store the current one.
#if PCPP_IN_PART(6)
FLASH_WSN(flash_wsr64_f16, 0, 64, 1, 1, 2, 1)
FLASH_WSN(flash_wsr64_bf16, 1, 64, 1, 1, 2, 1)
FLASH_WSN(flash_wsr128_f16, 0, 128, 1, 1, 2, 1)
FLASH_WSN(flash_wsr128_bf16, 1, 128, 1, 1, 2, 1)
FLASH_WSN(flash_ws3wr64_f16, 0, 64, 1, 1, 3, 1)
FLASH_WSN(flash_ws3wr64_bf16, 1, 64, 1, 1, 3, 1)
#endif
