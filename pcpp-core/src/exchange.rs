//! How the patch-parallel layers move tensors between ranks (PCPP §7.4: posted as soon as the data
//! exists, waited for only where it is used).
//!
//! Two data paths, chosen per run from where the activations live and what the transport can do:
//!
//! - **host**: tensors are copied to host bytes, sent through [`Transport::exchange`] and turned
//!   back into tensors on the activations' device when waited for. Every back-end supports it
//!   (local threads, MPI, UCX, NCCL through their host exchanges), and it is the only path for
//!   CPU activations;
//! - **device** (feature `cuda`, CUDA activations and a transport with
//!   [`Transport::device_p2p`]: NCCL, and MPI / UCX unless `--device-comm host`, whose exchanges
//!   become host functions of the communication stream, CUDA-aware or staged through pinned
//!   buffers, see `pcpp_comm::device`): sends read the activations' device memory and receives
//!   land in device buffers, enqueued on the GPU's communication stream after an event fork from
//!   the compute stream. Nothing blocks the host, and the compute stream never waits for host
//!   staging (NCCL and CUDA-aware MPI / UCX stage nothing; the staged path copies through pinned
//!   buffers on the communication stream). A
//!   synchronous exchange joins the communication stream back at once; a stale one is joined at
//!   the next synchronous exchange (at the latest the output gather that ends every step), so it
//!   overlaps the rest of the step. Tensors that a send reads are held until that join, because
//!   freeing them would let the compute stream reuse memory the communication stream still reads.
//!   All of it is legal inside CUDA-graph capture, which is how a steady step becomes one graph.

use pcpp_comm::{CommKind, Pending, Transport};
use pcpp_kernels::{DType, Device, Tensor};

use crate::layers::{CoreError, Result};

/// A tensor to receive: the peer it comes from, its shape and dtype (on the activations' device).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RecvSpec {
    pub peer: usize,
    pub shape: Vec<usize>,
    pub dtype: DType,
}

impl RecvSpec {
    /// A receive of `t`'s shape and dtype from `peer`.
    pub fn of(peer: usize, t: &Tensor) -> RecvSpec {
        RecvSpec {
            peer,
            shape: t.shape().to_vec(),
            dtype: t.dtype(),
        }
    }

    pub fn bytes(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.size()
    }
}

/// One device-path message: bytes `bytes` of `tensor`'s storage, to or from `peer` (a whole
/// tensor, or rows of a persistent window).
#[derive(Clone)]
pub(crate) struct Part {
    pub peer: usize,
    pub tensor: Tensor,
    pub bytes: std::ops::Range<usize>,
}

impl Part {
    /// All of `t`.
    #[cfg(feature = "cuda")]
    pub fn whole(peer: usize, t: Tensor) -> Part {
        let n = t.size_in_bytes();
        Part {
            peer,
            tensor: t,
            bytes: 0..n,
        }
    }
}

/// An exchange in flight; waiting yields the received tensors in the order of the receives.
pub(crate) enum Inflight {
    /// Host bytes still on the wire.
    Host {
        pending: Pending,
        specs: Vec<RecvSpec>,
        device: Device,
    },
    /// Received tensors whose data is complete (host path) or ordered before any later use on the
    /// compute stream (device path, once the communication stream is joined).
    Done(Vec<Tensor>),
}

impl Inflight {
    /// Whether waiting would return without blocking the host.
    pub fn is_complete(&self) -> bool {
        match self {
            Inflight::Host { pending, .. } => pending.is_complete(),
            Inflight::Done(_) => true,
        }
    }

    /// The received tensors. `err` turns a transport error into the layer's error.
    pub fn wait(self, err: impl Fn(String) -> CoreError) -> Result<Vec<Tensor>> {
        match self {
            Inflight::Done(t) => Ok(t),
            Inflight::Host {
                pending,
                specs,
                device,
            } => {
                let got = pending.wait().map_err(|e| err(e.to_string()))?;
                if got.len() != specs.len() {
                    return Err(err(format!(
                        "{} buffers received, {} expected",
                        got.len(),
                        specs.len()
                    )));
                }
                specs
                    .iter()
                    .zip(&got)
                    .map(|(s, b)| {
                        Tensor::from_bytes(&s.shape, s.dtype, b)
                            .and_then(|t| t.to_device(device))
                            .map_err(|e| err(e.to_string()))
                    })
                    .collect()
            }
        }
    }
}

/// Posts `sends` and `recvs` on `t` through host memory.
pub(crate) fn post_host(
    t: &dyn Transport,
    kind: CommKind,
    tag: u32,
    sends: &[(usize, Tensor)],
    recvs: Vec<RecvSpec>,
    device: Device,
    err: impl Fn(String) -> CoreError,
) -> Result<Inflight> {
    let bytes = sends
        .iter()
        .map(|(p, x)| Ok((*p, x.to_bytes().map_err(|e| err(e.to_string()))?)))
        .collect::<Result<Vec<_>>>()?;
    let lens = recvs.iter().map(|r| (r.peer, r.bytes())).collect();
    let pending = t
        .exchange(kind, tag, bytes, lens)
        .map_err(|e| err(e.to_string()))?;
    Ok(Inflight::Host {
        pending,
        specs: recvs,
        device,
    })
}

/// The device path (feature `cuda`).
#[cfg(feature = "cuda")]
pub(crate) mod device {
    use std::sync::Mutex;

    use pcpp_comm::{CommKind, DeviceMsg, DeviceP2p};
    use pcpp_kernels::cuda::gpu;
    use pcpp_kernels::Tensor;

    use super::Part;

    use crate::layers::{CoreError, Result};

    /// Communication-stream state of one rank: whether work is enqueued but not yet joined, and
    /// the tensors its sends read.
    #[derive(Default)]
    pub(crate) struct CommState {
        /// Whether work is enqueued and not joined, and the tensors the sends read.
        open: Mutex<(bool, Vec<Tensor>)>,
    }

    impl CommState {
        /// Enqueues `sends` and receives into `recvs` (byte ranges of device tensors of
        /// `ordinal`) on the communication stream, after everything enqueued so far on the
        /// compute stream.
        pub fn enqueue(
            &self,
            dp: &dyn DeviceP2p,
            ordinal: usize,
            kind: CommKind,
            sends: Vec<Part>,
            recvs: &[Part],
            err: impl Fn(String) -> CoreError,
        ) -> Result<()> {
            let e = |x: pcpp_kernels::KernelError| err(x.to_string());
            let g = gpu(ordinal).map_err(e)?;
            let msg = |p: &Part| -> Result<DeviceMsg> {
                if p.bytes.end > p.tensor.size_in_bytes() || p.bytes.start > p.bytes.end {
                    return Err(err(format!(
                        "message bytes {:?} of a {}-byte tensor (peer {})",
                        p.bytes,
                        p.tensor.size_in_bytes(),
                        p.peer
                    )));
                }
                Ok(DeviceMsg {
                    peer: p.peer,
                    ptr: p.tensor.cuda_ptr().map_err(e)? + p.bytes.start as u64,
                    len: p.bytes.len(),
                })
            };
            let s = sends.iter().map(msg).collect::<Result<Vec<_>>>()?;
            let r = recvs.iter().map(msg).collect::<Result<Vec<_>>>()?;
            g.fork_to_comm().map_err(e)?;
            // SAFETY: every pointer is the storage of a live device tensor of `ordinal` with
            // `size_in_bytes` bytes: the sends are held in `open` and the receive buffers by the
            // caller until `join` makes the compute stream wait for this work; nothing else
            // writes the receive buffers before that (they are only read after the join).
            unsafe { dp.enqueue(kind, &s, &r, g.comm_stream_raw()) }
                .map_err(|x| err(x.to_string()))?;
            let mut open = self
                .open
                .lock()
                .map_err(|_| err("communication state poisoned".into()))?;
            open.0 = true;
            open.1.extend(sends.into_iter().map(|p| p.tensor));
            Ok(())
        }

        /// Makes the compute stream of `ordinal` wait for everything enqueued on the
        /// communication stream, then releases the held send tensors (their memory is freed in
        /// compute-stream order, after the sends). A no-op when nothing is enqueued.
        pub fn join(&self, ordinal: usize, err: impl Fn(String) -> CoreError) -> Result<()> {
            let mut open = self
                .open
                .lock()
                .map_err(|_| err("communication state poisoned".into()))?;
            if !open.0 {
                return Ok(());
            }
            gpu(ordinal)
                .and_then(|g| g.join_comm())
                .map_err(|x| err(x.to_string()))?;
            *open = (false, Vec::new());
            Ok(())
        }
    }
}
