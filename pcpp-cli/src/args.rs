//! The value flags shared by `generate`, `bench` and `patch-bench`: which transport connects the
//! ranks and how device exchanges over MPI / UCX move GPU data, where the models run, which
//! sampler.

use std::time::Duration;

use anyhow::{bail, Result};
use pcpp_comm::{DeviceComm, DeviceStreams, TransportKind, TransportOptions};
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

/// The transport options of a run: the `--timeout` in seconds and the device exchange path of
/// MPI / UCX from `--device-comm`, else `PCPP_DEVICE_COMM`, else `auto`. CPU runs take the host
/// path (there is no device memory to exchange).
pub fn transport_options(
    timeout: u64,
    device_comm: Option<DeviceComm>,
    device: DeviceArg,
) -> Result<TransportOptions> {
    let comm = match device_comm {
        Some(c) => c,
        None => DeviceComm::from_env().map_err(|e| anyhow::anyhow!("{e}"))?,
    };
    let comm = if device == DeviceArg::Cpu {
        DeviceComm::Host
    } else {
        comm
    };
    Ok(TransportOptions::with_timeout(Duration::from_secs(timeout))
        .with_device(comm, DeviceStreams::Cuda))
}

/// The GPU ordinal of a rank whose node-local rank is `local`: its own GPU while there are enough,
/// else the GPUs are shared round robin (several ranks on one GPU work over MPI, UCX and local
/// transports; NCCL refuses it). 0 for the CPU.
pub fn gpu_of_local_rank(device: DeviceArg, local: usize) -> Result<usize> {
    if device == DeviceArg::Cpu || local == 0 {
        return Ok(0);
    }
    #[cfg(feature = "cuda")]
    {
        let n = pcpp_kernels::cuda::device_count()?;
        if n == 0 {
            bail!("--device cuda: no CUDA device is visible");
        }
        if local >= n {
            eprintln!(
                "note: node-local rank {local} shares GPU {} ({n} GPU(s) visible)",
                local % n
            );
        }
        Ok(local % n)
    }
    #[cfg(not(feature = "cuda"))]
    Ok(local)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_runs_take_the_host_path_and_the_flag_wins() {
        let o = transport_options(7, Some(DeviceComm::Staged), DeviceArg::Cpu).unwrap();
        assert_eq!(o.device_comm, DeviceComm::Host);
        assert_eq!(o.timeout, Duration::from_secs(7));
        let o = transport_options(7, Some(DeviceComm::Staged), DeviceArg::Cuda).unwrap();
        assert_eq!(o.device_comm, DeviceComm::Staged);
        assert_eq!(o.device_streams, DeviceStreams::Cuda);
    }
}
