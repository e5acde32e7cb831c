//! Patch parallelism (PCPP §1–§4 with the fixes of §7): a [`LayerFactory`] whose layers
//! work on one horizontal band of rows per rank, and the [`StepDriver`] that tells them which
//! steps are synchronous.
//!
//! - input convolution: whole latent in, own band out, no communication (§2.2);
//! - `k×k` convolutions: halo rows point-to-point from the bands that hold them (normally the two
//!   neighbours), zero rows at the image border; fresh in synchronous steps, the previous step's
//!   rows afterwards (§2.2, §7.3); `1×1` convolutions are local;
//! - group norm: f32 statistics (mean and centred sum of squares per group), merged with element
//!   counts so uneven bands are exact, biased variance; modes sync / stale / corrected / separate
//!   (§2.6, §7.10);
//! - self-attention: own K/V fresh; in stale steps only the partial-conditioning window of the
//!   other bands is sent and used, one step old (§2.4, §7.2, §7.5); synchronous steps attend over
//!   all bands' fresh K/V (exact);
//! - output gather: every rank gets every band, CFG branches stacked `[uncond; cond]` (§1.4);
//! - inputs `2^up` times finer than the level-0 grid (a conditioning image at pixel resolution):
//!   the input layer and `k×k` convolutions cut them into the same bands, rows times `2^up`.
//!
//! With [`ParallelMode::Tensor`] it builds the tensor-parallel layers of [`crate::tensor`] instead.
//!
//! Stale data of step `t` is posted right after it is produced and waited for only when the same
//! layer needs it at step `t + 1` (§7.4), through the double-buffered [`StaleCache`] (§7.1).
//! Bytes are counted per kind when an exchange is posted.
//!
//! Activations may live on a GPU. Layers exchange tensors through [`crate::exchange`]: with a
//! transport that moves device memory (NCCL) the data stays on the GPU, is sent from and received
//! into device buffers on a communication stream, and stale receives land in persistent
//! per-parity buffers of the slot, so a steady step can be captured as a CUDA graph; otherwise it
//! is staged through host memory (MPI, UCX, local).

//!
//! Layout: `runtime.rs` (the runtime and its step driver), `factory.rs` (which layer each mode
//! builds), `shared.rs` (what the layers share: transports, topology, counters), `state.rs` (the
//! exchange state across steps: sync / stale / persist), `window.rs` (the device path's
//! persistent K/V windows of the self-attention), and one file per parallel layer.

mod attention;
mod factory;
mod gather;
mod group_norm;
mod halo_conv;
mod input_conv;
mod locator;
mod runtime;
mod shared;
mod state;
mod window;

pub(crate) use gather::stitch_bands;
pub use runtime::PatchRuntime;
pub(crate) use shared::{Shared, GATHER_TAG};
pub(crate) use window::nhwc_rows;
pub use window::{device_windows, set_device_windows};

use crate::layers::{CoreError, Result};
use pcpp_kernels::Tensor;

/// The `[b, c, rows, w]` dimensions of a band, or an error naming layer `id`.
pub(crate) fn dims4(id: &str, x: &Tensor) -> Result<(usize, usize, usize, usize)> {
    match x.shape() {
        &[b, c, h, w] => Ok((b, c, h, w)),
        s => Err(CoreError::Config(format!(
            "layer `{id}`: expected a [b, c, rows, w] band, got {s:?}"
        ))),
    }
}
