//! Runs the [`pcpp_comm::conformance`] suite on [`LocalTransport`] worlds of
//! several sizes, plus negative tests of the failure paths PCPP relies on to
//! not hang: wrong-length receives, `abort`, timeouts, invalid peers and
//! dropped unwaited exchanges.

use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use pcpp_comm::conformance::run_local;
use pcpp_comm::{CommError, CommKind, LocalTransport, Transport, TransportOptions};

fn opts() -> TransportOptions {
    TransportOptions::with_timeout(Duration::from_secs(60))
}

#[test]
fn conformance_n1() {
    run_local(1, opts()).unwrap();
}

#[test]
fn conformance_n2() {
    run_local(2, opts()).unwrap();
}

#[test]
fn conformance_n3() {
    run_local(3, opts()).unwrap();
}

#[test]
fn conformance_n4() {
    run_local(4, opts()).unwrap();
}

#[test]
fn conformance_n8() {
    run_local(8, opts()).unwrap();
}

#[test]
fn default_timeout_is_120s() {
    assert_eq!(
        TransportOptions::default().timeout,
        Duration::from_secs(120)
    );
}

#[test]
fn wrong_length_receive_is_an_error_naming_peer_and_tag() {
    let w = LocalTransport::create(2, opts());
    let p = w[0]
        .exchange(CommKind::Halo, 7, vec![(1, vec![0; 10])], vec![])
        .unwrap();
    assert!(p.wait().unwrap().is_empty());
    let err = w[1]
        .exchange(CommKind::Halo, 7, vec![], vec![(0, 12)])
        .unwrap()
        .wait()
        .unwrap_err();
    assert_eq!(
        err,
        CommError::LengthMismatch {
            op: "exchange",
            peer: 0,
            tag: 7,
            expected: 12,
            actual: 10
        }
    );
    let msg = err.to_string();
    assert!(msg.contains("peer 0") && msg.contains("tag 7"), "{msg}");
}

#[test]
fn abort_unblocks_a_waiting_rank() {
    let w = LocalTransport::create(3, TransportOptions::with_timeout(Duration::from_secs(600)));
    let waiter = w[1].clone();
    let start = Instant::now();
    let h = thread::spawn(move || {
        waiter
            .exchange(CommKind::Control, 3, vec![], vec![(2, 4)])
            .unwrap()
            .wait()
    });
    thread::sleep(Duration::from_millis(100));
    w[0].abort("rank 0 failed");
    let err = h.join().unwrap().unwrap_err();
    assert!(start.elapsed() < Duration::from_secs(10));
    match err {
        CommError::Aborted {
            by_rank,
            reason,
            peer,
            tag,
            ..
        } => {
            assert_eq!((by_rank, peer, tag), (0, 2, 3));
            assert_eq!(reason, "rank 0 failed");
        }
        e => panic!("unexpected error {e:?}"),
    }
    // Future operations, also on split sub-transports' world, fail at once.
    let err = w[2].barrier().unwrap_err();
    assert!(
        matches!(err, CommError::Aborted { by_rank: 0, .. }),
        "{err:?}"
    );
}

#[test]
fn abort_reaches_sub_transports() {
    let w = LocalTransport::create(2, opts());
    let subs: Vec<Arc<dyn Transport>> = thread::scope(|s| {
        let hs: Vec<_> = w
            .iter()
            .map(|t| s.spawn(move || t.split(0, 0).unwrap()))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let sub1 = subs[1].clone();
    let h = thread::spawn(move || {
        sub1.exchange(CommKind::Other, 1, vec![], vec![(0, 1)])
            .unwrap()
            .wait()
    });
    thread::sleep(Duration::from_millis(50));
    subs[0].abort("sub abort");
    let err = h.join().unwrap().unwrap_err();
    assert!(
        matches!(err, CommError::Aborted { by_rank: 0, .. }),
        "{err:?}"
    );
    assert!(w[1].barrier().is_err());
}

#[test]
fn timeout_fires_with_short_timeout() {
    let w = LocalTransport::create(
        2,
        TransportOptions::with_timeout(Duration::from_millis(200)),
    );
    let start = Instant::now();
    let err = w[0]
        .exchange(CommKind::Attention, 42, vec![], vec![(1, 8)])
        .unwrap()
        .wait()
        .unwrap_err();
    let elapsed = start.elapsed();
    match err {
        CommError::Timeout {
            op,
            peer,
            tag,
            waited,
        } => {
            assert_eq!((op, peer, tag), ("exchange", 1, 42));
            assert!(waited >= Duration::from_millis(200));
        }
        e => panic!("unexpected error {e:?}"),
    }
    assert!(elapsed < Duration::from_secs(5));
    // A collective whose peer never shows up times out too.
    assert!(matches!(
        w[0].barrier(),
        Err(CommError::Timeout { op: "barrier", .. })
    ));
}

#[test]
fn invalid_peer_is_rejected() {
    let w = LocalTransport::create(2, opts());
    let err = w[0]
        .exchange(CommKind::Halo, 5, vec![(2, vec![1])], vec![])
        .unwrap_err();
    assert_eq!(
        err,
        CommError::InvalidRank {
            op: "exchange",
            peer: 2,
            tag: 5,
            size: 2
        }
    );
}

#[test]
fn dropped_pending_cancels_its_receives() {
    let w = LocalTransport::create(2, opts());
    // Receive posted and dropped before the message arrives.
    let dropped = w[1]
        .exchange(CommKind::Halo, 9, vec![], vec![(0, 3)])
        .unwrap();
    assert!(!dropped.is_complete());
    drop(dropped);
    w[0].exchange(CommKind::Halo, 9, vec![(1, vec![1; 3])], vec![])
        .unwrap()
        .wait()
        .unwrap();
    // Message arrives before the receive is dropped.
    w[0].exchange(CommKind::Halo, 9, vec![(1, vec![2; 3])], vec![])
        .unwrap()
        .wait()
        .unwrap();
    let dropped = w[1]
        .exchange(CommKind::Halo, 9, vec![], vec![(0, 3)])
        .unwrap();
    assert!(dropped.is_complete());
    drop(dropped);
    // The next receive with the same tag gets the next message, not a stale one.
    w[0].exchange(CommKind::Halo, 9, vec![(1, vec![3; 3])], vec![])
        .unwrap()
        .wait()
        .unwrap();
    let got = w[1]
        .exchange(CommKind::Halo, 9, vec![], vec![(0, 3)])
        .unwrap()
        .wait()
        .unwrap();
    assert_eq!(got, vec![vec![3; 3]]);
}

#[test]
fn conformance_detects_a_broken_world() {
    // A world whose rank 1 never takes part: rank 0's suite must fail with a
    // timeout rather than hang or pass.
    let w = LocalTransport::create(
        2,
        TransportOptions::with_timeout(Duration::from_millis(300)),
    );
    let err = pcpp_comm::conformance::run_all(w[0].as_ref()).unwrap_err();
    assert!(err.contains("timed out"), "{err}");
}

#[test]
fn stats_snapshot_is_exportable() {
    let w = LocalTransport::create(1, opts());
    w[0].exchange(
        CommKind::GroupNorm,
        1,
        vec![(0, vec![0; 24])],
        vec![(0, 24)],
    )
    .unwrap()
    .wait()
    .unwrap();
    let rows = w[0].stats().rows();
    assert!(rows.contains(&("group_norm", 24, 24)));
    assert!(rows.contains(&("total", 24, 24)));
}
