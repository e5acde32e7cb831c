//! `pcpp-cli generate --transport ucx` with 4 ranks as separate processes over loopback (feature
//! `ucx`, TCP rendezvous through `PCPP_UCX_ROOT`): the same latents as `--transport local`.

mod common;

use std::net::TcpListener;
use std::process::Command;

use common::{gen_args, latents};

#[test]
fn ucx_generate_with_four_processes_equals_local() {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let n = 4;
    let (a, lat) = gen_args("ucx4", 5, &["--transport", "ucx", "--warmup-steps", "2"]);
    let children: Vec<_> = (0..n)
        .map(|r| {
            Command::new(env!("CARGO_BIN_EXE_pcpp-cli"))
                .args(&a)
                .env("PCPP_UCX_ROOT", format!("127.0.0.1:{port}"))
                .env("PCPP_RANK", r.to_string())
                .env("PCPP_WORLD_SIZE", n.to_string())
                .env("UCX_TLS", "tcp,self")
                .env("UCX_NET_DEVICES", "lo")
                .spawn()
                .unwrap()
        })
        .collect();
    for (r, c) in children.into_iter().enumerate() {
        let o = c.wait_with_output().unwrap();
        assert!(o.status.success(), "rank {r} failed");
    }
    let (l, llat) = gen_args("ucx-local4", 5, &["--ranks", "4", "--warmup-steps", "2"]);
    let o = Command::new(env!("CARGO_BIN_EXE_pcpp-cli"))
        .args(&l)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (x, y) = (latents(&lat), latents(&llat));
    assert_eq!(x.max_abs_diff(&y).unwrap(), 0.0, "ucx and local differ");
}
