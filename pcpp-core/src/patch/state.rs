//! The exchange state of a layer across steps (PCPP §7.1–§7.4): a synchronous exchange that
//! also keeps what the next stale step reads, a stale exchange that posts this step's data and
//! returns the previous step's (or, with `--sync-mode none`, the frozen warm-up context), and on
//! the device path the persistent per-parity buffers those stores land in, so that a steady step
//! always reads and writes the same memory and can be captured as a CUDA graph.

use pcpp_kernels::{Device, Tensor};

use super::Shared;
use crate::cache::{Entry, Slot};
use crate::exchange::RecvSpec;
#[cfg(feature = "cuda")]
use crate::layers::LayerContext;
use crate::layers::{Result, StepCtx};
use crate::schedule::SyncMode;

impl Shared {
    /// Synchronous exchange; `keep` picks what a stale step that follows reads (received parts
    /// and a local part), which is stored in the slot (on the device path copied into the slot's
    /// persistent buffers, so that stale steps always read the same memory).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn sync_exchange(
        &self,
        id: &str,
        slot: &Slot,
        ctx: &StepCtx,
        sends: Vec<(usize, Tensor)>,
        recvs: Vec<RecvSpec>,
        device: Device,
        keep: impl FnOnce(&[Tensor]) -> Result<Option<(Vec<Tensor>, Option<Tensor>)>>,
    ) -> Result<Vec<Tensor>> {
        let got = self.exchange_now(id, slot.kind, slot.index, sends, recvs, device, false)?;
        if self.next_is_stale(ctx.step) {
            if let Some((recvd, local)) = keep(&got)? {
                let (recvd, local) = self.persist(id, slot, ctx.step, recvd, local, device)?;
                self.cache.publish(slot, ctx.step, || {
                    Ok(Entry::Ready {
                        step: ctx.step,
                        recvd,
                        local,
                    })
                })?;
            }
        }
        Ok(got)
    }

    /// On the device path, copies `recvd` and `local` into the slot's persistent buffers of
    /// `step`'s parity and returns those; on the host path returns them as they are.
    pub(crate) fn persist(
        &self,
        id: &str,
        slot: &Slot,
        step: usize,
        recvd: Vec<Tensor>,
        local: Option<Tensor>,
        device: Device,
    ) -> Result<(Vec<Tensor>, Option<Tensor>)> {
        if !self.on_device_path(device) {
            return Ok((recvd, local));
        }
        let specs = recvd.iter().map(|t| RecvSpec::of(0, t)).collect();
        let (bufs, local) = self.slot_buffers(id, slot, step, specs, local.as_ref(), device)?;
        for (src, dst) in recvd.iter().zip(&bufs) {
            device_copy(id, src, dst)?;
        }
        Ok((bufs, local))
    }

    /// The slot's persistent device buffers of `step`'s parity: one per receive of `specs`, and,
    /// when `local` is given, one more holding a copy of it.
    pub(crate) fn slot_buffers(
        &self,
        id: &str,
        slot: &Slot,
        step: usize,
        mut specs: Vec<RecvSpec>,
        local: Option<&Tensor>,
        device: Device,
    ) -> Result<(Vec<Tensor>, Option<Tensor>)> {
        specs.extend(local.map(|t| RecvSpec::of(0, t)));
        let mut bufs = slot.persistent(step, &specs, device)?;
        let kept = match local {
            Some(src) => {
                let dst = bufs.pop();
                if let Some(d) = &dst {
                    device_copy(id, src, d)?;
                }
                dst
            }
            None => None,
        };
        Ok((bufs, kept))
    }

    /// Posts this step's exchange for the next step, then returns what the previous step posted
    /// (waiting for it if it is still in flight), and the local part stored with it.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn stale_exchange(
        &self,
        id: &str,
        slot: &Slot,
        ctx: &StepCtx,
        sends: Vec<(usize, Tensor)>,
        recvs: Vec<RecvSpec>,
        local: Option<Tensor>,
        device: Device,
    ) -> Result<(Vec<Tensor>, Option<Tensor>)> {
        if self.cfg.sync_mode == SyncMode::None {
            // No exchange after the warm-up: the last warm-up step's context, frozen.
            return self
                .cache
                .read_frozen(slot, self.cfg.last_warmup_step(), ctx.step);
        }
        let (pending, local) = if self.on_device_path(device) {
            // Receives land in the persistent buffers of this step's parity.
            let (bufs, kept) =
                self.slot_buffers(id, slot, ctx.step, recvs.clone(), local.as_ref(), device)?;
            let p = self.post_tensors(
                id,
                slot.kind,
                slot.index,
                sends,
                recvs,
                device,
                false,
                Some(bufs),
            )?;
            (p, kept)
        } else {
            let p =
                self.post_tensors(id, slot.kind, slot.index, sends, recvs, device, false, None)?;
            (p, local)
        };
        self.cache.publish(slot, ctx.step, || {
            Ok(Entry::InFlight {
                step: ctx.step,
                pending,
                local,
            })
        })?;
        self.cache
            .read_previous(slot, ctx.step, self.grid.world_rank)
    }
}

/// Copies `src` into `dst` (same shape, dtype and GPU): the device path's stores into persistent
/// buffers. Never reached without the `cuda` feature (there is no device path then).
fn device_copy(id: &str, src: &Tensor, dst: &Tensor) -> Result<()> {
    #[cfg(feature = "cuda")]
    return pcpp_kernels::cuda::copy_into(src, dst).at(id);
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (src, dst);
        Err(crate::layers::CoreError::Config(format!(
            "layer `{id}`: device copies need the `cuda` feature"
        )))
    }
}
