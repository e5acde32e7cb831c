//! Pure geometry of patch parallelism (PCPP §1.2, §2.2, §2.4): row bands per resolution level, the
//! rows a convolution needs from other bands (halos), and the partial-conditioning window of
//! self-attention.
//!
//! Bands are cut at the coarsest level (as evenly as possible; uneven bands allowed) and scaled by
//! 2 per finer level, so stride-2 convolutions line up exactly. A band is therefore identified by
//! its row count at any level, which lets a layer find its level from its input alone.

use std::ops::Range;

use crate::layers::{CoreError, Result};

/// Row bands of one image over `n` ranks at every resolution level.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BandPlan {
    /// Latent height and width (level 0).
    pub height: usize,
    pub width: usize,
    /// Number of halvings between level 0 and the coarsest level.
    pub levels: usize,
    /// Row ranges at the coarsest level, one per rank.
    coarse: Vec<Range<usize>>,
}

impl BandPlan {
    /// Cuts a `height × width` latent whose model halves it `levels` times into `n` bands.
    pub fn new(height: usize, width: usize, levels: usize, n: usize) -> Result<BandPlan> {
        let f = 1usize << levels;
        if n == 0 {
            return Err(CoreError::Config("no ranks to split the image over".into()));
        }
        if height == 0 || width == 0 || height % f != 0 || width % f != 0 {
            return Err(CoreError::Config(format!(
                "latent {height}×{width} must be a non-zero multiple of {f} in both directions"
            )));
        }
        let rows = height / f;
        if rows < n {
            return Err(CoreError::Config(format!(
                "a latent of height {height} has {rows} rows at its coarsest level, so at most {rows} ranks can share one image (asked for {n}): a band would be empty"
            )));
        }
        let mut coarse = Vec::with_capacity(n);
        let mut start = 0;
        for i in 0..n {
            let r = rows / n + usize::from(i < rows % n);
            coarse.push(start..start + r);
            start += r;
        }
        Ok(BandPlan {
            height,
            width,
            levels,
            coarse,
        })
    }

    /// Number of bands.
    pub fn ranks(&self) -> usize {
        self.coarse.len()
    }

    /// Global rows of band `i` at `level` (0 = finest).
    pub fn band(&self, level: usize, i: usize) -> Range<usize> {
        let s = 1 << (self.levels - level.min(self.levels));
        self.coarse[i].start * s..self.coarse[i].end * s
    }

    /// Image height at `level`.
    pub fn height_at(&self, level: usize) -> usize {
        self.height >> level
    }

    /// Image width at `level`.
    pub fn width_at(&self, level: usize) -> usize {
        self.width >> level
    }

    /// The level at which band `i` has `rows` rows, if any.
    pub fn level_of(&self, i: usize, rows: usize) -> Option<usize> {
        (0..=self.levels).find(|&l| self.band(l, i).len() == rows)
    }
}

/// What one rank exchanges for a convolution with a given kernel, stride and padding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HaloPlan {
    /// Rows to receive: `(peer, rows)` in top-to-bottom order; peers above come before own rows.
    pub recv_above: Vec<(usize, usize)>,
    /// Rows to receive from peers below, top to bottom.
    pub recv_below: Vec<(usize, usize)>,
    /// Own rows to send: `(peer, local row range)`.
    pub send: Vec<(usize, Range<usize>)>,
    /// Zero rows above and below (image borders).
    pub pad_top: usize,
    pub pad_bottom: usize,
}

/// Input rows that band `i` needs for a convolution (kernel `k`, stride `s`, padding `p`), clamped to
/// the image, plus the zero rows outside it.
fn conv_need(
    plan: &BandPlan,
    level: usize,
    i: usize,
    k: usize,
    s: usize,
    p: usize,
) -> (Range<usize>, usize, usize) {
    let band = plan.band(level, i);
    let h = plan.height_at(level);
    let (o0, o1) = (band.start / s, band.end / s);
    let lo = (o0 * s) as isize - p as isize;
    let hi = ((o1 - 1) * s + k) as isize - p as isize;
    let pad_top = (-lo).max(0) as usize;
    let pad_bottom = (hi - h as isize).max(0) as usize;
    (
        lo.max(0) as usize..(hi as usize).min(h),
        pad_top,
        pad_bottom,
    )
}

fn overlap(a: &Range<usize>, b: &Range<usize>) -> Range<usize> {
    a.start.max(b.start)..a.end.min(b.end).max(a.start.max(b.start))
}

impl HaloPlan {
    /// The exchange of band `me` at `level` for a `k×k` convolution with stride `s` and padding `p`.
    pub fn new(plan: &BandPlan, level: usize, me: usize, k: usize, s: usize, p: usize) -> HaloPlan {
        let own = plan.band(level, me);
        let (need, pad_top, pad_bottom) = conv_need(plan, level, me, k, s, p);
        let mut recv_above = Vec::new();
        let mut recv_below = Vec::new();
        let mut send = Vec::new();
        for j in 0..plan.ranks() {
            if j == me {
                continue;
            }
            let bj = plan.band(level, j);
            let got = overlap(&need, &bj);
            if !got.is_empty() {
                if j < me {
                    recv_above.push((j, got.len()));
                } else {
                    recv_below.push((j, got.len()));
                }
            }
            let (need_j, _, _) = conv_need(plan, level, j, k, s, p);
            let give = overlap(&need_j, &own);
            if !give.is_empty() {
                send.push((j, give.start - own.start..give.end - own.start));
            }
        }
        HaloPlan {
            recv_above,
            recv_below,
            send,
            pad_top,
            pad_bottom,
        }
    }
}

/// Tokens of band `me` that fall in band `j`'s attention window at `portion` (PCPP §2.4): the window
/// of `j` reaches `portion` of the neighbouring band's tokens on each side (the upper part rounded
/// up, the lower part down, as the reference), and past it into further bands when `portion > 1`.
/// Returns a range of `me`'s local token indices.
pub fn window_part(tokens: &[usize], j: usize, me: usize, portion: f64) -> Range<usize> {
    if j == me {
        return 0..tokens[me];
    }
    let dist = j.abs_diff(me) as f64;
    // Fraction of `me`'s band that `j` reaches into: the part of `portion` left after the bands in
    // between, capped at the whole band.
    let frac = (portion - (dist - 1.0)).clamp(0.0, 1.0);
    let l = tokens[me];
    let exact = frac * l as f64;
    if me < j {
        // `me` is above `j`: `j` takes `me`'s last tokens, rounded up.
        let u = (exact - 1e-9).ceil().max(0.0) as usize;
        l - u.min(l)..l
    } else {
        let d = (exact + 1e-9).floor() as usize;
        0..d.min(l)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bands_scale_by_level_and_can_be_uneven() {
        let p = BandPlan::new(40, 8, 2, 3).unwrap();
        assert_eq!(
            (0..3).map(|i| p.band(2, i)).collect::<Vec<_>>(),
            [0..4, 4..7, 7..10]
        );
        assert_eq!(p.band(0, 1), 16..28);
        assert_eq!(p.level_of(1, 12), Some(0));
        assert_eq!(p.level_of(1, 3), Some(2));
        assert!(BandPlan::new(16, 8, 2, 5).is_err());
    }

    #[test]
    fn halo_plan_three_by_three_and_stride_two() {
        let p = BandPlan::new(16, 8, 1, 2).unwrap();
        let h0 = HaloPlan::new(&p, 0, 0, 3, 1, 1);
        assert_eq!((h0.pad_top, h0.pad_bottom), (1, 0));
        assert_eq!(h0.recv_below, vec![(1, 1)]);
        assert_eq!(h0.send, vec![(1, 7..8)]);
        // Stride 2 on even bands needs only the row above.
        let d1 = HaloPlan::new(&p, 0, 1, 3, 2, 1);
        assert_eq!(d1.recv_above, vec![(0, 1)]);
        assert!(d1.recv_below.is_empty());
        let d0 = HaloPlan::new(&p, 0, 0, 3, 2, 1);
        assert!(d0.recv_below.is_empty());
        assert_eq!(d0.send, vec![(1, 7..8)]);
    }

    #[test]
    fn windows_match_reference_arithmetic() {
        // 1024², n = 4, L1: l = 1024, p = 0.3 → rank 1 takes 308 tokens of rank 0, 307 of rank 2.
        let t = vec![1024; 4];
        assert_eq!(window_part(&t, 1, 0, 0.3), 716..1024);
        assert_eq!(window_part(&t, 1, 2, 0.3), 0..307);
        assert_eq!(window_part(&t, 1, 3, 0.3), 0..0);
        // portion ≥ n − 1 is full context.
        assert_eq!(window_part(&t, 0, 3, 3.0), 0..1024);
        assert_eq!(window_part(&t, 3, 0, 3.0), 0..1024);
        assert_eq!(window_part(&t, 0, 2, 1.5), 0..512);
    }
}
