//! `pcpp-cli generate --transport ucx` with 4 ranks as separate processes over loopback (feature
//! `ucx`, TCP rendezvous through `PCPP_UCX_ROOT`): the same latents as `--transport local`.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;

use pcpp_kernels::io::load_all;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("pcpp-cli-ucx-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

fn args(tag: &str, extra: &[&str]) -> (Vec<String>, PathBuf) {
    let noise = repo().join("tests/data/refs-tiny-sdxl/pipeline_euler.safetensors");
    let lat = tmp(&format!("{tag}.safetensors"));
    let mut v: Vec<String> = [
        "generate",
        "--prompt",
        "A painting of a squirrel eating a burger",
        "--steps",
        "5",
        "--warmup-steps",
        "2",
        "--height",
        "64",
        "--width",
        "64",
        "--init-noise",
        noise.to_str().unwrap(),
        "--save-latents",
        lat.to_str().unwrap(),
        "--output",
        tmp(&format!("{tag}.png")).to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.extend(extra.iter().map(|s| s.to_string()));
    (v, lat)
}

#[test]
fn ucx_generate_with_four_processes_equals_local() {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let n = 4;
    let (a, lat) = args("ucx4", &["--transport", "ucx"]);
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
    let (l, llat) = args("local4", &["--ranks", "4"]);
    let o = Command::new(env!("CARGO_BIN_EXE_pcpp-cli"))
        .args(&l)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let x = load_all(&lat).unwrap().remove("latents").unwrap();
    let y = load_all(&llat).unwrap().remove("latents").unwrap();
    assert_eq!(x.max_abs_diff(&y).unwrap(), 0.0, "ucx and local differ");
}
