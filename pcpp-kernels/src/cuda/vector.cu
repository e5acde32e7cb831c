// pcpp CUDA kernels, part of KERNEL_SOURCE (the files cuda/mod.rs lists, concatenated in that
// order: each part may use what the earlier ones define):
// vectorised element-wise kernels, row norms, rotary pairs, concatenation, transpose,
// non-finite watch.

// ---- vectorised element-wise kernels and row norms (16 bytes per access: 8 halves or 4 floats) ----
// The host takes these only when every pointer is 16-byte aligned and the vectorised extent is a
// multiple of the vector; each is the twin of the scalar kernel above with the same math in f32.
template <typename T> struct VecN { static constexpr int N = 16 / (int)sizeof(T); };
// The N values of one 16-byte vector as f32.
template <typename T>
__device__ __forceinline__ void vunpack(const U4& u, float* f) {
    const T* e = (const T*)&u;
#pragma unroll
    for (int i = 0; i < VecN<T>::N; ++i) f[i] = to_f(e[i]);
}
template <typename T>
__device__ __forceinline__ void vload(const T* p, float* f) {
    vunpack<T>(*(const U4*)p, f);
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
// GEGLU with N columns per thread (h % N == 0, aligned). Vectors of a row along x; along y each
// thread takes every gridDim.y-th row, and loads its next row's two vectors before it computes
// this row's: the exact GELU's erff costs about as much time as the row's loads, and without
// the prefetch a warp waited for its loads and then computed with none in flight.
template <typename T>
__device__ void geglu_vec_impl(const T* x, T* y, long rows, long h) {
    constexpr int N = VecN<T>::N;
    long r0 = blockIdx.y;
    if (r0 >= rows) return;
    for (long j = ((long)blockIdx.x * blockDim.x + threadIdx.x) * N; j < h; j += (long)gridDim.x * blockDim.x * N) {
        U4 va = *(const U4*)(x + r0 * 2 * h + j), vg = *(const U4*)(x + r0 * 2 * h + h + j);
        for (long r = r0; r < rows; r += gridDim.y) {
            long rn = r + gridDim.y;
            U4 na = va, ng = vg;
            if (rn < rows) {
                na = *(const U4*)(x + rn * 2 * h + j);
                ng = *(const U4*)(x + rn * 2 * h + h + j);
            }
            float a[N], g[N];
            vunpack<T>(va, a);
            vunpack<T>(vg, g);
#pragma unroll
            for (int k = 0; k < N; ++k) a[k] *= gelu_f(g[k]);
            vstore(y + r * h + j, a);
            va = na;
            vg = ng;
        }
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
// A residual sum and the layer norm of it, one warp per row: s = a + r (stored, in T), then
// row_norm_warp_impl of s. Each lane reads back only what it wrote (row_sum's element order), so
// the result is the bits of binary_same then row_norm_warp, one launch instead of two.
template <typename T>
__device__ void add_row_norm_warp_impl(const T* a, const T* r, T* s, const T* gamma, const T* beta, T* y,
                                       long rows, long d, float eps, int vec) {
    constexpr int N = VecN<T>::N;
    long row = (long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= rows) return;
    int lane = threadIdx.x & 31;
    const T* ar = a + row * d;
    const T* rr = r + row * d;
    T* sr = s + row * d;
    if (vec) {
        for (long j = (long)lane * N; j < d; j += 32 * N) {
            float f[N], g[N];
            vload(ar + j, f);
            vload(rr + j, g);
#pragma unroll
            for (int k = 0; k < N; ++k) f[k] = f[k] + g[k];
            vstore(sr + j, f);
        }
    } else {
        for (long j = lane; j < d; j += 32) sr[j] = from_f<T>(to_f(ar[j]) + to_f(rr[j]));
    }
    __syncwarp();
    row_norm_warp_impl<T>(s, gamma, beta, y, rows, d, eps, 1, vec, nullptr, nullptr, 1);
}
// Layer norm with the row held in registers, one warp per row: lane l holds the row's 16-byte
// vectors l, l + 32, ... (at most NV of them, packed in T), so the row is read once instead of
// three times. With `a2`, the row is a + a2 (rounded to T, stored to `s`), the residual sum of
// add_row_norm_warp_impl. The operation order is row_sum's and row_norm_warp_impl's (same bits);
// d % N == 0 and 16-byte-aligned pointers (the `vec` case), d <= 32 * N * NV.
// gamma and beta, the same for every row of the block, are copied into shared memory once per
// block (cp.async) while the rows load, not after the two reductions (one memory latency fewer on
// the way out) and not into every warp's registers (twice the row's registers, which left a
// 4 096-row grid of 1 280-wide rows more than one wave).
template <typename T, int NV>
__device__ void row_norm_reg_impl(const T* a, const T* a2, T* s, const T* gamma, const T* beta, T* y, long rows,
                                  long d, float eps) {
    constexpr int N = VecN<T>::N;
    __shared__ U4 gsm[32 * NV], bsm[32 * NV];
    long nvec = d / N;
    for (long t = threadIdx.x; t < nvec; t += blockDim.x) {
        if (gamma) cp_async16(&gsm[t], gamma + t * N, 16);
        if (beta) cp_async16(&bsm[t], beta + t * N, 16);
    }
    asm volatile("cp.async.commit_group;" ::: "memory");
    long r = (long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    bool live = r < rows;
    int lane = threadIdx.x & 31;
    const T* ar = a + r * d;
    U4 buf[NV];
#pragma unroll
    for (int i = 0; i < NV; ++i) {
        long j = (long)(lane + 32 * i) * N;
        if (live && j < d) {
            if (a2) {
                float f[N], g[N];
                vload(ar + j, f);
                vload(a2 + r * d + j, g);
#pragma unroll
                for (int k = 0; k < N; ++k) f[k] = f[k] + g[k];
                T* e = (T*)&buf[i];
#pragma unroll
                for (int k = 0; k < N; ++k) e[k] = from_f<T>(f[k]);
                *(U4*)(s + r * d + j) = buf[i];
            } else {
                buf[i] = *(const U4*)(ar + j);
            }
        } else {
            // Lanes past the row and warps past the last row (which only join the barrier)
            // reduce zeros, not uninitialised registers.
            buf[i] = U4{0u, 0u, 0u, 0u};
        }
    }
    float sum = 0.0f;
#pragma unroll
    for (int i = 0; i < NV; ++i) {
        if ((long)(lane + 32 * i) * N < d) {
            const T* e = (const T*)&buf[i];
#pragma unroll
            for (int k = 0; k < N; ++k) {
                float v = to_f(e[k]) - 0.0f;
                sum += v;
            }
        }
    }
    float mean = warp_sum(sum) / (float)d;
    float sq = 0.0f;
#pragma unroll
    for (int i = 0; i < NV; ++i) {
        if ((long)(lane + 32 * i) * N < d) {
            const T* e = (const T*)&buf[i];
#pragma unroll
            for (int k = 0; k < N; ++k) {
                float v = to_f(e[k]) - mean;
                sq += v * v;
            }
        }
    }
    float rstd = rsqrtf(warp_sum(sq) / (float)d + eps);
    asm volatile("cp.async.wait_group 0;" ::: "memory");
    __syncthreads();
    if (!live) return;
    T* out = y + r * d;
#pragma unroll
    for (int i = 0; i < NV; ++i) {
        long j = (long)(lane + 32 * i) * N;
        if (j < d) {
            const T* e = (const T*)&buf[i];
            float f[N], g[N], b[N];
            if (gamma) vunpack<T>(gsm[lane + 32 * i], g);
            if (beta) vunpack<T>(bsm[lane + 32 * i], b);
#pragma unroll
            for (int k = 0; k < N; ++k) {
                float v = (to_f(e[k]) - mean) * rstd;
                if (gamma) v *= g[k];
                if (beta) v += b[k];
                f[k] = v;
            }
            vstore(out + j, f);
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
#if PCPP_IN_PART(0)
extern "C" __global__ void cat_multi_u16(unsigned short* d, long outer, long total, CatSrc c) { pdl_begin();
    cat_multi_impl<unsigned short>(d, outer, total, c);
}
#endif
#if PCPP_IN_PART(0)
extern "C" __global__ void cat_multi_u128(U4* d, long outer, long total, CatSrc c) { pdl_begin();
    cat_multi_impl<U4>(d, outer, total, c);
}
#endif

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
// ---- batched 2-D transpose, two elements per access: src [n, rows, cols] -> dst [n, cols, rows] ----
// rows and cols even, pointers aligned to two elements; 64×64 tiles, block (32, 8). The epilogue
// of an NHWC -> NCHW convolution output: dst row j (src column j) of matrix n gets, in this order
// and each rounded to T like the separate op, `bias[j]` (per channel), `plane[n * cols + j]` (per
// image and channel, a `[b, c, 1, 1]` add) and the dst-shaped `res` (a residual) added in f32;
// each is skipped where null. Same values as transpose_impl and the separate adds otherwise.
template <typename T> struct alignas(2 * sizeof(T)) Pair { T a, b; };
// This thread's eight element pairs of a 64-row tile of a [rows, cols] matrix: rows
// r0 + threadIdx.y + 8k, columns col, col + 1; all loads issued before any is used, those out of
// bounds skipped (their pairs are left unset).
template <typename T>
__device__ __forceinline__ void tile_pairs8(Pair<T>* v, const T* src, long r0, long col, long rows, long cols) {
#pragma unroll
    for (int k = 0; k < 8; ++k) {
        long r = r0 + threadIdx.y + 8 * k;
        if (r < rows && col < cols) v[k] = *(const Pair<T>*)(src + r * cols + col);
    }
}

template <typename T>
__device__ void transpose_pairs_impl(const T* src, T* dst, long rows, long cols, const T* bias, const T* plane,
                                     const T* res) {
    __shared__ T tile[64][66];
    long n = blockIdx.z;
    long r0 = (long)blockIdx.y * 64, c0 = (long)blockIdx.x * 64;
    const T* s = src + n * rows * cols;
    T* d = dst + n * rows * cols;
    int tx = threadIdx.x, ty = threadIdx.y;
    // Each thread's eight loads are issued before any is used (and so are the residual's below):
    // a loop that stored each pair before loading the next kept one load in flight per thread.
    Pair<T> v[8];
    tile_pairs8(v, s, r0, c0 + 2 * tx, rows, cols);
#pragma unroll
    for (int k = 0; k < 8; ++k) {
        int i = ty + 8 * k;
        if (r0 + i < rows && c0 + 2 * tx < cols) {
            tile[i][2 * tx] = v[k].a;
            tile[i][2 * tx + 1] = v[k].b;
        }
    }
    __syncthreads();
    Pair<T> q[8];
    if (res) {
#pragma unroll
        for (int k = 0; k < 8; ++k) {
            long c = c0 + ty + 8 * k, r = r0 + 2 * tx;
            if (r < rows && c < cols) q[k] = *(const Pair<T>*)(res + n * rows * cols + c * rows + r);
        }
    }
#pragma unroll
    for (int k = 0; k < 8; ++k) {
        int i = ty + 8 * k;
        long c = c0 + i, r = r0 + 2 * tx;
        if (r < rows && c < cols) {
            Pair<T> p;
            p.a = tile[2 * tx][i];
            p.b = tile[2 * tx + 1][i];
            if (bias) {
                float bv = to_f(bias[c]);
                p.a = from_f<T>(to_f(p.a) + bv);
                p.b = from_f<T>(to_f(p.b) + bv);
            }
            if (plane) {
                float pv = to_f(plane[n * cols + c]);
                p.a = from_f<T>(to_f(p.a) + pv);
                p.b = from_f<T>(to_f(p.b) + pv);
            }
            if (res) {
                p.a = from_f<T>(to_f(q[k].a) + to_f(p.a));
                p.b = from_f<T>(to_f(q[k].b) + to_f(p.b));
            }
            *(Pair<T>*)(d + c * rows + r) = p;
        }
    }
}

// Group-norm apply writing NHWC: dst[n, s, c] = act(src[n, c, s] * scale + shift) with plane
// (n, c)'s affine, the values of gn_apply_planes_impl; a 64×64 tile of transpose_pairs_impl, the
// affine applied on load. Image n is written at y + n * ybs (ybs ≥ s * c: a window whose rows
// hold more than this band). c and s even, pointers and ybs aligned to two elements; block (32, 8).
// The tile's 64 planes' affines are computed once, into shared memory, while its loads are in
// flight: per element pair they cost 64-bit divisions and three dependent loads, which made the
// pass instruction- and latency-bound (about a third of transpose_pairs_impl's bandwidth).
template <typename T>
__device__ void gn_apply_nhwc_impl(const T* x, const float* mean_rstd, const T* gamma, const T* beta, T* y, int c,
                                   long s, int groups, int silu, long ybs) {
    __shared__ T tile[64][66];
    __shared__ float2 aff[64];
    long n = blockIdx.z;
    long r0 = (long)blockIdx.y * 64, c0 = (long)blockIdx.x * 64;
    const T* src = x + n * c * s;
    T* d = y + n * ybs;
    int tx = threadIdx.x, ty = threadIdx.y;
    long col = c0 + 2 * tx;
    Pair<T> v[8];
    tile_pairs8(v, src, r0, col, (long)c, s);
    int t = ty * 32 + tx;
    if (t < 64 && r0 + t < c) {
        float scale, shift;
        gn_plane_affine(n * c + r0 + t, mean_rstd, gamma, beta, c, groups, &scale, &shift);
        aff[t] = make_float2(scale, shift);
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < 8; ++k) {
        int i = ty + 8 * k;
        if (r0 + i < c && col < s) {
            float2 a = aff[i];
            float va = to_f(v[k].a) * a.x + a.y, vb = to_f(v[k].b) * a.x + a.y;
            if (silu) {
                va = silu_f(va);
                vb = silu_f(vb);
            }
            tile[i][2 * tx] = from_f<T>(va);
            tile[i][2 * tx + 1] = from_f<T>(vb);
        }
    }
    __syncthreads();
    for (int i = ty; i < 64; i += 8) {
        long cl = c0 + i, r = r0 + 2 * tx;
        if (r < c && cl < s) {
            Pair<T> p;
            p.a = tile[2 * tx][i];
            p.b = tile[2 * tx + 1][i];
            *(Pair<T>*)(d + cl * c + r) = p;
        }
    }
}

// ---- per-plane kernels with N elements per access (s % N == 0, aligned): the twins of
// plane_binary_impl and gn_apply_planes_impl, and of gn_sums_impl (group_len and chunk multiples
// of N; the f32 partial sums are grouped differently, the f64 totals agree to rounding) ----
template <typename T>
__device__ void plane_binary_vec_impl(const T* a, const T* v, T* y, long s, int op, long vmod) {
    constexpr int N = VecN<T>::N;
    long p = blockIdx.y;
    float w = to_f(v[p % vmod]);
    const T* ap = a + p * s;
    T* yp = y + p * s;
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < s / N; i += (long)blockDim.x * gridDim.x) {
        float f[N];
        vload(ap + i * N, f);
#pragma unroll
        for (int k = 0; k < N; ++k) f[k] = binary_op(f[k], w, op);
        vstore(yp + i * N, f);
    }
}
template <typename T>
__device__ void gn_apply_planes_vec_impl(const T* x, const float* mean_rstd, const T* gamma, const T* beta, T* y,
                                         int c, long s, int groups, int silu) {
    constexpr int N = VecN<T>::N;
    long p = blockIdx.y;
    float scale, shift;
    gn_plane_affine(p, mean_rstd, gamma, beta, c, groups, &scale, &shift);
    const T* xp = x + p * s;
    T* yp = y + p * s;
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < s / N; i += (long)blockDim.x * gridDim.x) {
        float f[N];
        vload(xp + i * N, f);
#pragma unroll
        for (int k = 0; k < N; ++k) {
            float v = f[k] * scale + shift;
            f[k] = silu ? silu_f(v) : v;
        }
        vstore(yp + i * N, f);
    }
}
template <typename T>
__device__ void gn_sums_vec_impl(const T* x, double* sums, long group_len, long chunk) {
    constexpr int N = VecN<T>::N;
    long bg = blockIdx.y;
    long start = (long)blockIdx.x * chunk;
    long end = min(start + chunk, group_len);
    const T* base = x + bg * group_len;
    float s = 0.0f, s2 = 0.0f;
    // Unrolled so that a thread of a multi-vector chunk (gn_chunk) has its loads in flight at once.
#pragma unroll 4
    for (long i = start / N + threadIdx.x; i < end / N; i += blockDim.x) {
        float f[N];
        vload(base + i * N, f);
#pragma unroll
        for (int k = 0; k < N; ++k) {
            s += f[k];
            s2 += f[k] * f[k];
        }
    }
    gn_sums_commit(s, s2, sums, bg);
}
#if PCPP_IN_PART(0)
extern "C" __global__ void copy2d_u128(const U4* s, U4* d, long rows, long cols, long sp, long dp) { pdl_begin();
    copy2d_impl<U4>(s, d, rows, cols, sp, dp);
}
#endif

// ---- non-finite watch: flag = min(flag, code) when any element is NaN or ±inf ----
// The flag is one non-negative f32; for non-negative floats the int order of the bit patterns is
// the float order, so an integer atomicMin keeps the smallest code.
template <typename T>
__device__ void nonfinite_mark_impl(const T* x, long n, int* flag, float code) {
    bool bad = false;
    GRID_STRIDE(i, n) bad |= !isfinite(to_f(x[i]));
    if (bad) atomicMin(flag, __float_as_int(code));
}
