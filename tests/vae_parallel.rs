//! The patch-parallel VAE decode over N ranks as threads: rank 0's image equals the serial decode
//! and every rank's band equals the serial image's rows (f32, ≤ 1e-5 of max|ref|) for 2, 3, 4 and
//! 8 ranks, bands uneven included; the bytes each rank's report counts equal the plan's formula
//! (`docs/parallelism.md`) and the transport's own counters; the registered layers are the
//! decoder inventory's; one rank is the plain serial decode.

use std::path::Path;
use std::sync::Arc;

use pcpp_comm::{LocalTransport, Transport, TransportOptions};
use pcpp_core::{RunReport, SerialFactory, Traffic};
use pcpp_kernels::{DType, Device, Tensor};
use pcpp_sdxl::vae_parallel::{decode_plan, decoder_inventory, latent_band};
use pcpp_sdxl::weights::Weights;
use pcpp_sdxl::{decode_bands, decode_runtime, decode_to_root, VaeConfig, VaeDecoder};
use pcpp_tests::{assert_close, tiny_model, TOL_RANKS};

type BoxErr = Box<dyn std::error::Error + Send + Sync>;

fn pattern(shape: &[usize], seed: f32) -> Tensor {
    let n: usize = shape.iter().product();
    let v = (0..n)
        .map(|i| ((i as f32 * 0.618_034 + seed).sin() * 43_758.547).fract() * 2.0)
        .collect();
    Tensor::from_vec(shape, v).expect("pattern")
}

/// A decoder to build on every rank.
#[derive(Clone, Copy)]
enum Model {
    /// The tiny SDXL VAE (2 blocks: latent ×1, ×2).
    Tiny,
    /// Random weights for a 4-block decoder (latent ×1, ×2, ×4, ×8), small channels.
    Deep,
}

const DEEP_CONFIG: &str = r#"{
    "block_out_channels": [8, 16, 16, 16],
    "layers_per_block": 1,
    "latent_channels": 4,
    "out_channels": 3,
    "norm_num_groups": 8,
    "scaling_factor": 0.13025
}"#;

impl Model {
    fn config(self) -> VaeConfig {
        match self {
            Model::Tiny => {
                VaeConfig::from_file(&tiny_model().join("vae/config.json")).expect("config")
            }
            Model::Deep => {
                let c: VaeConfig = serde_json::from_str(DEEP_CONFIG).expect("config");
                c.validate(Path::new("deep vae")).expect("valid");
                c
            }
        }
    }

    fn build(self, f: &dyn pcpp_core::LayerFactory) -> Result<VaeDecoder, BoxErr> {
        Ok(match self {
            Model::Tiny => {
                VaeDecoder::load_with(&tiny_model().join("vae"), DType::F32, Device::Cpu, f)?
            }
            Model::Deep => {
                let w = Weights::random_every(Path::new("deep vae"), DType::F32, 7);
                VaeDecoder::build(self.config(), &w, f)?
            }
        })
    }
}

struct RankOut {
    image: Option<Tensor>,
    band: Tensor,
    report: RunReport,
    slots: Vec<String>,
    /// The transports' own counters (group and world), per kind.
    transport: Traffic,
}

/// On `n` ranks: the decode to rank 0 (its report and transport counters), then each rank's band
/// alone.
fn run_ranks(model: Model, n: usize, latents: &Tensor) -> Vec<RankOut> {
    let (h, w) = (latents.shape()[2], latents.shape()[3]);
    LocalTransport::run(n, TransportOptions::default(), |t: Arc<dyn Transport>| {
        let rt = decode_runtime(t, &model.config(), h, w)?;
        let vae = model.build(rt.factory())?;
        let image = decode_to_root(&vae, &rt, latents)?;
        let report = rt.report();
        let transport = rt.transport_traffic();
        let band = decode_bands(&vae, &rt, &latent_band(&rt, latents)?)?;
        Ok::<_, BoxErr>(RankOut {
            image,
            band,
            report,
            slots: rt.slot_ids(),
            transport,
        })
    })
    .unwrap_or_else(|e| panic!("{n} ranks: {e}"))
}

fn serial_image(model: Model, latents: &Tensor) -> Tensor {
    let vae = model.build(&SerialFactory).expect("serial vae");
    vae.decode(latents).expect("serial decode")
}

/// Decodes `latents` on 2, 3, 4 and 8 ranks and checks the image, the bands, the bytes and the
/// registered layers.
fn check(model: Model, latents: &Tensor) {
    let cfg = model.config();
    let want = serial_image(model, latents);
    let (b, h, w) = (latents.shape()[0], latents.shape()[2], latents.shape()[3]);
    let scale = 1usize << cfg.levels();
    let inventory = decoder_inventory(&cfg);
    for n in [2, 3, 4, 8] {
        let outs = run_ranks(model, n, latents);
        let plan = decode_plan(&cfg, h, w, n, b, 4).expect("plan");
        let mut start = 0;
        for (r, o) in outs.iter().enumerate() {
            let what = format!("latent {h}×{w}, {n} ranks, rank {r}");
            match (&o.image, r) {
                (Some(img), 0) => assert_close(&format!("{what}: image"), img, &want, TOL_RANKS),
                (None, 0) => panic!("{what}: no image on rank 0"),
                (Some(_), _) => panic!("{what}: an image on a rank other than 0"),
                (None, _) => {}
            }
            // Band r holds the rows of latent band r, scaled to the image.
            let rows = (h / n + usize::from(r < h % n)) * scale;
            let want_band = want.narrow(2, start, rows).expect("rows");
            assert_close(&format!("{what}: band"), &o.band, &want_band, TOL_RANKS);
            start += rows;
            // One synchronous step, whose bytes are the plan's, by kind, sent and received.
            let steps = &o.report.steps;
            assert_eq!(steps.len(), 1, "{what}: steps");
            assert!(steps[0].sync, "{what}: synchronous");
            assert_eq!(steps[0].traffic, plan.ranks[r].warmup, "{what}: bytes");
            assert_eq!(o.report.total, plan.ranks[r].warmup, "{what}: total");
            assert_eq!(o.transport, o.report.total, "{what}: transport counters");
            let t = &o.report.total;
            assert!(t.recvd.halo > 0 && t.recvd.group_norm > 0, "{what}: {t:?}");
            assert_eq!(t.recvd.attention > 0, cfg.mid_block_add_attention, "{what}");
            assert_eq!(t.recvd.gather > 0, r == 0, "{what}: gather received");
            assert_eq!(t.sent.gather > 0, r != 0, "{what}: gather sent");
            assert_eq!(o.slots, inventory.slot_ids(), "{what}: registered layers");
        }
        assert_eq!(start, h * scale, "bands cover the image");
    }
}

#[test]
fn tiny_vae_decode_over_2_3_4_8_ranks_equals_serial_and_moves_the_planned_bytes() {
    // 11 latent rows: uneven for every rank count.
    check(Model::Tiny, &pattern(&[1, 4, 11, 6], 0.25));
    // 24 rows: even for every rank count.
    check(Model::Tiny, &pattern(&[1, 4, 24, 5], 0.5));
}

#[test]
fn four_level_decoder_with_batch_two_equals_serial_and_moves_the_planned_bytes() {
    check(Model::Deep, &pattern(&[2, 4, 11, 3], 0.75));
}

#[test]
fn one_rank_is_the_plain_serial_decode() {
    let latents = pattern(&[1, 4, 5, 4], 1.0);
    let want = serial_image(Model::Tiny, &latents);
    let outs = run_ranks(Model::Tiny, 1, &latents);
    let img = outs[0].image.as_ref().expect("image on rank 0");
    assert_eq!(img.max_abs_diff(&want).expect("diff"), 0.0);
    assert_eq!(outs[0].band.max_abs_diff(&want).expect("diff"), 0.0);
    assert_eq!(outs[0].report.total, Traffic::default());
}

#[test]
fn more_ranks_than_latent_rows_is_an_error() {
    let cfg = Model::Tiny.config();
    let err = LocalTransport::run(8, TransportOptions::default(), |t| {
        decode_runtime(t, &cfg, 4, 4).map(|_| ())
    })
    .expect_err("8 ranks on 4 latent rows");
    assert!(err.to_string().contains("band would be empty"), "{err}");
    assert!(decode_plan(&cfg, 4, 4, 8, 1, 4).is_err());
}

#[test]
fn sdxl_decode_plan_matches_the_closed_form() {
    // SDXL's VAE (channels 128, 256, 512, 512; 3 ResNets per decoder block; 32 groups) at 1024²
    // (latent 128²) over 8 ranks, bf16 activations, one image.
    let path = pcpp_tests::repo().join("models/sdxl-base-1.0-configs/vae/config.json");
    let cfg = VaeConfig::from_file(&path).expect("config");
    let (n, e) = (8u64, 2u64);
    let plan = decode_plan(&cfg, 128, 128, n as usize, 1, e as usize).expect("plan");
    let inv = decoder_inventory(&cfg);
    let count = |f: &dyn Fn(&pcpp_core::LayerKind) -> bool| {
        inv.layers.iter().filter(|l| f(&l.kind)).count()
    };
    assert_eq!(
        count(&|k| matches!(k, pcpp_core::LayerKind::Conv { .. })),
        33
    );
    assert_eq!(
        count(&|k| matches!(k, pcpp_core::LayerKind::GroupNorm { .. })),
        30
    );
    assert_eq!(
        count(&|k| matches!(k, pcpp_core::LayerKind::SelfAttention { .. })),
        1
    );
    // Σ C_in·W over the 3×3 convolutions, level by level (W = 128, 256, 512, 1024):
    // conv_in, mid ResNets and up block 0 at the latent's width; each up-sampler conv one level
    // finer; conv_out at the image's.
    let c_w: u64 = (4 + 4 * 512 + 6 * 512) * 128
        + (512 + 6 * 512) * 256
        + (512 + 512 + 5 * 256) * 512
        + (256 + 256 + 5 * 128 + 128) * 1024;
    assert_eq!(c_w, 4_063_744);
    let tokens = 128 * 128 / n;
    for r in &plan.ranks {
        let (i, t) = (r.world_rank, &r.warmup);
        let what = format!("rank {i}");
        // One halo row from each neighbour per convolution, sent symmetrically.
        let neighbours = 2 - u64::from(i == 0) - u64::from(i == 7);
        assert_eq!(t.recvd.halo, neighbours * c_w * e, "{what}");
        assert_eq!(t.sent.halo, t.recvd.halo, "{what}");
        // Mean and centred sum of squares per group, f32, to and from every other rank.
        assert_eq!(t.recvd.group_norm, 30 * (n - 1) * 32 * 2 * 4, "{what}");
        assert_eq!(t.sent.group_norm, t.recvd.group_norm, "{what}");
        // Every other band's K and V (512 channels each).
        assert_eq!(t.recvd.attention, (n - 1) * tokens * 2 * 512 * e, "{what}");
        assert_eq!(t.sent.attention, (n - 1) * tokens * 2 * 512 * e, "{what}");
        // The RGB bands (128 image rows each) to rank 0.
        let band = 128 * 1024 * 3 * e;
        let (sent, recvd) = if i == 0 {
            (0, (n - 1) * band)
        } else {
            (band, 0)
        };
        assert_eq!((t.sent.gather, t.recvd.gather), (sent, recvd), "{what}");
        assert_eq!(r.warmup, r.steady, "{what}: one pass");
    }
}
