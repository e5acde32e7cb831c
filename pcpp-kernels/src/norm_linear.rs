//! A transformer block's layer norms fused into the GEMMs around them: `Tensor::linear_add_stats`
//! (a residual sum as the output projection's accumulator, and the partial row statistics of
//! the sum from the GEMM's epilogue) and `Tensor::norm_linear` / `Tensor::norm_linear_geglu` (the
//! layer norm of that sum applied as the next GEMM loads it, its statistics merged from the
//! partials). On the GPU's small-row kernels ([`crate::cuda::small_gemm`]: a PCPP band's few
//! hundred tokens, paper §3) the layer-norm pass between the two GEMMs goes away. Everywhere else
//! each op is exactly its composition (`linear_add`; `layer_norm`, then `linear` or
//! `linear_geglu`), so the CPU twins are the compositions and do not read the statistics.

use crate::{KernelError, Result, Tensor};

/// The layer norm of a fused op: optional affine parameters `[d]` and epsilon.
#[derive(Debug, Clone, Copy)]
pub struct LayerNormArgs<'a> {
    pub gamma: Option<&'a Tensor>,
    pub beta: Option<&'a Tensor>,
    pub eps: f64,
}

/// Row statistics that a GEMM's epilogue left for the layer norm of its output
/// ([`Tensor::linear_add_stats`]), or none (the norm then computes its own).
#[derive(Debug, Clone, Default)]
pub struct RowStats {
    /// The output they describe and its partial statistics (`[rows, ceil(d/64), 2]` f32).
    partials: Option<(Tensor, Tensor)>,
}

impl RowStats {
    /// No statistics: a norm reading these computes its own.
    pub fn none() -> RowStats {
        RowStats::default()
    }

    /// Whether the epilogue left statistics.
    pub fn is_some(&self) -> bool {
        self.partials.is_some()
    }

    /// The partials, if they describe `x`.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn of(&self, x: &Tensor) -> Option<&Tensor> {
        self.partials
            .as_ref()
            .filter(|(src, _)| src.same_as(x))
            .map(|(_, p)| p)
    }
}

impl Tensor {
    /// Whether [`Tensor::linear_add_stats`] of `self` through `n` outputs leaves statistics that
    /// [`Tensor::norm_linear`] uses (the GPU's small-row kernels apply); always true on the CPU,
    /// where the fused ops are their compositions and cost nothing extra.
    pub fn fused_norms_apply(&self, n: usize) -> bool {
        #[cfg(feature = "cuda")]
        if self.is_cuda() {
            return crate::cuda::norm_linears_apply(self, n);
        }
        let _ = n;
        true
    }

    /// `acc + self · wᵀ + bias` ([`Tensor::linear_add`]), and the row statistics of the result
    /// where the GPU's small-row kernels computed it.
    ///
    /// # Shapes
    /// `self: [..., k]`, `w: [n, k]`, `bias: [n]`, `acc: [..., n]` → `[..., n]`.
    pub fn linear_add_stats(
        &self,
        w: &Tensor,
        bias: Option<&Tensor>,
        acc: &Tensor,
    ) -> Result<(Tensor, RowStats)> {
        if let Some(r) = self.stats_gemm(w, bias, Some(acc))? {
            return Ok(r);
        }
        Ok((self.linear_add(w, bias, acc)?, RowStats::none()))
    }

    /// `self · wᵀ + bias` ([`Tensor::linear`]), and the row statistics of the result where the
    /// GPU's small-row kernels computed it.
    ///
    /// # Shapes
    /// `self: [..., k]`, `w: [n, k]`, `bias: [n]` → `[..., n]`.
    pub fn linear_stats(&self, w: &Tensor, bias: Option<&Tensor>) -> Result<(Tensor, RowStats)> {
        if let Some(r) = self.stats_gemm(w, bias, None)? {
            return Ok(r);
        }
        Ok((self.linear(w, bias)?, RowStats::none()))
    }

    /// The small-row GEMM with statistics, where it applies (GPU operands of matching shapes).
    fn stats_gemm(
        &self,
        w: &Tensor,
        bias: Option<&Tensor>,
        acc: Option<&Tensor>,
    ) -> Result<Option<(Tensor, RowStats)>> {
        #[cfg(feature = "cuda")]
        if crate::ops::on_gpu("linear_add_stats", &[Some(self), Some(w), bias, acc])? {
            let k = *self.shape().last().unwrap_or(&0);
            let mut shape = self.shape().to_vec();
            *shape.last_mut().unwrap_or(&mut 0) = w.shape().first().copied().unwrap_or(0);
            if w.rank() == 2
                && w.shape()[1] == k
                && bias.map_or(true, |b| b.shape() == [w.shape()[0]])
                && acc.map_or(true, |a| a.shape() == shape.as_slice())
            {
                let _timed =
                    crate::cuda::profile::scope(crate::cpu::profile::Kernel::Linear, self.device());
                if let Some((y, p)) = crate::cuda::linear_add_stats(self, w, bias, acc, &shape)? {
                    let partials = Some((y.clone(), p));
                    return Ok(Some((y, RowStats { partials })));
                }
            }
        }
        let _ = (w, bias, acc);
        Ok(None)
    }

    /// `layer_norm(self) · wᵀ + bias`, the norm's statistics from `stats` where they describe
    /// `self` (on the GPU's small-row kernels, one GEMM with the norm applied as it loads `self`).
    ///
    /// # Shapes
    /// `self: [..., k]`, `gamma, beta: [k]`, `w: [n, k]`, `bias: [n]` → `[..., n]`.
    pub fn norm_linear(
        &self,
        norm: LayerNormArgs<'_>,
        stats: &RowStats,
        w: &Tensor,
        bias: Option<&Tensor>,
    ) -> Result<Tensor> {
        self.norm_linear_impl(norm, stats, w, bias, false)
    }

    /// `linear_geglu(layer_norm(self))`: [`Tensor::norm_linear`] with diffusers' GEGLU after it.
    ///
    /// # Shapes
    /// `self: [..., k]`, `gamma, beta: [k]`, `w: [2n, k]`, `bias: [2n]` → `[..., n]`.
    pub fn norm_linear_geglu(
        &self,
        norm: LayerNormArgs<'_>,
        stats: &RowStats,
        w: &Tensor,
        bias: Option<&Tensor>,
    ) -> Result<Tensor> {
        self.norm_linear_impl(norm, stats, w, bias, true)
    }

    fn norm_linear_impl(
        &self,
        norm: LayerNormArgs<'_>,
        stats: &RowStats,
        w: &Tensor,
        bias: Option<&Tensor>,
        geglu: bool,
    ) -> Result<Tensor> {
        let k = *self.shape().last().unwrap_or(&0);
        let op = if geglu {
            "norm_linear_geglu"
        } else {
            "norm_linear"
        };
        if w.rank() != 2 || w.shape()[1] != k || (geglu && w.shape()[0] % 2 != 0) {
            return Err(KernelError::shape(op, self.shape(), w.shape()));
        }
        #[cfg(feature = "cuda")]
        if let Some(p) = stats.of(self) {
            let on = crate::ops::on_gpu(op, &[Some(self), Some(w), bias, norm.gamma, norm.beta])?;
            let n = w.shape()[0] / if geglu { 2 } else { 1 };
            let fits = [norm.gamma, norm.beta]
                .iter()
                .flatten()
                .all(|t| t.shape() == [k])
                && bias.map_or(true, |b| b.shape() == [w.shape()[0]]);
            if on && fits {
                let mut shape = self.shape().to_vec();
                *shape.last_mut().unwrap_or(&mut 0) = n;
                let _timed =
                    crate::cuda::profile::scope(crate::cpu::profile::Kernel::Linear, self.device());
                let affine = (norm.gamma, norm.beta, norm.eps);
                if let Some(y) = crate::cuda::norm_linear(self, p, affine, w, bias, geglu, &shape)?
                {
                    return Ok(y);
                }
            }
        }
        let _ = stats;
        let h = self.layer_norm(norm.gamma, norm.beta, norm.eps)?;
        if geglu {
            h.linear_geglu(w, bias)
        } else {
            h.linear(w, bias)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{LayerNormArgs, RowStats};
    use crate::Tensor;

    fn t(shape: &[usize], seed: u64) -> Tensor {
        Tensor::rand_uniform(
            shape,
            crate::DType::F32,
            crate::Device::Cpu,
            (-1.0, 1.0),
            seed,
        )
        .unwrap()
    }

    /// On the CPU every fused op is its composition, bit for bit, whatever statistics it gets.
    #[test]
    fn fused_norm_ops_are_their_compositions_on_the_cpu() {
        let (x, w, b, acc) = (
            t(&[2, 5, 16], 1),
            t(&[8, 16], 2),
            t(&[8], 3),
            t(&[2, 5, 8], 4),
        );
        let (g, beta) = (t(&[8], 5), t(&[8], 6));
        assert!(x.fused_norms_apply(8));
        let (s, stats) = x.linear_add_stats(&w, Some(&b), &acc).unwrap();
        assert!(!stats.is_some());
        let want = x.linear(&w, Some(&b)).unwrap().add(&acc).unwrap();
        assert_eq!(s.to_vec_f32().unwrap(), want.to_vec_f32().unwrap());
        let norm = LayerNormArgs {
            gamma: Some(&g),
            beta: Some(&beta),
            eps: 1e-5,
        };
        let (w2, b2) = (t(&[6, 8], 7), t(&[6], 8));
        let h = s.layer_norm(Some(&g), Some(&beta), 1e-5).unwrap();
        for st in [&stats, &RowStats::none()] {
            let got = s.norm_linear(norm, st, &w2, Some(&b2)).unwrap();
            let want = h.linear(&w2, Some(&b2)).unwrap();
            assert_eq!(got.to_vec_f32().unwrap(), want.to_vec_f32().unwrap());
            let got = s.norm_linear_geglu(norm, st, &w2, None).unwrap();
            let want = h.linear_geglu(&w2, None).unwrap();
            assert_eq!(got.shape(), &[2, 5, 3]);
            assert_eq!(got.to_vec_f32().unwrap(), want.to_vec_f32().unwrap());
        }
        // A weight of the wrong inner size, an odd GEGLU projection, a wrong affine length.
        assert!(s.norm_linear(norm, &stats, &w, None).is_err());
        assert!(s
            .norm_linear_geglu(norm, &stats, &t(&[5, 8], 9), None)
            .is_err());
        let short = LayerNormArgs {
            gamma: Some(&b2),
            ..norm
        };
        assert!(s.norm_linear(short, &stats, &w2, None).is_err());
    }
}
