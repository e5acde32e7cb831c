//! Start-up of process-based PCPP back-ends: which transport to use, where
//! this process sits (rank, world size, node-local rank for the GPU ordinal),
//! connecting, checking that every rank runs the same job, and taking the
//! whole job down on a fatal error.
//!
//! Patch parallelism (pcpp-algorithm.md §1, §3) runs one rank per GPU; the CLI
//! calls, in order: [`LaunchEnv::from_env`], [`resolve`] (for
//! [`TransportKind::Auto`]), [`connect`] for MPI / UCX (the in-process
//! [`crate::LocalTransport`] is created directly), [`check_same_everywhere`]
//! with a [`fingerprint`] of model, configuration and arguments, and
//! [`abort_on_panic`] / [`abort_job`] so that one failing rank ends the job.
//!
//! Environment variables read by [`LaunchEnv::from_env`] (first match wins):
//!
//! | what        | variables |
//! |-------------|-----------|
//! | rank        | `PCPP_RANK`, `OMPI_COMM_WORLD_RANK`, `PMI_RANK`, `PMIX_RANK`, `SLURM_PROCID` |
//! | world size  | `PCPP_WORLD_SIZE`, `OMPI_COMM_WORLD_SIZE`, `PMI_SIZE`, `SLURM_NTASKS` |
//! | local rank  | `PCPP_LOCAL_RANK`, `OMPI_COMM_WORLD_LOCAL_RANK`, `MPI_LOCALRANKID`, `SLURM_LOCALID` |
//! | UCX root    | `PCPP_UCX_ROOT` (`host:port` rank 0 listens on) |
//! | under MPI   | any of `OMPI_COMM_WORLD_SIZE`, `PMI_SIZE`, `PMIX_RANK`, `MPI_LOCALNRANKS` |

use std::sync::Arc;
use std::time::Duration;

use crate::error::CommError;
use crate::stats::CommKind;
use crate::transport::{Transport, TransportOptions};

/// Which back-end carries the traffic between ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TransportKind {
    /// Ranks as threads of one process ([`crate::LocalTransport`]).
    Local,
    /// One process per rank over MPI (feature `mpi`).
    Mpi,
    /// One process per rank over UCX (feature `ucx`).
    Ucx,
    /// NCCL between GPUs (not part of this crate's build yet).
    Nccl,
    /// NCCL if built, else MPI when launched by an MPI launcher, else UCX when
    /// `PCPP_UCX_ROOT` is set, else local.
    Auto,
}

impl TransportKind {
    /// Every kind, in the order the CLI lists them.
    pub const ALL: [TransportKind; 5] = [
        TransportKind::Local,
        TransportKind::Mpi,
        TransportKind::Ucx,
        TransportKind::Nccl,
        TransportKind::Auto,
    ];

    /// Lower-case name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            TransportKind::Local => "local",
            TransportKind::Mpi => "mpi",
            TransportKind::Ucx => "ucx",
            TransportKind::Nccl => "nccl",
            TransportKind::Auto => "auto",
        }
    }

    /// Whether this build contains the back-end (`Auto` always is).
    pub fn is_built(self) -> bool {
        match self {
            TransportKind::Local | TransportKind::Auto => true,
            TransportKind::Mpi => cfg!(feature = "mpi"),
            TransportKind::Ucx => cfg!(feature = "ucx"),
            TransportKind::Nccl => cfg!(feature = "nccl"),
        }
    }

    /// Cargo feature that enables the back-end, if any.
    pub fn feature(self) -> Option<&'static str> {
        match self {
            TransportKind::Mpi => Some("mpi"),
            TransportKind::Ucx => Some("ucx"),
            TransportKind::Nccl => Some("nccl"),
            TransportKind::Local | TransportKind::Auto => None,
        }
    }
}

impl std::fmt::Display for TransportKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for TransportKind {
    type Err = CommError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TransportKind::ALL
            .into_iter()
            .find(|k| k.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| CommError::Setup {
                op: "transport kind",
                rank: 0,
                detail: format!("unknown transport {s:?}; expected local, mpi, ucx, nccl or auto"),
            })
    }
}

/// Where the launcher (mpirun, srun, a script) placed this process, read
/// from the environment once at start-up.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LaunchEnv {
    /// Rank of this process, if the launcher told it.
    pub rank: Option<usize>,
    /// Number of processes, if the launcher told it.
    pub world_size: Option<usize>,
    /// Rank among the processes of this node (the GPU ordinal).
    pub local_rank: Option<usize>,
    /// `host:port` of the UCX rendezvous (`PCPP_UCX_ROOT`).
    pub ucx_root: Option<String>,
    /// Whether an MPI launcher started this process.
    pub under_mpi: bool,
}

// MPI launchers' variables come before Slurm's: `mpirun` inside a Slurm batch
// script passes the script's own SLURM_PROCID (0) to every rank.
const RANK_VARS: [&str; 5] = [
    "PCPP_RANK",
    "OMPI_COMM_WORLD_RANK",
    "PMI_RANK",
    "PMIX_RANK",
    "SLURM_PROCID",
];
const SIZE_VARS: [&str; 4] = [
    "PCPP_WORLD_SIZE",
    "OMPI_COMM_WORLD_SIZE",
    "PMI_SIZE",
    "SLURM_NTASKS",
];
const LOCAL_VARS: [&str; 4] = [
    "PCPP_LOCAL_RANK",
    "OMPI_COMM_WORLD_LOCAL_RANK",
    "MPI_LOCALRANKID",
    "SLURM_LOCALID",
];
const MPI_VARS: [&str; 4] = [
    "OMPI_COMM_WORLD_SIZE",
    "PMI_SIZE",
    "PMIX_RANK",
    "MPI_LOCALNRANKS",
];

impl LaunchEnv {
    /// Reads the variables listed in the module documentation.
    pub fn from_env() -> Result<LaunchEnv, CommError> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// Like [`LaunchEnv::from_env`] with explicit `(name, value)` pairs.
    pub fn from_vars<'a, I>(vars: I) -> Result<LaunchEnv, CommError>
    where
        I: IntoIterator<Item = (&'a str, &'a str)>,
    {
        let vars: Vec<(&str, &str)> = vars.into_iter().collect();
        Self::from_lookup(|k| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        })
    }

    fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<LaunchEnv, CommError> {
        let number = |names: &[&str]| -> Result<Option<usize>, CommError> {
            for name in names {
                if let Some(v) = get(name) {
                    return v.trim().parse().map(Some).map_err(|_| CommError::Setup {
                        op: "launch environment",
                        rank: 0,
                        detail: format!("{name}={v:?} is not a non-negative integer"),
                    });
                }
            }
            Ok(None)
        };
        let env = LaunchEnv {
            rank: number(&RANK_VARS)?,
            world_size: number(&SIZE_VARS)?,
            local_rank: number(&LOCAL_VARS)?,
            ucx_root: get("PCPP_UCX_ROOT").filter(|s| !s.is_empty()),
            under_mpi: MPI_VARS.iter().any(|v| get(v).is_some()),
        };
        if let (Some(r), Some(n)) = (env.rank, env.world_size) {
            if r >= n {
                return Err(CommError::Setup {
                    op: "launch environment",
                    rank: r,
                    detail: format!("rank {r} is not below the world size {n}"),
                });
            }
        }
        Ok(env)
    }

    /// Rank and world size, or an error saying which variables to set.
    pub fn rank_and_size(&self) -> Result<(usize, usize), CommError> {
        match (self.rank, self.world_size) {
            (Some(r), Some(n)) => Ok((r, n)),
            _ => Err(CommError::Setup {
                op: "launch environment",
                rank: self.rank.unwrap_or(0),
                detail: "rank or world size unknown: set PCPP_RANK and PCPP_WORLD_SIZE \
                         (or launch with srun, which sets SLURM_PROCID / SLURM_NTASKS)"
                    .into(),
            }),
        }
    }
}

/// Whether an MPI launcher (`mpirun`, `mpiexec`, `srun --mpi=...`) started
/// this process.
pub fn under_mpirun() -> bool {
    MPI_VARS.iter().any(|v| std::env::var_os(v).is_some())
}

/// The concrete back-end `kind` stands for in this build and environment
/// (only [`TransportKind::Auto`] changes).
pub fn resolve(kind: TransportKind, env: &LaunchEnv) -> TransportKind {
    match kind {
        TransportKind::Auto
            if TransportKind::Nccl.is_built() && (env.under_mpi || env.ucx_root.is_some()) =>
        {
            TransportKind::Nccl
        }
        TransportKind::Auto if env.under_mpi && TransportKind::Mpi.is_built() => TransportKind::Mpi,
        TransportKind::Auto if env.ucx_root.is_some() && TransportKind::Ucx.is_built() => {
            TransportKind::Ucx
        }
        TransportKind::Auto => TransportKind::Local,
        k => k,
    }
}

/// Options of [`connect`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectOptions {
    /// Options of the transport (timeout of every wait).
    pub transport: TransportOptions,
    /// How long the UCX TCP rendezvous waits for all ranks.
    pub rendezvous_timeout: Duration,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        Self {
            transport: TransportOptions::default(),
            rendezvous_timeout: Duration::from_secs(300),
        }
    }
}

/// A connected process-based world.
///
/// Keep it alive until the end of the run: dropping it shuts the back-end
/// down (for MPI, finalises MPI after dropping its own handle of the
/// transport); drop clones of [`Connection::transport`] first.
pub struct Connection {
    /// The world transport (split it for CFG / patch groups).
    pub transport: Arc<dyn Transport>,
    /// The back-end in use (never `Auto`).
    pub kind: TransportKind,
    /// Rank of this process in the world.
    pub rank: usize,
    /// Number of processes.
    pub world_size: usize,
    /// Rank among the processes of this node: the GPU ordinal to use.
    pub local_rank: usize,
    /// One line for logs, e.g. `ucx 1.13.1 (bootstrap: rendezvous 10.0.0.1:29500), rank 2/4, local rank 2`.
    pub description: String,
    /// Keeps MPI initialised; declared last so it drops after `transport`.
    #[cfg(feature = "mpi")]
    mpi: Option<crate::MpiContext>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("kind", &self.kind)
            .field("rank", &self.rank)
            .field("world_size", &self.world_size)
            .field("local_rank", &self.local_rank)
            .field("description", &self.description)
            .finish()
    }
}

impl Connection {
    /// The MPI environment, when MPI is initialised (MPI, or UCX under MPI).
    #[cfg(feature = "mpi")]
    pub fn mpi_context(&self) -> Option<&crate::MpiContext> {
        self.mpi.as_ref()
    }
}

/// Options of an MPI world that only bootstraps another back-end: no device exchanges of its own.
#[cfg(feature = "mpi")]
#[allow(dead_code)]
fn bootstrap_options(opts: &ConnectOptions) -> TransportOptions {
    let mut o = opts.transport.clone();
    o.device_comm = crate::DeviceComm::Host;
    o
}

/// The device data path of `t` for the connection's description: `host` when it has none.
#[cfg(any(feature = "mpi", feature = "ucx"))]
fn device_path(t: &dyn Transport) -> &'static str {
    t.device_p2p().map_or("host", |d| d.data_path())
}

fn not_built(kind: TransportKind) -> CommError {
    CommError::Setup {
        op: "connect",
        rank: 0,
        detail: format!(
            "transport {kind} is not part of this build; rebuild with `--features {}`",
            kind.feature().unwrap_or("?")
        ),
    }
}

/// Connects this process to the world of a process-based back-end.
///
/// `kind` is resolved with [`resolve`] first. [`TransportKind::Local`] is an
/// error (create [`crate::LocalTransport`] instead), as is a back-end missing
/// from the build. UCX exchanges worker addresses over MPI when
/// [`LaunchEnv::under_mpi`] and the `mpi` feature is built, else through the
/// TCP rendezvous at [`LaunchEnv::ucx_root`]; there the node-local rank is
/// [`LaunchEnv::local_rank`] or, when unset, the rank's position among the
/// ranks on the same host.
pub fn connect(
    kind: TransportKind,
    env: &LaunchEnv,
    opts: &ConnectOptions,
) -> Result<Connection, CommError> {
    match resolve(kind, env) {
        TransportKind::Local => Err(CommError::Setup {
            op: "connect",
            rank: 0,
            detail: "the local transport runs ranks as threads of one process; \
                     create it with LocalTransport::create"
                .into(),
        }),
        TransportKind::Mpi => connect_mpi(env, opts),
        TransportKind::Ucx => connect_ucx(env, opts),
        TransportKind::Nccl => connect_nccl(env, opts),
        other => Err(not_built(other)),
    }
}

#[cfg(feature = "mpi")]
fn connect_mpi(_env: &LaunchEnv, opts: &ConnectOptions) -> Result<Connection, CommError> {
    let (world, ctx) = crate::MpiTransport::init_typed(opts.transport.clone())?;
    let transport: Arc<dyn Transport> = world;
    Ok(Connection {
        description: format!(
            "mpi ({}), rank {}/{}, local rank {}, device exchanges {}",
            mpi_library(),
            ctx.rank,
            ctx.size,
            ctx.local_rank,
            device_path(transport.as_ref())
        ),
        transport,
        kind: TransportKind::Mpi,
        rank: ctx.rank,
        world_size: ctx.size,
        local_rank: ctx.local_rank,
        mpi: Some(ctx),
    })
}

#[cfg(feature = "mpi")]
fn mpi_library() -> String {
    let v = mpi::environment::library_version().unwrap_or_else(|_| "unknown MPI".into());
    let first = v.lines().next().unwrap_or("unknown MPI");
    let short = first.split(',').next().unwrap_or(first);
    short.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(not(feature = "mpi"))]
fn connect_mpi(_: &LaunchEnv, _: &ConnectOptions) -> Result<Connection, CommError> {
    Err(not_built(TransportKind::Mpi))
}

#[cfg(feature = "ucx")]
fn connect_ucx(env: &LaunchEnv, opts: &ConnectOptions) -> Result<Connection, CommError> {
    use crate::ucx::UcxTransport;
    #[cfg(feature = "mpi")]
    if env.under_mpi {
        let (world, ctx) = crate::MpiTransport::init_typed(bootstrap_options(opts))?;
        let ucx = UcxTransport::init_over(world.as_ref(), opts.transport.clone())?;
        drop(world);
        return Ok(Connection {
            description: format!(
                "ucx {} (bootstrap: mpi), rank {}/{}, local rank {}, device exchanges {}",
                UcxTransport::ucx_version(),
                ctx.rank,
                ctx.size,
                ctx.local_rank,
                device_path(ucx.as_ref())
            ),
            transport: ucx,
            kind: TransportKind::Ucx,
            rank: ctx.rank,
            world_size: ctx.size,
            local_rank: ctx.local_rank,
            mpi: Some(ctx),
        });
    }
    let (rank, size) = env.rank_and_size()?;
    let root = env.ucx_root.as_deref().ok_or_else(|| CommError::Setup {
        op: "connect",
        rank,
        detail: "transport ucx without MPI needs PCPP_UCX_ROOT=host:port (where rank 0 listens)"
            .into(),
    })?;
    let ucx = UcxTransport::init_rendezvous(
        root,
        rank,
        size,
        opts.transport.clone(),
        opts.rendezvous_timeout,
    )?;
    // Collective on every rank, whether or not the launcher set a local rank.
    let by_host = node_local_rank(ucx.as_ref())?;
    ucx.reset_stats();
    let local_rank = env.local_rank.unwrap_or(by_host);
    Ok(Connection {
        description: format!(
            "ucx {} (bootstrap: rendezvous {root}), rank {rank}/{size}, local rank {local_rank}, device exchanges {}",
            UcxTransport::ucx_version(),
            device_path(ucx.as_ref())
        ),
        transport: ucx,
        kind: TransportKind::Ucx,
        rank,
        world_size: size,
        local_rank,
        #[cfg(feature = "mpi")]
        mpi: None,
    })
}

/// NCCL: the unique id travels over MPI under an MPI launcher (with the `mpi` feature), else
/// through the TCP rendezvous at [`LaunchEnv::ucx_root`] (`PCPP_UCX_ROOT`, shared with UCX). The
/// GPU is the node-local rank.
#[cfg(feature = "nccl")]
fn connect_nccl(env: &LaunchEnv, opts: &ConnectOptions) -> Result<Connection, CommError> {
    use crate::NcclTransport;
    #[cfg(feature = "mpi")]
    if env.under_mpi {
        let (world, ctx) = crate::MpiTransport::init_typed(bootstrap_options(opts))?;
        let nccl =
            NcclTransport::init_over(world.as_ref(), ctx.local_rank, opts.transport.clone())?;
        drop(world);
        return Ok(Connection {
            description: format!(
                "nccl {} (bootstrap: mpi), rank {}/{}, GPU {}",
                NcclTransport::nccl_version(),
                ctx.rank,
                ctx.size,
                ctx.local_rank
            ),
            transport: nccl,
            kind: TransportKind::Nccl,
            rank: ctx.rank,
            world_size: ctx.size,
            local_rank: ctx.local_rank,
            mpi: Some(ctx),
        });
    }
    let (rank, size) = env.rank_and_size()?;
    let root = env.ucx_root.as_deref().ok_or_else(|| CommError::Setup {
        op: "connect",
        rank,
        detail: "transport nccl without MPI needs PCPP_UCX_ROOT=host:port (where rank 0 listens) \
                 and PCPP_LOCAL_RANK or a launcher's local rank (the GPU)"
            .into(),
    })?;
    let local_rank = env.local_rank.unwrap_or(rank);
    let nccl = NcclTransport::init_rendezvous(
        root,
        rank,
        size,
        local_rank,
        opts.transport.clone(),
        opts.rendezvous_timeout,
    )?;
    Ok(Connection {
        description: format!(
            "nccl {} (bootstrap: rendezvous {root}), rank {rank}/{size}, GPU {local_rank}",
            NcclTransport::nccl_version()
        ),
        transport: nccl,
        kind: TransportKind::Nccl,
        rank,
        world_size: size,
        local_rank,
        #[cfg(feature = "mpi")]
        mpi: None,
    })
}

#[cfg(not(feature = "nccl"))]
fn connect_nccl(_: &LaunchEnv, _: &ConnectOptions) -> Result<Connection, CommError> {
    Err(not_built(TransportKind::Nccl))
}

/// Collective: the number of lower ranks running on this host (the node-local
/// rank when the launcher does not say), from an all-gather of host names.
#[cfg(feature = "ucx")]
fn node_local_rank(t: &dyn Transport) -> Result<usize, CommError> {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .unwrap_or_default();
    let all = t
        .all_gather(CommKind::Control, host.trim().as_bytes())
        .map_err(|e| e.with_op("node-local rank"))?;
    let me = t.rank();
    Ok((0..me).filter(|&r| all[r] == all[me]).count())
}

#[cfg(not(feature = "ucx"))]
fn connect_ucx(_: &LaunchEnv, _: &ConnectOptions) -> Result<Connection, CommError> {
    Err(not_built(TransportKind::Ucx))
}

/// Stable 64-bit FNV-1a hash of `parts` (each length-prefixed, so
/// `["ab", "c"]` and `["a", "bc"]` differ), for [`check_same_everywhere`].
pub fn fingerprint(parts: &[&[u8]]) -> [u8; 8] {
    let mut h = FNV_OFFSET;
    for p in parts {
        h = fnv1a(h, &(p.len() as u64).to_le_bytes());
        h = fnv1a(h, p);
    }
    h.to_le_bytes()
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

fn fnv1a(mut h: u64, bytes: &[u8]) -> u64 {
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(PRIME);
    }
    h
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Collective: every rank contributes `bytes_hash` (e.g. the [`fingerprint`]
/// of model, configuration and arguments); fails on every rank with
/// [`CommError::Mismatch`] naming the ranks whose hash differs from rank 0's.
pub fn check_same_everywhere(
    transport: &dyn Transport,
    bytes_hash: &[u8],
) -> Result<(), CommError> {
    const OP: &str = "check_same_everywhere";
    let all = transport
        .all_gather(CommKind::Control, bytes_hash)
        .map_err(|e| e.with_op(OP))?;
    let ranks: Vec<usize> = (1..all.len()).filter(|&r| all[r] != all[0]).collect();
    if ranks.is_empty() {
        return Ok(());
    }
    let shown: Vec<String> = ranks
        .iter()
        .take(8)
        .map(|&r| format!("rank {r} has {}", hex(&all[r])))
        .collect();
    Err(CommError::Mismatch {
        op: OP,
        detail: format!(
            "the ranks run different models, configurations or arguments \
             (rank 0 has {}, {}); start every rank with the same command line and files",
            hex(&all[0]),
            shown.join(", ")
        ),
        ranks,
    })
}

/// Prints `rank R: <message>` on stderr, aborts the job through `transport`
/// (MPI: `MPI_Abort`; UCX: abort notices to every rank) and exits with
/// status 1.
pub fn abort_job(transport: &dyn Transport, message: &str) -> ! {
    eprintln!("rank {}: {message}", transport.rank());
    transport.abort(message);
    std::process::exit(1)
}

/// Installs a panic hook that, after the default report, aborts the job
/// through `transport` so that a panicking rank never leaves the others
/// waiting.
pub fn abort_on_panic(transport: Arc<dyn Transport>) {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        previous(info);
        let msg = format!("panic: {info}");
        eprintln!("rank {}: {msg}", transport.rank());
        transport.abort(&msg);
    }));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::LocalTransport;

    #[test]
    fn kinds_parse_and_print() {
        for k in TransportKind::ALL {
            assert_eq!(k.name().parse::<TransportKind>().unwrap(), k);
            assert_eq!(k.to_string(), k.name());
        }
        assert_eq!("MPI".parse::<TransportKind>().unwrap(), TransportKind::Mpi);
        let e = "tcp".parse::<TransportKind>().unwrap_err();
        assert!(e.to_string().contains("\"tcp\""), "{e}");
    }

    #[test]
    fn env_precedence_and_errors() {
        let env = LaunchEnv::from_vars([
            ("SLURM_PROCID", "3"),
            ("SLURM_NTASKS", "8"),
            ("SLURM_LOCALID", "1"),
            ("PCPP_RANK", "2"),
        ])
        .unwrap();
        assert_eq!(env.rank, Some(2));
        assert_eq!(env.world_size, Some(8));
        assert_eq!(env.local_rank, Some(1));
        assert!(!env.under_mpi);
        let env = LaunchEnv::from_vars([
            ("OMPI_COMM_WORLD_RANK", "1"),
            ("OMPI_COMM_WORLD_SIZE", "4"),
            ("OMPI_COMM_WORLD_LOCAL_RANK", "1"),
        ])
        .unwrap();
        assert!(env.under_mpi);
        assert_eq!(env.rank_and_size().unwrap(), (1, 4));
        // mpirun inside a Slurm batch script: the script's SLURM_PROCID=0
        // leaks into every rank and must not win.
        let env = LaunchEnv::from_vars([
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "1"),
            ("OMPI_COMM_WORLD_RANK", "2"),
            ("OMPI_COMM_WORLD_SIZE", "4"),
        ])
        .unwrap();
        assert_eq!(env.rank_and_size().unwrap(), (2, 4));
        let e = LaunchEnv::from_vars([("PCPP_RANK", "x")]).unwrap_err();
        assert!(e.to_string().contains("PCPP_RANK=\"x\""), "{e}");
        let e = LaunchEnv::from_vars([("PCPP_RANK", "4"), ("PCPP_WORLD_SIZE", "4")]).unwrap_err();
        assert!(e.to_string().contains("rank 4"), "{e}");
        let e = LaunchEnv::default().rank_and_size().unwrap_err();
        assert!(e.to_string().contains("PCPP_RANK"), "{e}");
    }

    #[test]
    fn auto_resolution() {
        let plain = LaunchEnv::default();
        assert_eq!(resolve(TransportKind::Auto, &plain), TransportKind::Local);
        assert_eq!(resolve(TransportKind::Ucx, &plain), TransportKind::Ucx);
        let mpi = LaunchEnv {
            under_mpi: true,
            ..LaunchEnv::default()
        };
        let exp = if cfg!(feature = "mpi") {
            TransportKind::Mpi
        } else {
            TransportKind::Local
        };
        assert_eq!(resolve(TransportKind::Auto, &mpi), exp);
        let ucx = LaunchEnv {
            ucx_root: Some("127.0.0.1:1".into()),
            ..LaunchEnv::default()
        };
        let exp = if cfg!(feature = "ucx") {
            TransportKind::Ucx
        } else {
            TransportKind::Local
        };
        assert_eq!(resolve(TransportKind::Auto, &ucx), exp);
    }

    #[test]
    fn connect_refuses_local_and_unbuilt_kinds() {
        let env = LaunchEnv::default();
        let opts = ConnectOptions::default();
        let e = connect(TransportKind::Local, &env, &opts).unwrap_err();
        assert!(e.to_string().contains("LocalTransport"), "{e}");
        let e = connect(TransportKind::Nccl, &env, &opts).unwrap_err();
        if cfg!(feature = "nccl") {
            assert!(e.to_string().contains("PCPP_RANK"), "{e}");
        } else {
            assert!(e.to_string().contains("--features nccl"), "{e}");
        }
        if !cfg!(feature = "ucx") {
            let e = connect(TransportKind::Ucx, &env, &opts).unwrap_err();
            assert!(e.to_string().contains("--features ucx"), "{e}");
        }
    }

    #[test]
    fn fingerprint_is_stable_and_separates_parts() {
        assert_ne!(fingerprint(&[b"ab", b"c"]), fingerprint(&[b"a", b"bc"]));
        assert_eq!(
            fingerprint(&[b"model", b"cfg"]),
            fingerprint(&[b"model", b"cfg"])
        );
        // Published FNV-1a 64 test vectors: a change of algorithm (which
        // would make ranks built from different versions disagree) shows.
        assert_eq!(fnv1a(FNV_OFFSET, b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(FNV_OFFSET, b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a(FNV_OFFSET, b"foobar"), 0x8594_4171_f739_67e8);
    }

    fn run_check(hashes: Vec<Vec<u8>>) -> Vec<Result<(), CommError>> {
        let world = LocalTransport::create(hashes.len(), TransportOptions::default());
        std::thread::scope(|s| {
            let hs: Vec<_> = world
                .iter()
                .zip(&hashes)
                .map(|(t, h)| s.spawn(move || check_same_everywhere(t.as_ref(), h)))
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    #[test]
    fn same_hash_everywhere_passes() {
        let h = fingerprint(&[b"sdxl", b"steps=20"]).to_vec();
        assert!(run_check(vec![h; 4]).iter().all(Result::is_ok));
    }

    #[test]
    fn differing_ranks_are_named_on_every_rank() {
        let a = fingerprint(&[b"sdxl", b"steps=20"]).to_vec();
        let b = fingerprint(&[b"sdxl", b"steps=30"]).to_vec();
        let res = run_check(vec![a.clone(), a.clone(), b.clone(), a, b]);
        for r in res {
            match r {
                Err(CommError::Mismatch { ranks, detail, .. }) => {
                    assert_eq!(ranks, vec![2, 4]);
                    assert!(detail.contains("rank 2 has"), "{detail}");
                }
                other => panic!("expected a mismatch, got {other:?}"),
            }
        }
    }
}
