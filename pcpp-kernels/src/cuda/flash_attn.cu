// pcpp CUDA kernels, part of KERNEL_SOURCE (the files cuda/mod.rs lists, concatenated in that
// order: each part may use what the earlier ones define):
// the fused flash-attention kernels (PCPP's attention layers, Flux.1's joint attention).

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
// The global-memory address of a generic pointer.
__device__ __forceinline__ unsigned long long global_addr(const void* p) {
    unsigned long long g;
    asm("cvta.to.global.u64 %0, %1;" : "=l"(g) : "l"(p));
    return g;
}
// 16-byte copy from the global address `g` to the shared-memory address `dst`, asynchronous;
// `bytes` = 0 fills zeros (nothing is read).
__device__ __forceinline__ void cp_async16_at(unsigned dst, unsigned long long g, int bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(g), "r"(bytes) : "memory");
}
// The same between generic pointers.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, int bytes) {
    unsigned long long g = global_addr(src);
    cp_async16_at(smem_addr(dst), g, bytes);
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
// SPLIT > 1 (with QS = 0): the block has SPLIT groups of four warps over the same query rows, each
// taking its share of the key tiles with its own two K/V stages in dynamic shared memory
// (4 * BN * (D + 8) halves a group) and its own named barrier; at the end the groups' partial
// rows (maximum, sum, unnormalised output) are merged through shared memory by group 0, which
// writes the output. The chain of key tiles a block walks is SPLIT times shorter: the latency of
// a small grid, where every block has a multiprocessor to itself, not its throughput.
template <int BF, int D, int MT, int BN, int QS, int SPLIT = 1>
__device__ void flash_attn_impl(const unsigned short* q, const unsigned short* k, const unsigned short* v,
                                unsigned short* o, int lq, int lk, int heads, float scale_log2, int causal,
                                unsigned short* dyn, long sq, long sk, long sv) {
    // 4 warps x 16*MT query rows (the MT m16 tiles of a warp share every K/V fragment).
    constexpr int BM = 64 * MT, LDS = D + 8, NT = 128, KD = D / 16, ND = D / 8, NJ = BN / 8;
    // Two stages of K and V tiles: the next tile streams in (cp.async) while this one is used.
    constexpr bool STAT = QS == 0 && SPLIT == 1;
    __shared__ __align__(16) unsigned short Kstat[STAT ? 2 : 1][STAT ? BN * LDS : 1];
    __shared__ __align__(16) unsigned short Vstat[STAT ? 2 : 1][STAT ? BN * LDS : 1];
    unsigned short* Qsm = dyn;
    // This thread's group of four warps (the key-split groups; 0 without a split) and its index
    // within the group.
    int grp = threadIdx.x / NT, tid = threadIdx.x % NT, warp = tid >> 5, lane = tid & 31;
    unsigned short* gdyn = dyn + grp * 4 * BN * LDS;
    // Stage `st` of the K and V tiles.
    auto kst = [&](int st) -> unsigned short* {
        if constexpr (QS) return dyn + BM * LDS + st * BN * LDS;
        else if constexpr (SPLIT > 1) return gdyn + st * BN * LDS;
        else return Kstat[st];
    };
    auto vst = [&](int st) -> unsigned short* {
        if constexpr (QS) return dyn + BM * LDS + (2 + st) * BN * LDS;
        else if constexpr (SPLIT > 1) return gdyn + (2 + st) * BN * LDS;
        else return Vstat[st];
    };
    // The barrier of the threads that share the K/V stages: the block, or the group's own.
    auto stage_sync = [&]() {
        if constexpr (SPLIT > 1) asm volatile("bar.sync %0, %1;" ::"r"(grp + 1), "r"(NT) : "memory");
        else __syncthreads();
    };
    int bi = blockIdx.z, h = blockIdx.y;
    // Row strides: Q, K and V rows are `sq`, `sk`, `sv` elements apart (packed projections), the
    // output's `dm`.
    long dm = (long)heads * D;
    int q0 = blockIdx.x * BM + warp * 16 * MT;
    const unsigned short* qb = q + (long)bi * lq * sq + h * D;
    const unsigned short* kg = k + (long)bi * lk * sk + h * D;
    const unsigned short* vg = v + (long)bi * lk * sv + h * D;
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
                qa[mt][kk][0] = r0 < lq ? *(const unsigned*)(qb + (long)r0 * sq + col) : 0u;
                qa[mt][kk][1] = r1 < lq ? *(const unsigned*)(qb + (long)r1 * sq + col) : 0u;
                qa[mt][kk][2] = r0 < lq ? *(const unsigned*)(qb + (long)r0 * sq + col + 8) : 0u;
                qa[mt][kk][3] = r1 < lq ? *(const unsigned*)(qb + (long)r1 * sq + col + 8) : 0u;
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
    // This group's key tiles.
    int t_begin = grp * ntiles / SPLIT, t_end = (grp + 1) * ntiles / SPLIT;
    auto load_tile = [&](int tile, int stage) {
        for (int i = tid; i < BN * ND; i += NT) {
            int row = i / ND, ch = (i % ND) * 8;
            int key = tile * BN + row;
            int ok = key < lk ? 16 : 0;
            long kr = key < lk ? key : 0;
            cp_async16(kst(stage) + row * LDS + ch, kg + kr * sk + ch, ok);
            cp_async16(vst(stage) + row * LDS + ch, vg + kr * sv + ch, ok);
        }
        asm volatile("cp.async.commit_group;" ::: "memory");
    };
    if constexpr (QS) {
        int qrow0 = blockIdx.x * BM;
        for (int i = tid; i < BM * ND; i += NT) {
            int row = i / ND, ch = (i % ND) * 8;
            int r = qrow0 + row;
            cp_async16(&Qsm[row * LDS + ch], qb + (long)(r < lq ? r : 0) * sq + ch, r < lq ? 16 : 0);
        }
        asm volatile("cp.async.commit_group;" ::: "memory");
    }
    if (t_begin < t_end) load_tile(t_begin, t_begin & 1);
    for (int tile = t_begin; tile < t_end; ++tile) {
        int kb = tile * BN;
        const unsigned short* Ks = kst(tile & 1);
        const unsigned short* Vs = vst(tile & 1);
        if (tile + 1 < t_end) {
            load_tile(tile + 1, (tile + 1) & 1);
            asm volatile("cp.async.wait_group 1;" ::: "memory");
        } else {
            asm volatile("cp.async.wait_group 0;" ::: "memory");
        }
        stage_sync();
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
        stage_sync();
    }
    if constexpr (SPLIT > 1) {
        // Every group's stages are free once its last barrier is passed: groups 1.. store their
        // partial rows in their own (f32, [36][NT]: maxima, sums, accumulators), group 0 merges.
        static_assert(MT == 1 && (4 + 4 * ND) * NT * 4 <= 4 * BN * LDS * 2, "partials fit the stages");
#pragma unroll
        for (int r = 0; r < 2; ++r)
#pragma unroll
            for (int off = 1; off < 4; off <<= 1) lrow[0][r] += __shfl_xor_sync(0xffffffffu, lrow[0][r], off);
        float* part = reinterpret_cast<float*>(gdyn);
        if (grp > 0) {
            part[tid] = mrow[0][0];
            part[NT + tid] = mrow[0][1];
            part[2 * NT + tid] = lrow[0][0];
            part[3 * NT + tid] = lrow[0][1];
#pragma unroll
            for (int d = 0; d < ND; ++d)
#pragma unroll
                for (int e = 0; e < 4; ++e) part[(4 + d * 4 + e) * NT + tid] = acc[0][d][e];
        }
        __syncthreads();
        if (grp > 0) return;
#pragma unroll
        for (int g = 1; g < SPLIT; ++g) {
            const float* pg = reinterpret_cast<const float*>(dyn + g * 4 * BN * LDS);
            float al[2], ag[2];
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                float mg = pg[r * NT + tid], m = fmaxf(mrow[0][r], mg);
                // Rows no key of either reached stay zero (no NaN from -inf - -inf).
                float sub = m == NEG_INF ? 0.0f : m * scale_log2;
                al[r] = fast_exp2(fmaf(mrow[0][r], scale_log2, -sub));
                ag[r] = fast_exp2(fmaf(mg, scale_log2, -sub));
                mrow[0][r] = m;
                lrow[0][r] = lrow[0][r] * al[r] + pg[(2 + r) * NT + tid] * ag[r];
            }
#pragma unroll
            for (int d = 0; d < ND; ++d)
#pragma unroll
                for (int e = 0; e < 4; ++e)
                    acc[0][d][e] = acc[0][d][e] * al[e >> 1] + pg[(4 + d * 4 + e) * NT + tid] * ag[e >> 1];
        }
    }
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
        float l0 = lrow[mt][0], l1 = lrow[mt][1];
        if constexpr (SPLIT == 1) {
#pragma unroll
            for (int off = 1; off < 4; off <<= 1) {
                l0 += __shfl_xor_sync(0xffffffffu, l0, off);
                l1 += __shfl_xor_sync(0xffffffffu, l1, off);
            }
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
#if PCPP_IN_PART(1)
#define FLASH_ATTN(NAME, BF, D, MT, BN)                                                                     \
    extern "C" __global__ void __launch_bounds__(128) NAME(const unsigned short* q, const unsigned short* k,  \
        const unsigned short* v, unsigned short* o, int lq, int lk, int heads, float scale_log2, int causal) { pdl_begin(); \
        long dm = (long)heads * D;                                                                           \
        flash_attn_impl<BF, D, MT, BN, 0>(q, k, v, o, lq, lk, heads, scale_log2, causal, nullptr, dm, dm, dm); \
    }
FLASH_ATTN(flash_attn_f16, 0, 64, 2, 64)
FLASH_ATTN(flash_attn_bf16, 1, 64, 2, 64)
FLASH_ATTN(flash_attn128_f16, 0, 128, 1, 32)
FLASH_ATTN(flash_attn128_bf16, 1, 128, 1, 32)
// Head size 128, two m16 tiles per warp (128 query rows per block), Q in shared memory:
// 2 * 32 * 136 * 2 (K/V stages) + 128 * 136 halves = 69 632 bytes of dynamic shared memory.
#define FLASH_ATTN_QS(NAME, BF, BN)                                                                         \
    extern "C" __global__ void __launch_bounds__(128) NAME(const unsigned short* q, const unsigned short* k,  \
        const unsigned short* v, unsigned short* o, int lq, int lk, int heads, float scale_log2, int causal) { pdl_begin(); \
        extern __shared__ __align__(16) unsigned short flash_dyn[];                                         \
        long dm = (long)heads * 128;                                                                         \
        flash_attn_impl<BF, 128, 2, BN, 1>(q, k, v, o, lq, lk, heads, scale_log2, causal, flash_dyn, dm, dm, dm); \
    }
FLASH_ATTN_QS(flash_attn128q_f16, 0, 32)
FLASH_ATTN_QS(flash_attn128q_bf16, 1, 32)
// The same with 64-key tiles (FlashAttention-2's tile for head size 128 on Hopper): half the
// softmax rescales and barriers per key; 128 * 136 + 4 * 64 * 136 halves = 104 448 bytes.
FLASH_ATTN_QS(flash_attn128q64_f16, 0, 64)
FLASH_ATTN_QS(flash_attn128q64_bf16, 1, 64)
#endif
#if PCPP_IN_PART(10)
// Small grids (fewer 64-row query tiles than multiprocessors: a band's attentions): 64 query
// rows per block (one m16 tile per warp), so the grid has twice the blocks of the Hopper kernels'
// 128-row tiles, and each block only the short chain of cp.async loads and mma.sync tiles, with
// no TMA, barriers or warpgroup hand-offs to set up. Q, K and V are read in place from packed
// projections: their rows are `sq`, `sk`, `sv` elements apart (the pointers already at the
// first column), the output's rows `heads * 64`.
#define FLASH_ATTN_SMALL(NAME, BF)                                                                          \
    extern "C" __global__ void __launch_bounds__(128) NAME(const unsigned short* q, const unsigned short* k,  \
        const unsigned short* v, unsigned short* o, int lq, int lk, int heads, long sq, long sk, long sv,  \
        float scale_log2, int causal) { pdl_begin();                                                        \
        flash_attn_impl<BF, 64, 1, 64, 0>(q, k, v, o, lq, lk, heads, scale_log2, causal, nullptr, sq, sk, sv); \
    }
FLASH_ATTN_SMALL(flash_small64_f16, 0)
FLASH_ATTN_SMALL(flash_small64_bf16, 1)
// The same with the key tiles split between S groups of four warps (128 * S threads, S * 4 * 64 *
// 72 halves of dynamic shared memory): a band's window of about 410 keys is seven 64-key tiles in
// one chain, about two in each of four.
#define FLASH_ATTN_SMALL_SPLIT(NAME, BF, S)                                                                 \
    extern "C" __global__ void __launch_bounds__(128 * S) NAME(const unsigned short* q,                    \
        const unsigned short* k, const unsigned short* v, unsigned short* o, int lq, int lk, int heads,     \
        long sq, long sk, long sv, float scale_log2, int causal) { pdl_begin();                             \
        extern __shared__ __align__(16) unsigned short flash_dyn[];                                         \
        flash_attn_impl<BF, 64, 1, 64, 0, S>(q, k, v, o, lq, lk, heads, scale_log2, causal, flash_dyn, sq, sk, sv); \
    }
FLASH_ATTN_SMALL_SPLIT(flash_small64s2_f16, 0, 2)
FLASH_ATTN_SMALL_SPLIT(flash_small64s2_bf16, 1, 2)
FLASH_ATTN_SMALL_SPLIT(flash_small64s4_f16, 0, 4)
FLASH_ATTN_SMALL_SPLIT(flash_small64s4_bf16, 1, 4)
#endif
