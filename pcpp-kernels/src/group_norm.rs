//! Group normalisation (`Tensor::group_norm` and its parts): per-(batch, group) sums
//! ([`GroupStats`]), normalisation with given statistics, the device-side moments and the merge of
//! several bands' moments. Sums of disjoint row bands add up to the whole image's, which is what
//! patch-parallel group norm exchanges (PCPP §2.6, DistriFusion's corrected asynchronous GN).

use crate::cpu;
#[cfg(feature = "cuda")]
use crate::cpu::profile;
#[cfg(feature = "cuda")]
use crate::cuda;
#[cfg(feature = "cuda")]
use crate::ops::on_gpu;
use crate::ops::MAX_GN_BANDS;
use crate::{DType, KernelError, Result, Tensor};

/// Per-(batch, group) sums of a group norm's input: `Σx`, `Σx²` and the element count, in f64.
///
/// Sums of disjoint row bands add up to the sums of the whole image, which is what patch-parallel
/// group norm exchanges (PCPP §2.6; DistriFusion's corrected asynchronous GN).
#[derive(Debug, Clone, PartialEq)]
pub struct GroupStats {
    /// Batch size.
    pub batch: usize,
    /// Number of groups.
    pub groups: usize,
    /// `[batch·groups]` entries of `[Σx, Σx², n]`.
    pub sums: Vec<[f64; 3]>,
}

impl GroupStats {
    /// Element-wise sum of two statistics (disjoint bands of the same tensor).
    pub fn add(&self, other: &GroupStats) -> Result<GroupStats> {
        if self.batch != other.batch || self.groups != other.groups {
            return Err(KernelError::shape(
                "GroupStats::add",
                &[self.batch, self.groups],
                &[other.batch, other.groups],
            ));
        }
        let sums = self
            .sums
            .iter()
            .zip(&other.sums)
            .map(|(a, b)| [a[0] + b[0], a[1] + b[1], a[2] + b[2]])
            .collect();
        Ok(GroupStats {
            batch: self.batch,
            groups: self.groups,
            sums,
        })
    }

    /// `a + b − c` element-wise (the corrected asynchronous estimate: stale total plus own change).
    pub fn add_sub(&self, b: &GroupStats, c: &GroupStats) -> Result<GroupStats> {
        let t = self.add(b)?;
        let sums = t
            .sums
            .iter()
            .zip(&c.sums)
            .map(|(a, c)| [a[0] - c[0], a[1] - c[1], a[2] - c[2]])
            .collect();
        Ok(GroupStats { sums, ..t })
    }

    /// Biased mean and variance per (batch, group), as `torch.nn.GroupNorm` uses.
    pub fn mean_var(&self) -> Vec<(f64, f64)> {
        self.sums
            .iter()
            .map(|s| {
                let n = s[2].max(1.0);
                let mean = s[0] / n;
                (mean, s[1] / n - mean * mean)
            })
            .collect()
    }

    /// Flattened `[Σx, Σx², n, ...]` for transport.
    pub fn to_flat(&self) -> Vec<f64> {
        self.sums.iter().flatten().copied().collect()
    }

    /// Inverse of [`GroupStats::to_flat`].
    pub fn from_flat(batch: usize, groups: usize, flat: &[f64]) -> Result<GroupStats> {
        if flat.len() != batch * groups * 3 {
            return Err(KernelError::invalid(
                "GroupStats::from_flat",
                format!("expected {} values, got {}", batch * groups * 3, flat.len()),
            ));
        }
        Ok(GroupStats {
            batch,
            groups,
            sums: flat.chunks(3).map(|c| [c[0], c[1], c[2]]).collect(),
        })
    }
}

impl Tensor {
    pub(crate) fn nc_s(&self, op: &'static str, groups: usize) -> Result<(usize, usize, usize)> {
        if self.rank() < 2 {
            return Err(KernelError::invalid(
                op,
                format!("needs [b, c, ...], got {:?}", self.shape()),
            ));
        }
        let (b, c) = (self.shape()[0], self.shape()[1]);
        if groups == 0 || c % groups != 0 {
            return Err(KernelError::invalid(
                op,
                format!("{c} channels do not split into {groups} groups"),
            ));
        }
        Ok((b, c, self.numel() / (b * c).max(1)))
    }

    /// Sums for group normalisation of `[b, c, ...]` (see [`GroupStats`]).
    pub fn group_stats(&self, groups: usize) -> Result<GroupStats> {
        let (b, c, s) = self.nc_s("group_stats", groups)?;
        #[cfg(feature = "cuda")]
        if self.is_cuda() {
            let _timed = cuda::profile::scope(profile::Kernel::GroupNorm, self.device());
            return Ok(GroupStats {
                batch: b,
                groups,
                sums: cuda::group_sums(self, (b, c, s), groups)?,
            });
        }
        Ok(GroupStats {
            batch: b,
            groups,
            sums: cpu::group_sums(&self.as_f32()?, b, c, s, groups),
        })
    }

    /// Group normalisation with statistics computed elsewhere (e.g. over all bands), then the
    /// per-channel affine and an optional fused activation (only SiLU is fused today).
    pub fn group_norm_with_stats(
        &self,
        stats: &GroupStats,
        gamma: Option<&Tensor>,
        beta: Option<&Tensor>,
        eps: f64,
        silu_after: bool,
    ) -> Result<Tensor> {
        let (b, c, s) = self.nc_s("group_norm", stats.groups)?;
        if stats.batch != b {
            return Err(KernelError::invalid(
                "group_norm",
                format!("statistics for batch {} applied to batch {b}", stats.batch),
            ));
        }
        self.check_group_norm_affine("group_norm", c, gamma, beta)?;
        #[cfg(feature = "cuda")]
        if on_gpu("group_norm", &[Some(self), gamma, beta])? {
            let _timed = cuda::profile::scope(profile::Kernel::GroupNorm, self.device());
            return cuda::group_norm_with_stats(
                self,
                (b, c, s),
                stats,
                (gamma, beta),
                eps,
                silu_after,
            );
        }
        self.group_norm_apply_cpu(
            (b, c, s),
            stats.groups,
            &stats.mean_var(),
            (gamma, beta),
            eps,
            silu_after,
        )
    }

    /// Checks that the group-norm affine parameters are `[c]`.
    pub(crate) fn check_group_norm_affine(
        &self,
        op: &'static str,
        c: usize,
        gamma: Option<&Tensor>,
        beta: Option<&Tensor>,
    ) -> Result<()> {
        for (name, t) in [("weight", gamma), ("bias", beta)] {
            if let Some(t) = t {
                if t.shape() != [c] {
                    return Err(KernelError::Shape {
                        op,
                        lhs: self.shape().to_vec(),
                        rhs: t.shape().to_vec(),
                        detail: format!(" ({name} must be [{c}])"),
                    });
                }
            }
        }
        Ok(())
    }

    /// The CPU twin's group-norm apply step, shared by every group norm whose per-(batch, group)
    /// `(mean, var)` is known: `y = (x − mean)/√(var + eps)·gamma[c] + beta[c]`, optional SiLU.
    fn group_norm_apply_cpu(
        &self,
        dims: (usize, usize, usize),
        groups: usize,
        mean_var: &[(f64, f64)],
        (gamma, beta): (Option<&Tensor>, Option<&Tensor>),
        eps: f64,
        silu_after: bool,
    ) -> Result<Tensor> {
        let g = match gamma {
            Some(t) => Some(t.as_f32()?),
            None => None,
        };
        let bt = match beta {
            Some(t) => Some(t.as_f32()?),
            None => None,
        };
        let y = cpu::group_norm_apply(
            &self.as_f32()?,
            dims,
            groups,
            mean_var,
            g.as_deref(),
            bt.as_deref(),
            eps,
            silu_after,
        );
        self.like(self.shape(), y)
    }

    /// Per-(batch, group) mean and centred sum of squares of `[b, c, ...]` (the moments one band
    /// contributes to a patch-parallel group norm, see [`Tensor::group_norm_merged`]).
    ///
    /// # Shapes
    /// `self: [b, c, ...]` with `groups` dividing `c` → F32 `[b·groups, 2]` on `self`'s device, row
    /// `bi·groups + g` holding `(mean, m2)` with `m2 = Σ(x − mean)²` over the group's
    /// `c/groups·Π(...)` elements (both 0 for an empty group).
    ///
    /// Sums are accumulated in f64 and rounded to f32 at the end: `mean = Σx/n`,
    /// `m2 = max(Σx² − Σx·mean, 0)`. On a GPU nothing is copied between host and device, so the op
    /// can be captured into a CUDA graph.
    pub fn group_moments(&self, groups: usize) -> Result<Tensor> {
        let (b, c, s) = self.nc_s("group_moments", groups)?;
        #[cfg(feature = "cuda")]
        if self.is_cuda() {
            let _timed = cuda::profile::scope(profile::Kernel::GroupNorm, self.device());
            return cuda::group_moments(self, (b, c, s), groups);
        }
        let sums = cpu::group_sums(&self.as_f32()?, b, c, s, groups);
        Tensor::from_f32(&[b * groups, 2], cpu::group_moments(&sums), DType::F32)
    }

    /// Group norm of `[b, c, ...]` whose per-(batch, group) statistics are merged from the moments
    /// of `p` bands (patch parallelism, PCPP arXiv 2412.02962 §2.6), then the per-channel affine
    /// and an optional SiLU, exactly as [`Tensor::group_norm_with_stats`] given those statistics.
    ///
    /// # Arguments
    /// - `bands`: F32 `[p, b·groups, 2]`, band `j`'s `(mean, m2)` rows as made by
    ///   [`Tensor::group_moments`], bands in rank order, `1 ≤ p ≤ 64`.
    /// - `counts`: `p` element counts per (batch, group), `counts[j]` for band `j` (finite, ≥ 0).
    /// - `corrected`: `Some((own, fresh))` for corrected stale statistics: band `own` of `bands`
    ///   holds this rank's previous moments and `fresh` (F32 `[b·groups, 2]`) its current ones, both
    ///   of `counts[own]` elements.
    ///
    /// # Statistics
    /// The bands are folded in order into an empty accumulator with Chan et al.'s pairwise merge in
    /// f64 ([`cpu::Moments::merge`]); without correction `mean = total.mean` and
    /// `var = total.m2/total.n` (0 for no elements). With correction, with
    /// `E[x²](m) = m2/n + mean²`: `mean = total.mean + (fresh.mean − prev.mean)` and
    /// `var = E[x²](total) + (E[x²](fresh) − E[x²](prev)) − mean²`, replaced by `fresh`'s own
    /// variance where negative (see [`cpu::merge_group_moments`]).
    ///
    /// `bands` and `fresh` must be on `self`'s device (the op runs there; `gamma`/`beta` are moved
    /// there if needed). On a GPU the merge runs in one small kernel with the counts passed by value
    /// and nothing is copied between host and device, so the op can be captured into a CUDA graph.
    #[allow(clippy::too_many_arguments)]
    pub fn group_norm_merged(
        &self,
        groups: usize,
        bands: &Tensor,
        counts: &[f64],
        corrected: Option<(usize, &Tensor)>,
        gamma: Option<&Tensor>,
        beta: Option<&Tensor>,
        eps: f64,
        silu_after: bool,
    ) -> Result<Tensor> {
        const OP: &str = "group_norm_merged";
        let (b, c, s) = self.nc_s(OP, groups)?;
        let rows = b * groups;
        let p = counts.len();
        if p == 0 || p > MAX_GN_BANDS {
            return Err(KernelError::invalid(
                OP,
                format!("{p} bands given (counts); between 1 and {MAX_GN_BANDS} are supported"),
            ));
        }
        if let Some((j, n)) = counts
            .iter()
            .enumerate()
            .find(|(_, n)| !n.is_finite() || **n < 0.0)
        {
            return Err(KernelError::invalid(
                OP,
                format!("count {n} of band {j} is not a finite non-negative number"),
            ));
        }
        let check_moments = |name: &str, t: &Tensor, want: &[usize]| -> Result<()> {
            if t.shape() != want {
                return Err(KernelError::Shape {
                    op: OP,
                    lhs: self.shape().to_vec(),
                    rhs: t.shape().to_vec(),
                    detail: format!(
                        " ({name} must be {want:?}: (mean, m2) per {}(batch, group))",
                        if want.len() == 3 { "band and " } else { "" }
                    ),
                });
            }
            if t.dtype() != DType::F32 {
                return Err(KernelError::invalid(
                    OP,
                    format!("{name} must be f32, got {}", t.dtype()),
                ));
            }
            if t.device() != self.device() {
                return Err(KernelError::invalid(
                    OP,
                    format!(
                        "{name} is on {} but the input is on {}",
                        t.device(),
                        self.device()
                    ),
                ));
            }
            Ok(())
        };
        check_moments("bands", bands, &[p, rows, 2])?;
        if let Some((own, fresh)) = corrected {
            if own >= p {
                return Err(KernelError::invalid(
                    OP,
                    format!("own band {own} out of range for {p} band(s)"),
                ));
            }
            check_moments("fresh moments", fresh, &[rows, 2])?;
        }
        self.check_group_norm_affine(OP, c, gamma, beta)?;
        #[cfg(feature = "cuda")]
        if on_gpu(OP, &[Some(self), gamma, beta])? {
            let _timed = cuda::profile::scope(profile::Kernel::GroupNorm, self.device());
            return cuda::group_norm_merged(
                self,
                (b, c, s),
                groups,
                (bands, counts),
                corrected,
                (gamma, beta),
                eps,
                silu_after,
            );
        }
        let fresh = match corrected {
            Some((own, f)) => Some((own, f.as_f32()?)),
            None => None,
        };
        let mean_var = cpu::merge_group_moments(
            &bands.as_f32()?,
            counts,
            rows,
            fresh.as_ref().map(|(own, f)| (*own, &f[..])),
        );
        self.group_norm_apply_cpu((b, c, s), groups, &mean_var, (gamma, beta), eps, silu_after)
    }

    /// `torch.nn.GroupNorm` (biased variance), optionally followed by SiLU.
    pub fn group_norm(
        &self,
        groups: usize,
        gamma: Option<&Tensor>,
        beta: Option<&Tensor>,
        eps: f64,
        silu_after: bool,
    ) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if on_gpu("group_norm", &[Some(self), gamma, beta])? {
            let (b, c, s) = self.nc_s("group_norm", groups)?;
            for t in [gamma, beta].into_iter().flatten() {
                if t.shape() != [c] {
                    return Err(KernelError::shape("group_norm", self.shape(), t.shape()));
                }
            }
            let _timed = cuda::profile::scope(profile::Kernel::GroupNorm, self.device());
            return cuda::group_norm(self, (b, c, s), groups, (gamma, beta), eps, silu_after);
        }
        let stats = self.group_stats(groups)?;
        self.group_norm_with_stats(&stats, gamma, beta, eps, silu_after)
    }
}
