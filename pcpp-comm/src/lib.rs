//! `pcpp-comm`: the communication layer of the PCPP / DistriFusion
//! patch-parallel diffusion engine.
//!
//! Every rank (GPU) denoises one spatial patch of the latent; layers exchange
//! halos, group-norm statistics and attention keys / values asynchronously
//! through a [`Transport`]. This crate defines that trait, the nonblocking
//! [`Pending`] handle, per-[`CommKind`] traffic statistics, transport-agnostic
//! [`collectives`], the in-process [`LocalTransport`], the [`SoloTransport`]
//! (one rank of a world whose other ranks do not exist, to measure one rank's
//! work), a [`conformance`] suite every back-end must pass, behind the `mpi`
//! and `ucx` features the MPI and UCX back-ends, behind `nccl` the NCCL
//! back-end (one GPU per rank), the TCP [`rendezvous`] and the [`launch`] API
//! the CLI starts process-based back-ends with.
//!
//! Back-ends that move GPU buffers (NCCL; MPI and UCX through the [`device`]
//! engine, CUDA-aware or staged through pinned buffers; the solo back-end,
//! which only counts) also offer [`DeviceP2p`] through
//! [`Transport::device_p2p`]: point-to-point on device memory enqueued on a
//! CUDA stream, which the compute stream never waits for on the host.

mod backoff;
pub mod collectives;
pub mod conformance;
pub mod device;
mod error;
pub mod launch;
mod local;
#[cfg(feature = "mpi")]
mod mpi_transport;
#[cfg(feature = "nccl")]
mod nccl_transport;
pub mod rendezvous;
mod solo;
mod stats;
mod transport;
#[cfg(feature = "ucx")]
pub mod ucx;

pub use device::{DeviceComm, DevicePath, DeviceStreams, DeviceWait};
pub use error::CommError;
pub use launch::TransportKind;
pub use local::{LocalTransport, RankError};
#[cfg(feature = "mpi")]
pub use mpi_transport::{mpi_cuda_support, MpiContext, MpiTransport};
#[cfg(feature = "nccl")]
pub use nccl_transport::NcclTransport;
pub use solo::SoloTransport;
pub use stats::{CommKind, CommStats, KindStats, StatsCounter};
pub use transport::{
    DeviceMsg, DeviceP2p, Pending, PendingOp, Transport, TransportOptions, RESERVED_TAG_BASE,
};
#[cfg(feature = "ucx")]
pub use ucx::UcxTransport;
