//! TCP rendezvous: the start-up all-gather of small blobs (UCX worker
//! addresses) for process-based PCPP back-ends launched without MPI.
//!
//! Patch parallelism (pcpp-algorithm.md §1 and §3, one rank per GPU) needs every rank
//! to know how to reach every other rank before the first denoising step. When
//! neither MPI nor NCCL's own bootstrap is available, rank 0 listens on a
//! well-known `host:port` (`PCPP_UCX_ROOT`) and every other rank connects to it
//! with plain TCP (`std::net`):
//!
//! 1. rank `r > 0` connects (retrying until the deadline: the root may start
//!    later) and sends `HELLO`: magic `PCPPRDV1`, protocol version (u32), `r`
//!    (u32), world size (u32), blob length (u64), blob;
//! 2. rank 0 accepts until it holds one blob per rank, rejecting a wrong magic
//!    or version, a different world size, an out-of-range or duplicate rank;
//! 3. rank 0 replies to every rank with `TABLE`: magic, status (u32: 0 = ok,
//!    1 = refused), then either `size` blobs (u64 length + bytes, rank order)
//!    or an error message (u64 length + UTF-8), and closes the connections.
//!
//! All integers are little-endian. Every socket operation has the deadline of
//! the whole rendezvous, so a missing rank is a [`CommError::Setup`] naming
//! it, never a hang. The protocol is documented in `docs/ucx.md`.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use crate::error::CommError;

const MAGIC: &[u8; 8] = b"PCPPRDV1";
const VERSION: u32 = 1;
/// Largest blob a rank may contribute (UCX worker addresses are a few KiB).
pub const MAX_BLOB: usize = 1 << 20;
const OP: &str = "rendezvous";

fn setup(rank: usize, detail: String) -> CommError {
    CommError::Setup {
        op: OP,
        rank,
        detail,
    }
}

/// Resolves `host:port` to the first socket address.
pub fn resolve(root: &str, rank: usize) -> Result<SocketAddr, CommError> {
    root.to_socket_addrs()
        .map_err(|e| setup(rank, format!("cannot resolve root address {root:?}: {e}")))?
        .next()
        .ok_or_else(|| setup(rank, format!("root address {root:?} resolves to nothing")))
}

/// Collective over `size` processes: every rank contributes `blob` and gets
/// all blobs in rank order. Rank 0 listens on `root`; the others connect to
/// it. Fails with [`CommError::Setup`] after `timeout`.
pub fn all_gather(
    root: &str,
    rank: usize,
    size: usize,
    blob: &[u8],
    timeout: Duration,
) -> Result<Vec<Vec<u8>>, CommError> {
    if size == 0 || rank >= size {
        return Err(setup(
            rank,
            format!("rank {rank} is out of range for world size {size}"),
        ));
    }
    if blob.len() > MAX_BLOB {
        return Err(setup(
            rank,
            format!("blob of {} bytes exceeds {MAX_BLOB}", blob.len()),
        ));
    }
    let deadline = Instant::now() + timeout;
    let addr = resolve(root, rank)?;
    if rank == 0 {
        let listener = TcpListener::bind(addr).map_err(|e| {
            setup(
                0,
                format!("cannot listen on {addr} (PCPP_UCX_ROOT={root}): {e}"),
            )
        })?;
        serve(&listener, size, blob, deadline)
    } else {
        join(addr, rank, size, blob, deadline)
    }
}

/// Rank 0's side on an already bound listener (lets tests bind port 0).
pub fn serve(
    listener: &TcpListener,
    size: usize,
    blob: &[u8],
    deadline: Instant,
) -> Result<Vec<Vec<u8>>, CommError> {
    let mut table: Vec<Option<Vec<u8>>> = vec![None; size];
    table[0] = Some(blob.to_vec());
    let mut streams: Vec<TcpStream> = Vec::with_capacity(size.saturating_sub(1));
    listener
        .set_nonblocking(true)
        .map_err(|e| setup(0, format!("listener: {e}")))?;
    let mut failure: Option<String> = None;
    while failure.is_none() && table.iter().any(Option::is_none) {
        match listener.accept() {
            Ok((mut stream, from)) => {
                let res = stream
                    .set_nonblocking(false)
                    .map_err(|e| e.to_string())
                    .and_then(|()| read_hello(&mut stream, deadline));
                match res {
                    Ok((r, n, b)) if n != size => {
                        failure = Some(format!(
                            "rank {r} (from {from}) says the world has {n} ranks, rank 0 says {size}"
                        ));
                        drop(b);
                    }
                    Ok((r, _, _)) if r == 0 || r >= size => {
                        failure = Some(format!(
                            "a process at {from} claims rank {r}, outside 1..{size}"
                        ));
                    }
                    Ok((r, _, b)) => {
                        if table[r].is_some() {
                            failure = Some(format!(
                                "rank {r} joined twice (second time from {from}); \
                                 check PCPP_RANK / SLURM_PROCID"
                            ));
                        } else {
                            table[r] = Some(b);
                        }
                    }
                    Err(e) => failure = Some(format!("bad hello from {from}: {e}")),
                }
                streams.push(stream);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    let missing: Vec<usize> = (0..size).filter(|&r| table[r].is_none()).collect();
                    failure = Some(format!(
                        "timed out waiting for ranks {missing:?} to connect to {}",
                        listener
                            .local_addr()
                            .map_or_else(|_| "?".into(), |a| a.to_string())
                    ));
                } else {
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
            Err(e) => failure = Some(format!("accept: {e}")),
        }
    }
    let reply = match &failure {
        None => {
            let mut out = MAGIC.to_vec();
            out.extend_from_slice(&0u32.to_le_bytes());
            for b in table.iter().flatten() {
                out.extend_from_slice(&(b.len() as u64).to_le_bytes());
                out.extend_from_slice(b);
            }
            out
        }
        Some(msg) => {
            let mut out = MAGIC.to_vec();
            out.extend_from_slice(&1u32.to_le_bytes());
            out.extend_from_slice(&(msg.len() as u64).to_le_bytes());
            out.extend_from_slice(msg.as_bytes());
            out
        }
    };
    for s in &mut streams {
        // A rank that vanished after its hello fails on its own side; the
        // others must still get their table, so write errors are ignored here.
        let _ =
            set_deadline(s, deadline).and_then(|()| s.write_all(&reply).map_err(|e| e.to_string()));
    }
    match failure {
        Some(msg) => Err(setup(0, msg)),
        None => Ok(table.into_iter().flatten().collect()),
    }
}

fn join(
    addr: SocketAddr,
    rank: usize,
    size: usize,
    blob: &[u8],
    deadline: Instant,
) -> Result<Vec<Vec<u8>>, CommError> {
    let mut stream = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(setup(
                rank,
                format!(
                    "timed out connecting to rank 0 at {addr} (PCPP_UCX_ROOT); is rank 0 running?"
                ),
            ));
        }
        match TcpStream::connect_timeout(&addr, left.min(Duration::from_secs(1))) {
            Ok(s) => break s,
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    let mut hello = MAGIC.to_vec();
    hello.extend_from_slice(&VERSION.to_le_bytes());
    hello.extend_from_slice(&(rank as u32).to_le_bytes());
    hello.extend_from_slice(&(size as u32).to_le_bytes());
    hello.extend_from_slice(&(blob.len() as u64).to_le_bytes());
    hello.extend_from_slice(blob);
    let io = |e: String| setup(rank, format!("with rank 0 at {addr}: {e}"));
    set_deadline(&mut stream, deadline).map_err(io)?;
    stream
        .write_all(&hello)
        .map_err(|e| io(format!("sending hello: {e}")))?;
    let mut magic = [0u8; 8];
    read_exact(&mut stream, &mut magic, deadline).map_err(io)?;
    if &magic != MAGIC {
        return Err(io("reply has a wrong magic number".into()));
    }
    let status = read_u32(&mut stream, deadline).map_err(io)?;
    if status != 0 {
        let msg = read_blob(&mut stream, deadline).map_err(io)?;
        return Err(io(format!(
            "rank 0 refused the rendezvous: {}",
            String::from_utf8_lossy(&msg)
        )));
    }
    (0..size)
        .map(|_| read_blob(&mut stream, deadline).map_err(io))
        .collect()
}

fn set_deadline(s: &mut TcpStream, deadline: Instant) -> Result<(), String> {
    let left = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1));
    s.set_read_timeout(Some(left))
        .and_then(|()| s.set_write_timeout(Some(left)))
        .map_err(|e| e.to_string())
}

fn read_exact(s: &mut TcpStream, buf: &mut [u8], deadline: Instant) -> Result<(), String> {
    set_deadline(s, deadline)?;
    s.read_exact(buf).map_err(|e| match e.kind() {
        ErrorKind::WouldBlock | ErrorKind::TimedOut => "timed out".to_string(),
        ErrorKind::UnexpectedEof => "connection closed early".to_string(),
        _ => e.to_string(),
    })
}

fn read_u32(s: &mut TcpStream, deadline: Instant) -> Result<u32, String> {
    let mut b = [0u8; 4];
    read_exact(s, &mut b, deadline)?;
    Ok(u32::from_le_bytes(b))
}

fn read_blob(s: &mut TcpStream, deadline: Instant) -> Result<Vec<u8>, String> {
    let mut b = [0u8; 8];
    read_exact(s, &mut b, deadline)?;
    let len = usize::try_from(u64::from_le_bytes(b)).unwrap_or(usize::MAX);
    if len > MAX_BLOB.saturating_mul(65536) {
        return Err(format!("blob length {len} is implausible"));
    }
    let mut out = vec![0u8; len];
    read_exact(s, &mut out, deadline)?;
    Ok(out)
}

fn read_hello(s: &mut TcpStream, deadline: Instant) -> Result<(usize, usize, Vec<u8>), String> {
    let mut magic = [0u8; 8];
    read_exact(s, &mut magic, deadline)?;
    if &magic != MAGIC {
        return Err("wrong magic number (not a pcpp rank?)".into());
    }
    let version = read_u32(s, deadline)?;
    if version != VERSION {
        return Err(format!(
            "protocol version {version}, rank 0 speaks {VERSION}"
        ));
    }
    let rank = read_u32(s, deadline)? as usize;
    let size = read_u32(s, deadline)? as usize;
    let blob = read_blob(s, deadline)?;
    if blob.len() > MAX_BLOB {
        return Err(format!("rank {rank} sent a blob of {} bytes", blob.len()));
    }
    Ok((rank, size, blob))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn free_root() -> String {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    }

    fn blob(r: usize) -> Vec<u8> {
        (0..(r * 300 + 7)).map(|i| (i * 7 + r) as u8).collect()
    }

    #[test]
    fn four_ranks_get_every_blob_in_rank_order() {
        let root = free_root();
        let n = 4;
        let results: Vec<_> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..n)
                .rev()
                .map(|r| {
                    let root = root.clone();
                    s.spawn(move || all_gather(&root, r, n, &blob(r), Duration::from_secs(20)))
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for res in results {
            let table = res.unwrap();
            assert_eq!(table, (0..n).map(blob).collect::<Vec<_>>());
        }
    }

    #[test]
    fn single_rank_needs_no_peers() {
        let t = all_gather(&free_root(), 0, 1, b"abc", Duration::from_secs(5)).unwrap();
        assert_eq!(t, vec![b"abc".to_vec()]);
    }

    #[test]
    fn missing_rank_times_out_naming_it() {
        let root = free_root();
        let res = std::thread::scope(|s| {
            let r = root.clone();
            let joiner = s.spawn(move || all_gather(&r, 1, 3, b"x", Duration::from_secs(5)));
            let root_res = all_gather(&root, 0, 3, b"y", Duration::from_millis(1500));
            (root_res, joiner.join().unwrap())
        });
        let e = res.0.unwrap_err();
        assert!(e.to_string().contains("[2]"), "{e}");
        // Rank 1 is told that rank 0 refused, not left hanging.
        let e1 = res.1.unwrap_err();
        assert!(e1.to_string().contains("refused"), "{e1}");
        assert_eq!(e1.peer(), 1);
    }

    #[test]
    fn size_disagreement_is_refused() {
        let root = free_root();
        let (r0, r1) = std::thread::scope(|s| {
            let r = root.clone();
            let j = s.spawn(move || all_gather(&r, 1, 3, b"x", Duration::from_secs(10)));
            let r0 = all_gather(&root, 0, 2, b"y", Duration::from_secs(10));
            (r0, j.join().unwrap())
        });
        assert!(r0.unwrap_err().to_string().contains("3 ranks"));
        assert!(r1.is_err());
    }

    #[test]
    fn duplicate_rank_is_refused() {
        let root = free_root();
        let (r0, others) = std::thread::scope(|s| {
            let js: Vec<_> = (0..2)
                .map(|_| {
                    let r = root.clone();
                    s.spawn(move || all_gather(&r, 1, 3, b"x", Duration::from_secs(10)))
                })
                .collect();
            let r0 = all_gather(&root, 0, 3, b"y", Duration::from_secs(10));
            (
                r0,
                js.into_iter()
                    .map(|j| j.join().unwrap())
                    .collect::<Vec<_>>(),
            )
        });
        assert!(r0.unwrap_err().to_string().contains("rank 1 joined twice"));
        assert!(others.iter().all(Result::is_err));
    }

    #[test]
    fn unreachable_root_times_out() {
        let root = free_root();
        let e = all_gather(&root, 2, 3, b"x", Duration::from_millis(300)).unwrap_err();
        assert!(e.to_string().contains("timed out connecting"), "{e}");
    }

    #[test]
    fn bad_rank_is_rejected_locally() {
        let e = all_gather("127.0.0.1:1", 3, 3, b"x", Duration::from_secs(1)).unwrap_err();
        assert!(matches!(e, CommError::Setup { rank: 3, .. }), "{e:?}");
    }
}
