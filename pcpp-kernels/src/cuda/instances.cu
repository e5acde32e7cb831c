// pcpp CUDA kernels, part of KERNEL_SOURCE (the files cuda/mod.rs lists, concatenated in that
// order: each part may use what the earlier ones define):
// the extern "C" instances of the templates: the names the host launches.

// ---- extern "C" instances ----
#define INST_CAST(SN, S, DN, D) \
    extern "C" __global__ void cast_##SN##_##DN(const S* x, D* y, long n) { pdl_begin(); cast_impl<S, D>(x, y, n); }
#if PCPP_IN_PART(0)
INST_CAST(f32, float, f16, f16_t)
INST_CAST(f32, float, bf16, bf16_t)
INST_CAST(f16, f16_t, f32, float)
INST_CAST(bf16, bf16_t, f32, float)
INST_CAST(f16, f16_t, bf16, bf16_t)
INST_CAST(bf16, bf16_t, f16, f16_t)
#endif

#define INST_TYPED(N, T)                                                                                     \
    extern "C" __global__ void unary_##N(const T* x, T* y, long n, int op, float a, float b) { pdl_begin(); \
        unary_impl<T>(x, y, n, op, a, b);                                                                    \
    }                                                                                                        \
    extern "C" __global__ void binary_##N(const T* a, const T* b, T* y, long n, int op, Bcast bc) { pdl_begin(); \
        binary_impl<T>(a, b, y, n, op, bc);                                                                  \
    }                                                                                                        \
    extern "C" __global__ void binary_same_##N(const T* a, const T* b, T* y, long n, int op) { pdl_begin(); \
        binary_same_impl<T>(a, b, y, n, op);                                                                 \
    }                                                                                                        \
    extern "C" __global__ void geglu_##N(const T* x, T* y, long rows, long h) { pdl_begin(); geglu_impl<T>(x, y, rows, h); } \
    extern "C" __global__ void rotate_pairs_##N(const T* x, const float* c, const float* s, T* y, long rows, \
                                                long len, long pairs, long half) { pdl_begin();              \
        rotate_pairs_impl<T>(x, c, s, y, rows, len, pairs, half);                                            \
    }                                                                                                        \
    extern "C" __global__ void geglu_vec_##N(const T* x, T* y, long rows, long h) { pdl_begin();             \
        geglu_vec_impl<T>(x, y, rows, h);                                                                    \
    }                                                                                                        \
    extern "C" __global__ void binary_same_vec_##N(const T* a, const T* b, T* y, long nv, int op) { pdl_begin(); \
        binary_same_vec_impl<T>(a, b, y, nv, op);                                                            \
    }                                                                                                        \
    extern "C" __global__ void unary_vec_##N(const T* x, T* y, long nv, int op, float a, float b) { pdl_begin(); \
        unary_vec_impl<T>(x, y, nv, op, a, b);                                                               \
    }                                                                                                        \
    extern "C" __global__ void rowb_binary_##N(const T* f, const T* g, T* y, long rows, long rpp, long cols, \
                                               int op, int bleft, int vec) { pdl_begin();                    \
        rowb_binary_impl<T>(f, g, y, rows, rpp, cols, op, bleft, vec);                                       \
    }                                                                                                        \
    extern "C" __global__ void row_norm_warp_##N(const T* x, const T* g, const T* b, T* y, long rows, long d, \
                                                 float eps, int mean_too, int vec, const T* ms, const T* mt, \
                                                 long rpp) { pdl_begin();                                    \
        row_norm_warp_impl<T>(x, g, b, y, rows, d, eps, mean_too, vec, ms, mt, rpp);                         \
    }                                                                                                        \
    extern "C" __global__ void add_row_norm_warp_##N(const T* a, const T* r, T* s, const T* g, const T* b, T* y, \
                                                     long rows, long d, float eps, int vec) { pdl_begin();   \
        add_row_norm_warp_impl<T>(a, r, s, g, b, y, rows, d, eps, vec);                                      \
    }                                                                                                        \
    extern "C" __global__ void gated_add_##N(const T* x, const T* g, const T* y, T* o, long rows, long rpp,  \
                                             long cols, int vec) { pdl_begin();                              \
        gated_add_impl<T>(x, g, y, o, rows, rpp, cols, vec);                                                 \
    }                                                                                                        \
    extern "C" __global__ void gn_sums_##N(const T* x, double* sums, long group_len, long chunk) { pdl_begin(); \
        gn_sums_impl<T>(x, sums, group_len, chunk);                                                          \
    }                                                                                                        \
    extern "C" __global__ void gn_apply_##N(const T* x, const float* mr, const T* g, const T* bt, T* y,      \
                                            long c, long s, long groups, int silu, long n) { pdl_begin();    \
        gn_apply_impl<T>(x, mr, g, bt, y, c, s, groups, silu, n);                                            \
    }                                                                                                        \
    extern "C" __global__ void plane_binary_##N(const T* a, const T* v, T* y, long s, int op, long vmod) { pdl_begin(); \
        plane_binary_impl<T>(a, v, y, s, op, vmod);                                                          \
    }                                                                                                        \
    extern "C" __global__ void gn_apply_planes_##N(const T* x, const float* mr, const T* g, const T* bt, T* y, \
                                                   int c, long s, int groups, int silu) { pdl_begin();       \
        gn_apply_planes_impl<T>(x, mr, g, bt, y, c, s, groups, silu);                                        \
    }                                                                                                        \
    extern "C" __global__ void plane_binary_vec_##N(const T* a, const T* v, T* y, long s, int op, long vmod) { pdl_begin(); \
        plane_binary_vec_impl<T>(a, v, y, s, op, vmod);                                                      \
    }                                                                                                        \
    extern "C" __global__ void gn_apply_planes_vec_##N(const T* x, const float* mr, const T* g, const T* bt,  \
                                                       T* y, int c, long s, int groups, int silu) { pdl_begin(); \
        gn_apply_planes_vec_impl<T>(x, mr, g, bt, y, c, s, groups, silu);                                    \
    }                                                                                                        \
    extern "C" __global__ void gn_sums_vec_##N(const T* x, double* sums, long group_len, long chunk) { pdl_begin(); \
        gn_sums_vec_impl<T>(x, sums, group_len, chunk);                                                      \
    }                                                                                                        \
    extern "C" __global__ void transpose_pairs_##N(const T* s, T* d, long rows, long cols, const T* bias,    \
                                                   const T* plane, const T* res) { pdl_begin();              \
        transpose_pairs_impl<T>(s, d, rows, cols, bias, plane, res);                                         \
    }                                                                                                        \
    extern "C" __global__ void gn_apply_nhwc_##N(const T* x, const float* mr, const T* g, const T* bt, T* y,    \
                                                 int c, long s, int groups, int silu, long ybs) { pdl_begin(); \
        gn_apply_nhwc_impl<T>(x, mr, g, bt, y, c, s, groups, silu, ybs);                                     \
    }                                                                                                        \
    extern "C" __global__ void row_norm_reg2_##N(const T* a, const T* a2, T* s, const T* g, const T* b, T* y, \
                                                 long rows, long d, float eps) { pdl_begin();                \
        row_norm_reg_impl<T, 2>(a, a2, s, g, b, y, rows, d, eps);                                            \
    }                                                                                                        \
    extern "C" __global__ void row_norm_reg3_##N(const T* a, const T* a2, T* s, const T* g, const T* b, T* y, \
                                                 long rows, long d, float eps) { pdl_begin();                \
        row_norm_reg_impl<T, 3>(a, a2, s, g, b, y, rows, d, eps);                                            \
    }                                                                                                        \
    extern "C" __global__ void row_norm_reg5_##N(const T* a, const T* a2, T* s, const T* g, const T* b, T* y, \
                                                 long rows, long d, float eps) { pdl_begin();                \
        row_norm_reg_impl<T, 5>(a, a2, s, g, b, y, rows, d, eps);                                            \
    }                                                                                                        \
    extern "C" __global__ void row_norm_reg12_##N(const T* a, const T* a2, T* s, const T* g, const T* b,      \
                                                  T* y, long rows, long d, float eps) { pdl_begin();         \
        row_norm_reg_impl<T, 12>(a, a2, s, g, b, y, rows, d, eps);                                           \
    }                                                                                                        \
    extern "C" __global__ void layer_norm_##N(const T* x, const T* g, const T* b, T* y, long d, float eps) { pdl_begin(); \
        layer_norm_impl<T>(x, g, b, y, d, eps);                                                              \
    }                                                                                                        \
    extern "C" __global__ void rms_norm_##N(const T* x, const T* g, T* y, long d, float eps) { pdl_begin();  \
        rms_norm_impl<T>(x, g, y, d, eps);                                                                   \
    }                                                                                                        \
    extern "C" __global__ void softmax_##N(const float* s, T* p, long cols, int causal, long q0, long rph) { pdl_begin(); \
        softmax_impl<T>(s, p, cols, causal, q0, rph);                                                        \
    }                                                                                                        \
    extern "C" __global__ void upsample2x_##N(const T* x, T* y, long n, long h, long w) { pdl_begin();      \
        upsample2x_impl<T>(x, y, n, h, w);                                                                   \
    }                                                                                                        \
    extern "C" __global__ void bias_nchw_##N(T* y, const T* bias, long c, long s, long n) { pdl_begin();    \
        bias_nchw_impl<T>(y, bias, c, s, n);                                                                 \
    }                                                                                                        \
    extern "C" __global__ void timestep_emb_##N(const T* t, T* y, long b, long dim, int flip, float shift) { pdl_begin(); \
        timestep_emb_impl<T>(t, y, b, dim, flip, shift);                                                     \
    }                                                                                                        \
    extern "C" __global__ void fill_uniform_##N(T* y, long n, unsigned long long seed, float lo, float hi) { pdl_begin(); \
        fill_uniform_impl<T>(y, n, seed, lo, hi);                                                            \
    }                                                                                                        \
    extern "C" __global__ void nonfinite_mark_##N(const T* x, long n, int* flag, float code) { pdl_begin(); \
        nonfinite_mark_impl<T>(x, n, flag, code);                                                            \
    }
// One part per element type (the f16 and bf16 forms are the larger).
#if PCPP_IN_PART(0)
INST_TYPED(f32, float)
#endif
#if PCPP_IN_PART(8)
INST_TYPED(f16, f16_t)
#endif
#if PCPP_IN_PART(9)
INST_TYPED(bf16, bf16_t)
#endif

#define INST_WORD(N, W)                                                                                       \
    extern "C" __global__ void copy2d_##N(const W* s, W* d, long rows, long cols, long sp, long dp) { pdl_begin(); \
        copy2d_impl<W>(s, d, rows, cols, sp, dp);                                                             \
    }                                                                                                         \
    extern "C" __global__ void permute_##N(const W* s, W* d, long n, Perm p) { pdl_begin(); permute_impl<W>(s, d, n, p); } \
    extern "C" __global__ void pad2d_##N(const W* s, W* d, long n, long h, long w, long pt, long pl, long ho, \
                                         long wo) { pdl_begin();                                              \
        pad2d_impl<W>(s, d, n, h, w, pt, pl, ho, wo);                                                         \
    }                                                                                                         \
    extern "C" __global__ void gather_rows_##N(const unsigned* ids, const W* t, W* y, long n, long d) { pdl_begin(); \
        gather_rows_impl<W>(ids, t, y, n, d);                                                                 \
    }                                                                                                         \
    extern "C" __global__ void transpose_##N(const W* s, W* d, long rows, long cols) { pdl_begin();          \
        transpose_impl<W>(s, d, rows, cols);                                                                  \
    }
#if PCPP_IN_PART(0)
INST_WORD(u16, unsigned short)
INST_WORD(u32, unsigned int)
#endif
