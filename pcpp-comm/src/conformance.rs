//! Conformance suite every [`Transport`] back-end must pass.
//!
//! It encodes the contract the PCPP layers rely on: ring halo exchanges with
//! several layer tags in flight and waited out of order, posting-order
//! matching, zero-length and multi-megabyte messages, variable-length
//! all-gather (attention K/V), bit-identical all-reduce (group-norm
//! statistics), broadcast, barrier, split sub-groups (e.g. one group per
//! classifier-free-guidance branch) and exact byte accounting.
//!
//! [`run_all`] is collective: call it on every rank of the transport at the
//! same time. [`run_device`] (module [`device`]) adds the device-memory cases
//! of [`crate::DeviceP2p`], on a GPU or on the CPU twin of its streams. [`run_local`] runs it on a fresh [`LocalTransport`] world.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::collectives::f32_to_bytes;
use crate::error::CommError;
use crate::stats::{CommKind, KindStats};
use crate::transport::{Transport, TransportOptions};
use crate::LocalTransport;

pub mod device;
#[cfg(feature = "cuda")]
pub use device::CudaDevice;
pub use device::{run_device, HostDevice, TestDevice};

type Check = Result<(), String>;
type NamedCheck = (&'static str, fn(&dyn Transport) -> Check);

macro_rules! ensure {
    ($cond:expr, $($arg:tt)+) => {
        if !$cond {
            return Err(format!($($arg)+));
        }
    };
}

fn ce<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> String + '_ {
    move |e| format!("{what}: {e}")
}

/// Deterministic payload of a message from `src` to `dst` with `tag`.
fn pattern(src: usize, dst: usize, tag: u32, len: usize) -> Vec<u8> {
    let seed = src
        .wrapping_mul(7)
        .wrapping_add(dst.wrapping_mul(13))
        .wrapping_add((tag as usize).wrapping_mul(101));
    (0..len)
        .map(|i| (i.wrapping_mul(31).wrapping_add(seed) ^ (i >> 8)) as u8)
        .collect()
}

fn neighbours(t: &dyn Transport) -> (usize, usize) {
    let (n, r) = (t.size(), t.rank());
    ((r + n - 1) % n, (r + 1) % n)
}

/// Runs every check on this rank; collective over all ranks of `t`.
pub fn run_all(t: &dyn Transport) -> Result<(), String> {
    let checks: [NamedCheck; 9] = [
        ("rank_size", check_rank_size),
        ("ring_exchange", check_ring_exchange),
        ("zero_length", check_zero_length),
        ("large_messages", check_large_messages),
        ("all_gather", check_all_gather),
        ("all_reduce", check_all_reduce),
        ("broadcast", check_broadcast),
        ("barrier", check_barrier),
        ("split", check_split),
    ];
    for (name, check) in checks {
        check(t).map_err(|e| format!("rank {}/{}: {name}: {e}", t.rank(), t.size()))?;
    }
    check_byte_accounting(t)
        .map_err(|e| format!("rank {}/{}: byte_accounting: {e}", t.rank(), t.size()))?;
    check_wrong_length(t).map_err(|e| format!("rank {}/{}: wrong_length: {e}", t.rank(), t.size()))
}

/// Creates an `n`-rank [`LocalTransport`] world, runs [`run_all`] on every rank
/// in its own thread and returns the first failure. A failing rank aborts the
/// world so the others do not wait for the timeout.
pub fn run_local(n: usize, opts: TransportOptions) -> Result<(), String> {
    let world = LocalTransport::create(n, opts);
    let results: Vec<Check> = std::thread::scope(|s| {
        let handles: Vec<_> = world
            .iter()
            .map(|t| {
                let t: Arc<dyn Transport> = t.clone();
                s.spawn(move || {
                    let res = run_all(t.as_ref());
                    if let Err(e) = &res {
                        t.abort(e);
                    }
                    res
                })
            })
            .collect();
        handles
            .into_iter()
            .enumerate()
            .map(|(r, h)| {
                h.join()
                    .unwrap_or_else(|_| Err(format!("rank {r}: thread panicked")))
            })
            .collect()
    });
    let errors: Vec<String> = results.into_iter().filter_map(Result::err).collect();
    match errors.iter().find(|e| !e.contains("aborted by")) {
        Some(e) => Err(e.clone()),
        None => errors.into_iter().next().map_or(Ok(()), Err),
    }
}

/// `rank < size`, and every rank agrees on the size and on who is who.
pub fn check_rank_size(t: &dyn Transport) -> Check {
    let (n, r) = (t.size(), t.rank());
    ensure!(n >= 1, "size is 0");
    ensure!(r < n, "rank {r} >= size {n}");
    let mut mine = (r as u64).to_le_bytes().to_vec();
    mine.extend_from_slice(&(n as u64).to_le_bytes());
    let all = t
        .all_gather(CommKind::Control, &mine)
        .map_err(ce("all_gather"))?;
    ensure!(all.len() == n, "all_gather returned {} entries", all.len());
    for (i, b) in all.iter().enumerate() {
        let mut exp = (i as u64).to_le_bytes().to_vec();
        exp.extend_from_slice(&(n as u64).to_le_bytes());
        ensure!(*b == exp, "entry {i} is {b:?}, expected rank {i} size {n}");
    }
    Ok(())
}

fn ring_len(src: usize, tag: u32) -> usize {
    100 + src * 3 + tag as usize
}

/// Ring exchange in both directions under several tags in flight at once,
/// waited out of order; same-tag messages match in posting order;
/// `is_complete` eventually reports completion.
pub fn check_ring_exchange(t: &dyn Transport) -> Check {
    let r = t.rank();
    let (left, right) = neighbours(t);
    let tags = [11u32, 12, 13];
    let mut pendings = Vec::new();
    for &tag in &tags {
        let sends = vec![
            (right, pattern(r, right, tag, ring_len(r, tag))),
            (left, pattern(r, left, tag, ring_len(r, tag) + 1)),
        ];
        let recvs = vec![
            (left, ring_len(left, tag)),
            (right, ring_len(right, tag) + 1),
        ];
        let p = t
            .exchange(CommKind::Halo, tag, sends, recvs)
            .map_err(ce("post"))?;
        pendings.push(Some(p));
    }
    for idx in [2usize, 0, 1] {
        let tag = tags[idx];
        let p = pendings[idx].take().ok_or("pending taken twice")?;
        let got = p.wait().map_err(ce("wait"))?;
        ensure!(got.len() == 2, "tag {tag}: {} buffers", got.len());
        let from_left = pattern(left, r, tag, ring_len(left, tag));
        let from_right = pattern(right, r, tag, ring_len(right, tag) + 1);
        ensure!(
            got[0] == from_left,
            "tag {tag}: wrong data from left {left}"
        );
        ensure!(
            got[1] == from_right,
            "tag {tag}: wrong data from right {right}"
        );
    }

    let first = t
        .exchange(
            CommKind::Halo,
            20,
            vec![(right, vec![1; 5])],
            vec![(left, 5)],
        )
        .map_err(ce("post first same-tag"))?;
    let second = t
        .exchange(
            CommKind::Halo,
            20,
            vec![(right, vec![2; 5])],
            vec![(left, 5)],
        )
        .map_err(ce("post second same-tag"))?;
    let got2 = second.wait().map_err(ce("wait second same-tag"))?;
    let got1 = first.wait().map_err(ce("wait first same-tag"))?;
    ensure!(
        got1 == vec![vec![1; 5]],
        "same-tag: first receive got {got1:?}"
    );
    ensure!(
        got2 == vec![vec![2; 5]],
        "same-tag: second receive got {got2:?}"
    );

    let p = t
        .exchange(
            CommKind::Halo,
            21,
            vec![(right, vec![7; 3])],
            vec![(left, 3)],
        )
        .map_err(ce("post is_complete"))?;
    let start = Instant::now();
    while !p.is_complete() {
        ensure!(
            start.elapsed() < t.options().timeout,
            "is_complete never became true"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let got = p.wait().map_err(ce("wait is_complete"))?;
    ensure!(got == vec![vec![7; 3]], "is_complete exchange got {got:?}");
    Ok(())
}

/// Zero-length messages, alone and mixed with non-empty ones, and an exchange
/// with nothing to do.
pub fn check_zero_length(t: &dyn Transport) -> Check {
    let r = t.rank();
    let (left, right) = neighbours(t);
    let got = t
        .exchange(
            CommKind::Other,
            30,
            vec![(right, Vec::new()), (left, Vec::new())],
            vec![(left, 0), (right, 0)],
        )
        .and_then(|p| p.wait())
        .map_err(ce("zero-length exchange"))?;
    ensure!(
        got.len() == 2 && got.iter().all(Vec::is_empty),
        "got {got:?}"
    );
    let got = t
        .exchange(
            CommKind::Other,
            31,
            vec![(right, Vec::new()), (right, pattern(r, right, 31, 9))],
            vec![(left, 0), (left, 9)],
        )
        .and_then(|p| p.wait())
        .map_err(ce("mixed exchange"))?;
    ensure!(got[0].is_empty(), "mixed: first buffer not empty");
    ensure!(
        got[1] == pattern(left, r, 31, 9),
        "mixed: wrong second buffer"
    );
    let got = t
        .exchange(CommKind::Other, 32, Vec::new(), Vec::new())
        .and_then(|p| p.wait())
        .map_err(ce("empty exchange"))?;
    ensure!(
        got.is_empty(),
        "empty exchange returned {} buffers",
        got.len()
    );
    Ok(())
}

/// Multi-megabyte messages in both directions at once.
pub fn check_large_messages(t: &dyn Transport) -> Check {
    let r = t.rank();
    let (left, right) = neighbours(t);
    let big = |src: usize| (4 << 20) + src;
    let mid = |src: usize| (3 << 20) + 2 * src;
    let got = t
        .exchange(
            CommKind::Attention,
            33,
            vec![
                (right, pattern(r, right, 33, big(r))),
                (left, pattern(r, left, 34, mid(r))),
            ],
            vec![(left, big(left)), (right, mid(right))],
        )
        .and_then(|p| p.wait())
        .map_err(ce("large exchange"))?;
    ensure!(
        got[0] == pattern(left, r, 33, big(left)),
        "wrong {} bytes from left {left}",
        big(left)
    );
    ensure!(
        got[1] == pattern(right, r, 34, mid(right)),
        "wrong {} bytes from right {right}",
        mid(right)
    );
    Ok(())
}

/// Blocking and nonblocking all-gather with unequal (including zero) lengths.
pub fn check_all_gather(t: &dyn Transport) -> Check {
    let (n, r) = (t.size(), t.rank());
    let len_a = |q: usize| (q * 37) % 50;
    let len_b = |q: usize| 1000 + q * 101;
    let all = t
        .all_gather(CommKind::Gather, &pattern(r, 0, 1, len_a(r)))
        .map_err(ce("all_gather"))?;
    ensure!(all.len() == n, "all_gather: {} entries", all.len());
    for (q, b) in all.iter().enumerate() {
        ensure!(
            *b == pattern(q, 0, 1, len_a(q)),
            "all_gather: entry {q} wrong"
        );
    }
    let ga = t
        .start_all_gather(CommKind::Attention, &pattern(r, 0, 2, len_b(r)))
        .map_err(ce("start_all_gather a"))?;
    let gb = t
        .start_all_gather(CommKind::Attention, &pattern(r, 0, 3, len_a(r)))
        .map_err(ce("start_all_gather b"))?;
    let b = gb.wait().map_err(ce("wait b"))?;
    let a = ga.wait().map_err(ce("wait a"))?;
    ensure!(a.len() == n && b.len() == n, "nonblocking all_gather sizes");
    for q in 0..n {
        ensure!(
            a[q] == pattern(q, 0, 2, len_b(q)),
            "nonblocking a: entry {q} wrong"
        );
        ensure!(
            b[q] == pattern(q, 0, 3, len_a(q)),
            "nonblocking b: entry {q} wrong"
        );
    }
    Ok(())
}

fn reduce_input(rank: usize, i: usize) -> f32 {
    let sign = if (rank + i) & 1 == 0 { 1.0 } else { -1.0 };
    match i % 4 {
        0 => sign * 1.0e8 + rank as f32 * 0.37,
        1 => (rank as f32 + 1.0) * 1.1 + i as f32 * 1.0e-3,
        2 => sign * (i as f32 + 0.5) / (rank as f32 + 3.0),
        _ => 1.0e-7 * (rank * 7 + i) as f32 + 0.25,
    }
}

/// All-reduce equals the rank-order sum bit for bit, and every rank holds the
/// same bits.
pub fn check_all_reduce(t: &dyn Transport) -> Check {
    let (n, r) = (t.size(), t.rank());
    let m = 1031;
    let mut data: Vec<f32> = (0..m).map(|i| reduce_input(r, i)).collect();
    t.all_reduce_sum_f32(CommKind::GroupNorm, &mut data)
        .map_err(ce("all_reduce_sum_f32"))?;
    for (i, &got) in data.iter().enumerate() {
        let mut exp = reduce_input(0, i);
        for q in 1..n {
            exp += reduce_input(q, i);
        }
        ensure!(
            got.to_bits() == exp.to_bits(),
            "element {i}: got {got:e}, rank-order sum is {exp:e}"
        );
    }
    let all = t
        .all_gather(CommKind::Control, &f32_to_bytes(&data))
        .map_err(ce("all_gather of result"))?;
    for (q, b) in all.iter().enumerate() {
        ensure!(*b == all[0], "rank {q} holds different bits than rank 0");
    }
    let mut empty: Vec<f32> = Vec::new();
    t.all_reduce_sum_f32(CommKind::GroupNorm, &mut empty)
        .map_err(ce("empty all_reduce"))?;
    Ok(())
}

/// Broadcast from every root, of different lengths, and an invalid root.
pub fn check_broadcast(t: &dyn Transport) -> Check {
    let (n, r) = (t.size(), t.rank());
    for root in 0..n {
        let exp = pattern(root, 0, 40, 1000 + root * 17);
        let mut data = if r == root {
            exp.clone()
        } else {
            vec![0xAB; 3]
        };
        t.broadcast(CommKind::Control, root, &mut data)
            .map_err(ce("broadcast"))?;
        ensure!(data == exp, "broadcast from root {root}: wrong data");
    }
    let mut data = if r == 0 { Vec::new() } else { vec![1, 2, 3] };
    t.broadcast(CommKind::Control, 0, &mut data)
        .map_err(ce("zero-length broadcast"))?;
    ensure!(data.is_empty(), "zero-length broadcast left {data:?}");
    let mut data = vec![1];
    ensure!(
        t.broadcast(CommKind::Control, n, &mut data).is_err(),
        "broadcast from root {n} (out of range) did not fail"
    );
    Ok(())
}

/// Several barriers in a row complete on every rank.
pub fn check_barrier(t: &dyn Transport) -> Check {
    for i in 0..3 {
        t.barrier().map_err(ce(&format!("barrier {i}")))?;
    }
    Ok(())
}

fn run_sub_checks(sub: &dyn Transport, what: &str) -> Check {
    let checks: [NamedCheck; 6] = [
        ("rank_size", check_rank_size),
        ("ring_exchange", check_ring_exchange),
        ("all_gather", check_all_gather),
        ("all_reduce", check_all_reduce),
        ("broadcast", check_broadcast),
        ("barrier", check_barrier),
    ];
    for (name, check) in checks {
        check(sub).map_err(|e| {
            format!(
                "{what} (sub rank {}/{}): {name}: {e}",
                sub.rank(),
                sub.size()
            )
        })?;
    }
    Ok(())
}

fn check_layout(t: &dyn Transport, sub: &dyn Transport, colors: &[u32], keys: &[u32]) -> Check {
    let r = t.rank();
    let mut members: Vec<usize> = (0..t.size()).filter(|&q| colors[q] == colors[r]).collect();
    members.sort_by_key(|&q| (keys[q], q));
    let pos = members
        .iter()
        .position(|&q| q == r)
        .ok_or("not in own group")?;
    ensure!(
        sub.size() == members.len() && sub.rank() == pos,
        "sub rank/size {}/{}, expected {pos}/{}",
        sub.rank(),
        sub.size(),
        members.len()
    );
    let parents = sub
        .all_gather(CommKind::Control, &(r as u64).to_le_bytes())
        .map_err(ce("all_gather of parent ranks"))?;
    let parents: Vec<u64> = parents
        .iter()
        .map(|b| {
            b.as_slice()
                .try_into()
                .map(u64::from_le_bytes)
                .unwrap_or(u64::MAX)
        })
        .collect();
    let exp: Vec<u64> = members.iter().map(|&q| q as u64).collect();
    ensure!(parents == exp, "sub members {parents:?}, expected {exp:?}");
    Ok(())
}

/// Splits into odd/even (reversed key order), into groups of three (a
/// non-power-of-two layout), and a singleton; runs collectives inside; parent
/// and sub-group traffic with the same tag in flight at once do not collide;
/// sub-group traffic is not counted in the parent's stats.
pub fn check_split(t: &dyn Transport) -> Check {
    let (n, r) = (t.size(), t.rank());
    let (left, right) = neighbours(t);

    let colors: Vec<u32> = (0..n).map(|q| (q % 2) as u32).collect();
    let keys: Vec<u32> = (0..n).map(|q| (n - q) as u32).collect();
    let sub = t.split(colors[r], keys[r]).map_err(ce("parity split"))?;
    check_layout(t, sub.as_ref(), &colors, &keys)?;
    let parent_before = t.stats();
    run_sub_checks(sub.as_ref(), "parity split")?;
    ensure!(
        t.stats() == parent_before,
        "sub-group traffic changed the parent's stats"
    );

    let (sl, sr) = neighbours(sub.as_ref());
    let sr_rank = sub.rank();
    let parent_p = t
        .exchange(
            CommKind::Halo,
            50,
            vec![(right, pattern(r, right, 50, 64))],
            vec![(left, 64)],
        )
        .map_err(ce("parent exchange"))?;
    let sub_p = sub
        .exchange(
            CommKind::Halo,
            50,
            vec![(sr, pattern(1000 + sr_rank, sr, 50, 65))],
            vec![(sl, 65)],
        )
        .map_err(ce("sub exchange"))?;
    let got_sub = sub_p.wait().map_err(ce("sub wait"))?;
    let got_parent = parent_p.wait().map_err(ce("parent wait"))?;
    ensure!(
        got_sub[0] == pattern(1000 + sl, sub.rank(), 50, 65),
        "sub exchange with tag 50 got wrong data"
    );
    ensure!(
        got_parent[0] == pattern(left, r, 50, 64),
        "parent exchange with tag 50 got wrong data"
    );

    let nested = sub
        .split((sub.rank() % 2) as u32, 0)
        .map_err(ce("nested split"))?;
    run_sub_checks(nested.as_ref(), "nested split")?;

    let colors: Vec<u32> = (0..n).map(|q| (q / 3) as u32).collect();
    let keys = vec![0u32; n];
    let sub3 = t.split(colors[r], keys[r]).map_err(ce("split by three"))?;
    check_layout(t, sub3.as_ref(), &colors, &keys)?;
    run_sub_checks(sub3.as_ref(), "split by three")?;

    let colors: Vec<u32> = (0..n).map(|q| u32::from(q + 1 == n)).collect();
    let keys: Vec<u32> = (0..n).map(|q| (q * 5 % 3) as u32).collect();
    let last = t.split(colors[r], keys[r]).map_err(ce("singleton split"))?;
    check_layout(t, last.as_ref(), &colors, &keys)?;
    run_sub_checks(last.as_ref(), "singleton split")?;
    t.barrier().map_err(ce("barrier after split"))?;
    Ok(())
}

/// Stats after a known exchange equal the exact expected counts; every other
/// kind stays at zero; reset clears everything.
pub fn check_byte_accounting(t: &dyn Transport) -> Check {
    let r = t.rank();
    let (left, right) = neighbours(t);
    t.barrier().map_err(ce("barrier"))?;
    t.reset_stats();
    let got = t
        .exchange(
            CommKind::Halo,
            60,
            vec![(right, vec![3; 1000 + r]), (left, vec![4; 17])],
            vec![(left, 1000 + left), (right, 17)],
        )
        .and_then(|p| p.wait())
        .map_err(ce("halo exchange"))?;
    ensure!(got[0].len() == 1000 + left, "wrong halo length");
    t.exchange(
        CommKind::Attention,
        61,
        vec![(right, Vec::new())],
        vec![(left, 0)],
    )
    .and_then(|p| p.wait())
    .map_err(ce("empty attention exchange"))?;
    let s = t.stats();
    let halo = KindStats {
        bytes_sent: 1017 + r as u64,
        bytes_recvd: 1017 + left as u64,
        msgs_sent: 2,
        msgs_recvd: 2,
    };
    let attn = KindStats {
        bytes_sent: 0,
        bytes_recvd: 0,
        msgs_sent: 1,
        msgs_recvd: 1,
    };
    ensure!(
        s.get(CommKind::Halo) == halo,
        "halo stats {:?}, expected {halo:?}",
        s.get(CommKind::Halo)
    );
    ensure!(
        s.get(CommKind::Attention) == attn,
        "attention stats {:?}, expected {attn:?}",
        s.get(CommKind::Attention)
    );
    for k in [
        CommKind::GroupNorm,
        CommKind::Gather,
        CommKind::Control,
        CommKind::Other,
    ] {
        ensure!(
            s.get(k) == KindStats::default(),
            "{} stats not zero: {:?}",
            k.name(),
            s.get(k)
        );
    }
    ensure!(
        s.total().bytes_sent == halo.bytes_sent && s.total().msgs_recvd == 3,
        "totals {:?}",
        s.total()
    );
    t.reset_stats();
    ensure!(
        t.stats().total() == KindStats::default(),
        "reset did not clear"
    );

    let n = t.size() as u64;
    t.all_gather(CommKind::Gather, &[5; 100])
        .map_err(ce("all_gather"))?;
    let g = t.stats().get(CommKind::Gather);
    ensure!(
        g.bytes_sent >= 100 * (n - 1) && g.bytes_recvd >= 100 * (n - 1),
        "all_gather of 100 bytes over {n} ranks counted {g:?}"
    );
    ensure!(
        t.stats().get(CommKind::Halo) == KindStats::default(),
        "all_gather traffic counted as halo"
    );
    t.barrier().map_err(ce("final barrier"))?;
    Ok(())
}

/// A shorter and a longer message than posted are reported as errors naming
/// the peer and tag, and the transport keeps working afterwards. Rank 0 sends,
/// rank `1 % size` receives.
pub fn check_wrong_length(t: &dyn Transport) -> Check {
    let (n, r) = (t.size(), t.rank());
    let receiver = 1 % n;
    if r == 0 {
        let sends = vec![(receiver, vec![1; 10])];
        t.exchange(CommKind::Other, 70, sends, Vec::new())
            .and_then(|p| p.wait())
            .map_err(ce("send short"))?;
        let sends = vec![(receiver, vec![2; 14])];
        t.exchange(CommKind::Other, 71, sends, Vec::new())
            .and_then(|p| p.wait())
            .map_err(ce("send long"))?;
        let sends = vec![(receiver, vec![3; 12])];
        t.exchange(CommKind::Other, 72, sends, Vec::new())
            .and_then(|p| p.wait())
            .map_err(ce("send right length"))?;
    }
    if r == receiver {
        let short = t
            .exchange(CommKind::Other, 70, Vec::new(), vec![(0, 12)])
            .map_err(ce("post short"))?
            .wait();
        ensure!(
            matches!(
                short,
                Err(CommError::LengthMismatch {
                    peer: 0,
                    tag: 70,
                    expected: 12,
                    actual: 10,
                    ..
                })
            ),
            "10-byte message into a 12-byte receive gave {short:?}"
        );
        let long = t
            .exchange(CommKind::Other, 71, Vec::new(), vec![(0, 12)])
            .map_err(ce("post long"))?
            .wait();
        ensure!(
            matches!(
                long,
                Err(CommError::LengthMismatch {
                    peer: 0,
                    tag: 71,
                    expected: 12,
                    actual: 14,
                    ..
                }) | Err(CommError::Truncated {
                    peer: 0,
                    tag: 71,
                    expected: 12,
                    ..
                })
            ),
            "14-byte message into a 12-byte receive gave {long:?}"
        );
        let ok = t
            .exchange(CommKind::Other, 72, Vec::new(), vec![(0, 12)])
            .and_then(|p| p.wait())
            .map_err(ce("receive after errors"))?;
        ensure!(ok == vec![vec![3; 12]], "receive after errors got {ok:?}");
    }
    t.barrier().map_err(ce("final barrier"))
}
