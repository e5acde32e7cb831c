//! The device path's persistent K/V windows of the patch-parallel self-attention (PCPP §2.3,
//! §7.1, §7.4). A band's window at one level is one `[b, L, 2c]` buffer per step parity:
//! the other bands' parts within `portion` of the border above and below, its own K/V between
//! them. In a stale step `t` the band's own K/V is projected straight into its rows of the window
//! of parity `t − 1` (whose other rows received the previous step's parts), sent from there, and
//! the next step's parts are received straight into the rows of the window of parity `t`; the
//! attention then reads the window of `t − 1` in place. No concatenation and no send copies, so a
//! steady step launches only the GEMM and the attention. A synchronous step stores the parts it
//! keeps into its parity's window. The host path concatenates (see [`super::attention`]).
//!
//! The same windows serve the group norm (a table of every band's moments, the peers' received
//! into their rows) and the `k×k` convolutions whose filters take channels-last input: the band's
//! rows transposed into an NHWC window between the halo rows received there and the image
//! border's zero rows, the halos sent from it, and the convolution reading it in place.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};

use pcpp_kernels::{DType, Device, LayerNormArgs, RowStats, Tensor};

use super::Shared;
use crate::cache::{Entry, Slot};
use crate::exchange::{Inflight, Part, RecvSpec};
use crate::layers::{CoreError, LayerContext, Result, StackedProjection, StepCtx};
use crate::plan::kv_recvs;
use crate::schedule::SyncMode;

static WINDOWS: AtomicBool = AtomicBool::new(true);

/// Whether the device path keeps its windows (the self-attention's K/V, the group norm's
/// statistics, the channels-last convolutions' halos) in place (on unless
/// [`set_device_windows`] turned it off; off, it concatenates and copies as the host path does:
/// the same values).
pub fn device_windows() -> bool {
    WINDOWS.load(Ordering::Relaxed)
}

/// Turns the device path's in-place windows on or off for this process (for comparison
/// runs; set before the runtime's first step).
pub fn set_device_windows(on: bool) {
    WINDOWS.store(on, Ordering::Relaxed);
}

/// The error of a device-window write in a build without the `cuda` feature (never reached:
/// there is no device path then).
#[cfg(not(feature = "cuda"))]
fn needs_cuda(id: &str) -> CoreError {
    CoreError::Config(format!(
        "layer `{id}`: device windows need the `cuda` feature"
    ))
}

/// The band's own K/V `[b, l, 2c]`: computed already, or a stacked projection of `x` that the
/// device path writes straight into the window.
pub(super) enum OwnKv<'a> {
    Ready(&'a Tensor),
    Project(&'a Tensor, &'a StackedProjection),
    /// The projection of `layer_norm(x)`, the norm applied inside the GEMM where its
    /// statistics describe `x` ([`Tensor::norm_linear`]).
    ProjectNormed(
        &'a Tensor,
        &'a StackedProjection,
        LayerNormArgs<'a>,
        &'a RowStats,
    ),
}

impl OwnKv<'_> {
    /// `[b, l, 2c]` and the dtype of the K/V.
    pub(super) fn dims(&self, id: &str) -> Result<([usize; 3], DType)> {
        let (shape, n, dt) = match self {
            OwnKv::Ready(t) => (t.shape(), None, t.dtype()),
            OwnKv::Project(x, p) | OwnKv::ProjectNormed(x, p, ..) => {
                (x.shape(), p.w.shape().first().copied(), x.dtype())
            }
        };
        match (shape, n) {
            (&[b, l, c2], None) => Ok(([b, l, c2], dt)),
            (&[b, l, _], Some(c2)) => Ok(([b, l, c2], dt)),
            (s, _) => Err(CoreError::Config(format!(
                "layer `{id}`: expected tokens [b, l, c], got {s:?}"
            ))),
        }
    }

    /// The device the K/V is computed on.
    pub(super) fn device(&self) -> Device {
        match self {
            OwnKv::Ready(t) | OwnKv::Project(t, _) | OwnKv::ProjectNormed(t, ..) => t.device(),
        }
    }

    /// The K/V as a tensor of its own.
    pub(super) fn tensor(&self, id: &str) -> Result<Tensor> {
        match self {
            OwnKv::Ready(t) => Ok((*t).clone()),
            OwnKv::Project(x, p) => p.forward(x).at(id),
            OwnKv::ProjectNormed(x, p, norm, stats) => {
                x.norm_linear(*norm, stats, &p.w, p.bias.as_ref()).at(id)
            }
        }
    }

    /// Writes the K/V into rows `row0 ..` of `win` (device tensors only).
    pub(super) fn write_rows(&self, id: &str, win: &Tensor, row0: usize) -> Result<()> {
        #[cfg(feature = "cuda")]
        return match self {
            OwnKv::Ready(t) => pcpp_kernels::cuda::copy_rows_into(t, win, row0),
            OwnKv::Project(x, p) => {
                pcpp_kernels::cuda::linear_rows_into(x, &p.w, p.bias.as_ref(), win, row0)
            }
            OwnKv::ProjectNormed(x, p, norm, stats) => pcpp_kernels::cuda::norm_linear_rows_into(
                x,
                *norm,
                stats,
                (&p.w, p.bias.as_ref()),
                win,
                row0,
            ),
        }
        .at(id);
        #[cfg(not(feature = "cuda"))]
        {
            let _ = (win, row0);
            Err(needs_cuda(id))
        }
    }
}

/// Rows of a band's window at one level: each other band's part `(peer, rows)` top to bottom,
/// and the band's own rows.
pub(super) struct Layout {
    pub parts: Vec<(usize, Range<usize>)>,
    pub own: Range<usize>,
    pub rows: usize,
}

impl Layout {
    /// The window of band `me` with `tokens` per band at `portion`.
    pub(super) fn new(tokens: &[usize], me: usize, portion: f64) -> Layout {
        let mut parts = Vec::new();
        let mut row = 0;
        let mut own = 0..0;
        let want = kv_recvs(tokens, me, portion);
        for (j, r) in want.iter().filter(|(j, _)| *j < me) {
            parts.push((*j, row..row + r.len()));
            row += r.len();
        }
        own.start = row;
        row += tokens[me];
        own.end = row;
        for (j, r) in want.iter().filter(|(j, _)| *j > me) {
            parts.push((*j, row..row + r.len()));
            row += r.len();
        }
        Layout {
            parts,
            own,
            rows: row,
        }
    }
}

/// One message per batch entry: rows `rows` of every entry of `win: [b, L, …]`.
pub(super) fn row_parts(peer: usize, win: &Tensor, rows: &Range<usize>) -> Vec<Part> {
    let s = win.shape();
    let row = s[2..].iter().product::<usize>();
    let (b, big, row_bytes) = (s[0], s[1], row * win.dtype().size());
    (0..b)
        .map(|i| Part {
            peer,
            tensor: win.clone(),
            bytes: (i * big + rows.start) * row_bytes..(i * big + rows.end) * row_bytes,
        })
        .collect()
}

/// Copies `src: [b, n, c]` into rows `row0 ..` of every batch entry of `dst: [b, L, c]` (device
/// tensors only).
pub(super) fn copy_rows(id: &str, src: &Tensor, dst: &Tensor, row0: usize) -> Result<()> {
    OwnKv::Ready(src).write_rows(id, dst, row0)
}

/// Writes `src: [b, c, n, w]` channels-last into rows `row0 ..` of every batch entry of
/// `dst: [b, L, w, c]` (device tensors only).
pub(crate) fn nhwc_rows(id: &str, src: &Tensor, dst: &Tensor, row0: usize) -> Result<()> {
    #[cfg(feature = "cuda")]
    return pcpp_kernels::cuda::nchw_rows_into_nhwc(src, dst, row0).at(id);
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (src, dst, row0);
        Err(needs_cuda(id))
    }
}

/// The table a group norm merges, its element counts, this band's index, where its fresh
/// moments go (this band's row of that tensor) and whether the statistics are corrected.
pub(super) type StatsTable<'a> = (&'a Tensor, &'a [f64], usize, &'a Tensor, bool);

/// Where a group norm's output goes: a new NCHW image, a new channels-last `[b, h, w, c]`
/// tensor, or rows `row0 ..` of every image of a channels-last window `[b, L, w, c]` (a
/// convolution's halo window).
#[derive(Clone, Copy)]
pub(super) enum NormOut<'a> {
    Nchw,
    Nhwc,
    Into(&'a Tensor, usize),
}

impl NormOut<'_> {
    /// `y` (an NCHW image) delivered as asked: itself, permuted, or transposed into the window
    /// (then `None`).
    pub(super) fn deliver(self, id: &str, y: Tensor) -> Result<Option<Tensor>> {
        match self {
            NormOut::Nchw => Ok(Some(y)),
            NormOut::Nhwc => y.permute(&[0, 2, 3, 1]).map(Some).at(id),
            NormOut::Into(dst, row0) => nhwc_rows(id, &y, dst, row0).map(|()| None),
        }
    }
}

/// The group norm of `x` on a statistics window (device tensors only): its fresh moments stored
/// in its row of the fresh table in the launch that merges them with the table's bands, the
/// output written as `out` asks (`None` when into a window).
pub(super) fn merged_into(
    id: &str,
    x: &Tensor,
    groups: usize,
    (bands, counts, own, fresh, corrected): StatsTable<'_>,
    (gamma, beta): (Option<&Tensor>, Option<&Tensor>),
    (eps, silu): (f64, bool),
    out: NormOut<'_>,
) -> Result<Option<Tensor>> {
    #[cfg(feature = "cuda")]
    {
        use pcpp_kernels::cuda;
        let win = cuda::StatsWindow {
            bands,
            counts,
            own,
            fresh,
            fresh_row: own,
            corrected,
        };
        let ab = (gamma, beta);
        match out {
            NormOut::Nchw => cuda::group_norm_merged_into(x, groups, win, ab, eps, silu).map(Some),
            NormOut::Nhwc => cuda::group_norm_merged_nhwc(x, groups, win, ab, eps, silu).map(Some),
            NormOut::Into(dst, row0) => {
                cuda::group_norm_merged_into_nhwc(x, groups, win, ab, eps, silu, (dst, row0))
                    .map(|()| None)
            }
        }
        .at(id)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (
            x, groups, bands, counts, own, fresh, corrected, gamma, beta, eps, silu, out,
        );
        Err(needs_cuda(id))
    }
}

impl Shared {
    /// The window a stale step reads: what the previous step received into its parity's window
    /// (with `--sync-mode none`, the window frozen at the last warm-up step), checked against
    /// `spec`.
    pub(super) fn read_window(
        &self,
        id: &str,
        slot: &Slot,
        ctx: &StepCtx,
        spec: &RecvSpec,
    ) -> Result<Tensor> {
        let (prev, _) = if self.cfg.sync_mode == SyncMode::None {
            self.cache
                .read_frozen(slot, self.cfg.last_warmup_step(), ctx.step)?
        } else {
            self.cache
                .read_previous(slot, ctx.step, self.grid.world_rank)?
        };
        match prev.as_slice() {
            [w] if w.shape() == spec.shape.as_slice() && w.dtype() == spec.dtype => Ok(w.clone()),
            got => Err(CoreError::Config(format!(
                "layer `{id}`: the stored window is {:?}, this step needs {:?} {}",
                got.iter().map(|t| t.shape().to_vec()).collect::<Vec<_>>(),
                spec.shape,
                spec.dtype
            ))),
        }
    }

    /// Posts a stale step's messages: `sends`, and one receive per `(peer, rows)` into those
    /// rows of this step's window (one message per batch entry); publishes that window for the
    /// next step and returns it.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn post_window(
        &self,
        id: &str,
        slot: &Slot,
        ctx: &StepCtx,
        sends: Vec<Part>,
        recv_rows: &[(usize, Range<usize>)],
        spec: &RecvSpec,
        dev: Device,
    ) -> Result<Tensor> {
        let cur = self.window_buffer(slot, ctx.step, spec, dev)?;
        let recvs = recv_rows
            .iter()
            .flat_map(|(j, rows)| row_parts(*j, &cur, rows))
            .collect();
        self.post_parts(id, slot.kind, sends, recvs, dev)?;
        let win = cur.clone();
        self.cache.publish(slot, ctx.step, || {
            Ok(Entry::InFlight {
                step: ctx.step,
                pending: Inflight::Done(vec![win]),
                local: None,
            })
        })?;
        Ok(cur)
    }

    /// After a synchronous step, when the next step is stale: writes each `(part, first row)`
    /// into this step's window with `write` ([`copy_rows`] or [`nhwc_rows`]) and publishes it
    /// for the next step.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn keep_window(
        &self,
        id: &str,
        slot: &Slot,
        ctx: &StepCtx,
        parts: &[(Tensor, usize)],
        write: fn(&str, &Tensor, &Tensor, usize) -> Result<()>,
        spec: &RecvSpec,
        dev: Device,
    ) -> Result<()> {
        if !self.next_is_stale(ctx.step) {
            return Ok(());
        }
        let win = self.window_buffer(slot, ctx.step, spec, dev)?;
        for (part, row0) in parts {
            write(id, part, &win, *row0)?;
        }
        self.cache.publish(slot, ctx.step, || {
            Ok(Entry::Ready {
                step: ctx.step,
                recvd: vec![win],
                local: None,
            })
        })
    }

    /// The slot's persistent window of `step`'s parity.
    pub(super) fn window_buffer(
        &self,
        slot: &Slot,
        step: usize,
        spec: &RecvSpec,
        dev: Device,
    ) -> Result<Tensor> {
        slot.persistent(step, std::slice::from_ref(spec), dev)?
            .pop()
            .ok_or_else(|| CoreError::Config(format!("layer `{}`: no window buffer", slot.id)))
    }
}

#[cfg(test)]
mod tests {
    use super::Layout;
    use crate::plan::kv_recvs;

    /// The window's parts are the receives of [`kv_recvs`] in band order around the own rows,
    /// back to back, as the host path's concatenation lays them out.
    #[test]
    fn layout_is_the_concatenation_order() {
        let tokens = [120, 96, 96, 72];
        for me in 0..tokens.len() {
            for portion in [0.0, 0.3, 1.0, 3.0] {
                let lay = Layout::new(&tokens, me, portion);
                let want = kv_recvs(&tokens, me, portion);
                let mut row = 0;
                let mut parts = lay.parts.iter();
                for (j, r) in want.iter().filter(|(j, _)| *j < me) {
                    assert_eq!(parts.next(), Some(&(*j, row..row + r.len())), "me={me}");
                    row += r.len();
                }
                assert_eq!(lay.own, row..row + tokens[me], "me={me} portion={portion}");
                row += tokens[me];
                for (j, r) in want.iter().filter(|(j, _)| *j > me) {
                    assert_eq!(parts.next(), Some(&(*j, row..row + r.len())), "me={me}");
                    row += r.len();
                }
                assert_eq!(parts.next(), None);
                assert_eq!(lay.rows, row);
                if portion == 3.0 {
                    // Every band is within three bands of every other.
                    assert_eq!(lay.rows, tokens.iter().sum::<usize>());
                }
            }
        }
    }
}
