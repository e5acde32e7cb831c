//! Joining a multi-process job (PCPP §7's one rank per GPU): what `generate` does for SDXL and
//! Flux alike once a launcher (`mpirun`, `srun`, ...) has started its processes.

use anyhow::Result;
use pcpp_comm::{launch, TransportKind};

use crate::args::DeviceArg;

/// This process's place in a job started by a launcher (`mpirun`, `srun`, ...): connects its
/// transport, makes a panic end the whole job, checks that `--ranks` (when not 1) matches the
/// launcher's process count and that every rank was started with the same `fingerprint` (flags,
/// model, adapters), and picks its GPU. A failure after the connection ends the job on every rank.
/// Keep the returned connection for as long as the job runs: dropping it finalises MPI.
pub(crate) fn join_job(
    kind: TransportKind,
    env: &launch::LaunchEnv,
    opts: &launch::ConnectOptions,
    ranks: usize,
    device: DeviceArg,
    fingerprint: &[&[u8]],
) -> Result<(launch::Connection, usize)> {
    let conn = launch::connect(kind, env, opts)?;
    let world = conn.transport.clone();
    if ranks != 1 && ranks != conn.world_size {
        launch::abort_job(
            world.as_ref(),
            &format!(
                "--ranks {ranks} disagrees with the {} processes the launcher started",
                conn.world_size
            ),
        );
    }
    launch::abort_on_panic(world.clone());
    if let Err(e) = launch::check_same_everywhere(world.as_ref(), &launch::fingerprint(fingerprint))
    {
        launch::abort_job(world.as_ref(), &e.to_string());
    }
    match crate::args::gpu_of_local_rank(device, conn.local_rank) {
        Ok(gpu) => Ok((conn, gpu)),
        Err(e) => launch::abort_job(world.as_ref(), &format!("{e:#}")),
    }
}
