//! Gathering the bands of an image to one rank (for example the finished picture to the rank that
//! writes it): every other rank sends its band to `root`, which stitches the bands together in
//! band order. Unlike the output gather of a denoising step (an all-gather: every rank needs the
//! whole latent for the next step), only `root` receives, so each band crosses the network once.
//! The bytes count as `gather` in the runtime's report, and `plan` has them as
//! [`crate::LayerKind::GatherTo`].

use pcpp_comm::CommKind;
use pcpp_kernels::Tensor;

use crate::exchange::RecvSpec;
use crate::layers::{CoreError, Result};
use crate::patch::{stitch_bands, PatchRuntime, GATHER_TAG};
use crate::schedule::{ParallelMode, SplitScheme};

/// Layer id of the gather in errors.
const ID: &str = "gather to root";

impl PatchRuntime {
    /// Gathers every rank's band `x` to world rank `root`: `Some(image)` there, `None` on every
    /// other rank. Collective over the world (every rank calls it with the same `root`). With
    /// CFG groups, the groups' images are stacked on the batch axis `[group 0; group 1]`, as in
    /// the output gather. With one rank, serial mode, or tensor parallelism without CFG groups,
    /// `x` already is the whole image and nothing moves.
    ///
    /// # Shapes
    /// `x: [b, c, rows, w]`, this rank's band at any level of the band plan →
    /// `[b·groups, c, h, w]` on `root`.
    pub fn gather_to(&self, root: usize, x: &Tensor) -> Result<Option<Tensor>> {
        let sh = &self.sh;
        let n = sh.topo.grids.len();
        let me = sh.grid.world_rank;
        if root >= n {
            return Err(CoreError::Config(format!(
                "{ID}: root rank {root} is outside a world of {n}"
            )));
        }
        let whole = sh.topo.serial || sh.cfg.mode == ParallelMode::Tensor;
        if whole && sh.grid.groups == 1 {
            return Ok((me == root).then(|| x.clone()));
        }
        if whole
            || (sh.cfg.mode == ParallelMode::NaivePatch && sh.cfg.split_scheme != SplitScheme::Rows)
        {
            return Err(CoreError::Config(format!(
                "{ID}: only bands of rows can be gathered (mode {}, split scheme {}, {} CFG groups)",
                sh.cfg.mode, sh.cfg.split_scheme, sh.grid.groups
            )));
        }
        let (b, c, rows, w) = match x.shape() {
            &[b, c, rows, w] => (b, c, rows, w),
            s => {
                return Err(CoreError::Config(format!(
                    "{ID}: expected a [b, c, rows, w] band, got {s:?}"
                )))
            }
        };
        let level = sh.level(ID, rows, w)?;
        let rows_of = |r: usize| {
            let g = &sh.topo.grids[r];
            sh.topo.plans[g.group].band(level, g.patch()).len()
        };
        let others: Vec<usize> = (0..n).filter(|&r| r != root).collect();
        let (sends, recvs) = if me == root {
            let recvs = others
                .iter()
                .map(|&r| RecvSpec {
                    peer: r,
                    shape: vec![b, c, rows_of(r), w],
                    dtype: x.dtype(),
                })
                .collect();
            (Vec::new(), recvs)
        } else {
            (vec![(root, x.clone())], Vec::new())
        };
        let got = sh.exchange_now(
            ID,
            CommKind::Gather,
            GATHER_TAG,
            sends,
            recvs,
            x.device(),
            true,
        )?;
        if me != root {
            return Ok(None);
        }
        stitch_bands(sh, ID, me, x, got, 2).map(Some)
    }
}
