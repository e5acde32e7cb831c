//! The value flags shared by `generate`, `bench` and `patch-bench`: which transport connects the
//! ranks, where the models run, which sampler.

use anyhow::{bail, Result};
use pcpp_comm::TransportKind;
use pcpp_kernels::Device;
use pcpp_sdxl::scheduler::SchedulerKind;

/// Which transport connects the ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TransportArg {
    /// Ranks as threads of this process.
    Local,
    /// MPI (launch with `mpirun -n N`).
    Mpi,
    /// UCX.
    Ucx,
    /// NCCL (GPUs).
    Nccl,
    /// NCCL if available, else MPI under mpirun, else local.
    Auto,
}

/// Where the UNet runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DeviceArg {
    /// The CPU twin.
    Cpu,
    /// The GPU of this rank's node-local rank (`cuda:{local_rank}`; GPU 0 for local ranks).
    Cuda,
}

impl DeviceArg {
    /// The device of a rank whose GPU ordinal is `gpu`.
    pub fn device(self, gpu: usize) -> Device {
        match self {
            DeviceArg::Cpu => Device::Cpu,
            DeviceArg::Cuda => Device::Cuda(gpu),
        }
    }

    /// Errors if this build cannot run on the device.
    pub fn check_built(self) -> Result<()> {
        if self == DeviceArg::Cuda && !cfg!(feature = "cuda") {
            bail!("--device cuda: this build has no CUDA back-end; rebuild pcpp-cli with `--features cuda`");
        }
        Ok(())
    }
}

/// The scheduler flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SchedulerArg {
    /// Euler discrete (SDXL's default).
    Euler,
    /// DDIM, η = 0.
    Ddim,
    /// DPM-Solver++ 2M.
    #[value(name = "dpmpp-2m")]
    DpmPp2M,
    /// DPM-Solver++ 2M with Karras sigmas.
    #[value(name = "dpmpp-2m-karras")]
    DpmPp2MKarras,
    /// Euler ancestral (per-step noise derived from the initial noise).
    #[value(name = "euler-a")]
    EulerA,
}

impl From<TransportArg> for TransportKind {
    fn from(t: TransportArg) -> TransportKind {
        match t {
            TransportArg::Local => TransportKind::Local,
            TransportArg::Mpi => TransportKind::Mpi,
            TransportArg::Ucx => TransportKind::Ucx,
            TransportArg::Nccl => TransportKind::Nccl,
            TransportArg::Auto => TransportKind::Auto,
        }
    }
}

impl From<SchedulerArg> for SchedulerKind {
    fn from(s: SchedulerArg) -> SchedulerKind {
        match s {
            SchedulerArg::Euler => SchedulerKind::Euler,
            SchedulerArg::Ddim => SchedulerKind::Ddim,
            SchedulerArg::DpmPp2M => SchedulerKind::DpmPp2M,
            SchedulerArg::DpmPp2MKarras => SchedulerKind::DpmPp2MKarras,
            SchedulerArg::EulerA => SchedulerKind::EulerAncestral,
        }
    }
}
