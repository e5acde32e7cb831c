//! Robustness of the model-folder loader against damaged files: many seeded random mutations of a
//! component's `config.json` and of its safetensors header (bytes changed, lengths cut, the header
//! length field corrupted). Loading must return `Ok` or an error naming the file; it must never
//! panic. (The same property is explored open-endedly by the cargo-fuzz target in `fuzz/`.)

use std::fs;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;

use pcpp_kernels::DType;
use pcpp_sdxl::VaeDecoder;
use pcpp_tests::tiny_model;

/// xorshift64*: a small deterministic generator so every run tries the same mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn mutate(rng: &mut Rng, bytes: &mut Vec<u8>, region: usize) {
    match rng.below(4) {
        0 => {
            let i = rng.below(region);
            let alphabet = b" {}[]\":,0123456789eE-+.aZ\xff";
            bytes[i] = alphabet[rng.below(alphabet.len())];
        }
        1 => {
            let i = rng.below(region);
            bytes.truncate(i.max(1));
        }
        2 => {
            let i = rng.below(region);
            bytes[i] = rng.next() as u8;
        }
        _ => {
            let i = rng.below(region);
            let digits = b"98765432109876543210";
            for (k, d) in digits.iter().enumerate().take(rng.below(12) + 1) {
                if i + k < bytes.len() {
                    bytes[i + k] = *d;
                }
            }
        }
    }
}

fn dir(case: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("pcpp-robust-{}-{case}", std::process::id()));
    fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn damaged_vae_files_never_panic() {
    let src = tiny_model().join("vae");
    let config = fs::read(src.join("config.json")).unwrap();
    let weights = fs::read(src.join("diffusion_pytorch_model.safetensors")).unwrap();
    let header_len = 8 + u64::from_le_bytes(weights[..8].try_into().unwrap()) as usize;
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let (mut ok, mut errors) = (0, 0);
    for i in 0..240 {
        let d = dir(&format!("{}", i % 4));
        let (mut c, mut w) = (config.clone(), weights.clone());
        if i % 2 == 0 {
            let n = c.len();
            mutate(&mut rng, &mut c, n);
        } else {
            mutate(&mut rng, &mut w, header_len);
        }
        fs::write(d.join("config.json"), &c).unwrap();
        fs::write(d.join("diffusion_pytorch_model.safetensors"), &w).unwrap();
        let r = catch_unwind(AssertUnwindSafe(|| {
            VaeDecoder::load(&d, DType::F32).map(|_| ())
        }));
        match r {
            Ok(Ok(())) => ok += 1,
            Ok(Err(e)) => {
                let msg = e.to_string();
                assert!(
                    msg.contains(d.to_str().unwrap()),
                    "mutation {i}: error does not name the file: {msg}"
                );
                errors += 1;
            }
            Err(_) => panic!("mutation {i} panicked the loader"),
        }
    }
    assert!(
        errors > 100,
        "most mutations must be rejected ({ok} loaded, {errors} errors)"
    );
}
