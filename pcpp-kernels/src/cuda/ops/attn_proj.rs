//! A band's small attention grids with the query projection (and the layer norm before it)
//! inside the attention kernel (`flash_small64p4`, `flash_attn.cu`'s `q_project`): at a band's
//! 256 rows the projection GEMM and the norm cost about their launches, not their work, and one
//! kernel replaces three. The transformer blocks' attentions of PCPP §2.3 (self-attention over the
//! stale window) and the text cross-attention, on the small-grid kernel that [`super::small_grid`]
//! chooses.

use std::sync::atomic::{AtomicBool, Ordering};

use cudarc::driver::LaunchConfig;

use super::{flash128, gpu_of, out, ptr, small_grid, small_split_bytes, tname, Gpu};
use crate::{Cols, DType, Result, Tensor};

static FUSED_Q: AtomicBool = AtomicBool::new(true);

/// Whether a band's small attention grids project their queries (and layer-norm them) inside the
/// attention kernel (on unless [`set_fused_q`] turned it off).
pub fn fused_q() -> bool {
    FUSED_Q.load(Ordering::Relaxed)
}

/// Projects a small grid's queries inside the attention kernel (`on`), or as their own layer norm
/// and GEMM before it, for this process. The same values up to the projection's accumulation
/// order.
pub fn set_fused_q(on: bool) {
    FUSED_Q.store(on, Ordering::Relaxed);
}

/// Dynamic shared memory of the kernel: four groups' K/V stages, then 64 (mean, rstd) pairs.
pub(crate) const fn small_proj_bytes() -> u32 {
    small_split_bytes(4) + 64 * 2 * 4
}

/// The widest rows the kernel layer-norms (each lane holds five 16-byte vectors of a row).
const NORM_MAX_CIN: usize = 1280;

/// The layer norm before a projection: `gamma`, optional `beta`, `eps`.
pub(crate) type NormParts<'a> = (&'a Tensor, Option<&'a Tensor>, f64);

/// [`crate::Tensor::attention_norm_q`] on the small-grid kernel with the projection inside:
/// `attention(norm(x) · wqᵀ, k, v)` heads merged, `x: [b, lq, cin]`, `wq: [width, cin]`; `None`
/// where that kernel does not take it (the caller composes the ops): [`fused_q`] off, f32, a
/// head size other than 64, `cin` not a multiple of 64 (or over 1 280 with the norm), operands of other dtypes, rows or
/// columns not 16-byte aligned, or not a small grid of the chosen attention kernel
/// ([`super::small_grid`]) on a device that gave the kernel its shared memory. The caller
/// checked devices and shapes.
pub(crate) fn attention_projected_q(
    x: &Tensor,
    norm: Option<NormParts<'_>>,
    wq: &Tensor,
    (k, v): (Cols, Cols),
    width: usize,
    heads: usize,
) -> Result<Option<Tensor>> {
    let dt = x.dtype();
    let (b, lq, cin) = (x.shape()[0], x.shape()[1], x.shape()[2]);
    let lk = k.t.shape()[1];
    let same = |t: &Tensor| t.dtype() == dt;
    let norm_ok = norm.map_or(true, |(g, b, _)| same(g) && b.map_or(true, same));
    if !fused_q()
        || dt == DType::F32
        || heads == 0
        || width != heads * 64
        || cin % 64 != 0
        || (norm.is_some() && cin > NORM_MAX_CIN)
        || !same(wq)
        || !same(k.t)
        || !same(v.t)
        || !norm_ok
        || b * lq == 0
    {
        return Ok(None);
    }
    let aligned = [Some(x), Some(wq), norm.map(|n| n.0), norm.and_then(|n| n.1)]
        .into_iter()
        .flatten()
        .map(ptr)
        .collect::<Result<Vec<_>>>()?
        .iter()
        .all(|p| p % 16 == 0);
    if !aligned {
        return Ok(None);
    }
    let gpu = gpu_of(x)?;
    let choice = flash128();
    if !gpu.flash_ws
        || !gpu.small_proj
        || choice.warpspec_form().is_none()
        || !small_grid(choice, (b, lq, lk, heads, 64), gpu.sms)
    {
        return Ok(None);
    }
    let lanes = 16 / dt.size();
    let blocks = [k, v].map(|c| (c.t, c.start, c.t.shape()[2]));
    if blocks
        .iter()
        .any(|&(_, start, n)| start % lanes != 0 || n % lanes != 0)
    {
        return Ok(None);
    }
    let [kp, vp] = blocks.map(|(t, start, _)| ptr(t).map(|p| p + (start * dt.size()) as u64));
    let [sk, sv] = blocks.map(|(_, _, n)| n as i64);
    let (gamma, beta, eps) = match norm {
        Some((g, b, eps)) => (ptr(g)?, b.map(ptr).transpose()?.unwrap_or(0), eps as f32),
        None => (0, 0, 0.0),
    };
    let y = out(&gpu, &[b, lq, width], dt)?;
    let cfg = LaunchConfig {
        grid_dim: (lq.div_ceil(64) as u32, heads as u32, b as u32),
        block_dim: (512, 1, 1),
        shared_mem_bytes: small_proj_bytes(),
    };
    let scale_log2 = std::f32::consts::LOG2_E / 8.0;
    launch!(gpu, format!("flash_small64p4_{}", tname(dt)), cfg;
        ptr(x)?, ptr(wq)?, gamma, beta, kp?, vp?, ptr(&y)?, lq as i32, lk as i32, heads as i32,
        cin as i32, cin as i64, sk, sv, eps, scale_log2);
    Ok(Some(y))
}
