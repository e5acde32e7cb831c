//! `pcpp-cli decode-bench`: times one rank's part of the patch-parallel VAE decode — the very
//! library call `generate` makes after the last denoising step ([`pcpp_sdxl::vae_parallel`]'s
//! `decode_bands`, the decoder built through the one-pass runtime) — measured alone on one device.
//!
//! Rank `r` of `N` runs over a [`SoloTransport`]: the same bands, halos, exact group-norm
//! statistics and mid-block K/V gather as in a real run, with the same byte accounting, but
//! nothing is delivered (receives read zeros), so the time is this rank's computation and the peak
//! memory this rank's own. `--ranks 1` times the serial decode of the whole image. The modelled
//! multi-GPU decode (`scripts/model-decode.py`) combines these times with the bytes.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Parser;
use pcpp_comm::{SoloTransport, Transport, TransportOptions};
use pcpp_kernels::{DType, Device, Tensor};
use pcpp_sdxl::vae::{VaeConfig, VaeDecoder};
use pcpp_sdxl::vae_parallel::{
    decode_bands, decode_runtime, decode_runtime_with_group, decoder_inventory,
};

use crate::args::DeviceArg;
use crate::bench::median;

/// Arguments of `pcpp-cli decode-bench`.
#[derive(Debug, Clone, Parser)]
pub struct DecodeBenchArgs {
    /// Diffusers pipeline folder whose `vae/` decoder is timed.
    #[arg(long, default_value = "models/tiny-sdxl")]
    pub model: PathBuf,
    /// Image height in pixels (a multiple of the VAE's scale factor).
    #[arg(long, default_value_t = 1024)]
    pub height: usize,
    /// Image width in pixels (a multiple of the VAE's scale factor).
    #[arg(long, default_value_t = 1024)]
    pub width: usize,
    /// Ranks the image is split over; each rank's decode is timed alone on this device.
    #[arg(long, default_value_t = 1)]
    pub ranks: usize,
    /// Time only this rank (default: every rank, one after another).
    #[arg(long)]
    pub rank: Option<usize>,
    /// Where the decoder runs (`cuda`: GPU 0; needs a build with `--features cuda`).
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: DeviceArg,
    /// The decoder's dtype (default as `generate` chooses it for an f16 run on a GPU: f32 with
    /// TF32 convolutions when the VAE's config says `force_upcast`; f32 on the CPU).
    #[arg(long)]
    pub vae_dtype: Option<DType>,
    /// Untimed decodes before measuring.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Timed decodes.
    #[arg(long, default_value_t = 3)]
    pub iters: usize,
    /// Print one JSON line per rank instead of text.
    #[arg(long)]
    pub json: bool,
}

/// What one rank measured.
struct RankDecode {
    rank: usize,
    latent_rows: usize,
    /// Synchronous exchanges of one decode (halo convolutions, group norms, the attention): each
    /// waits for its data, so each pays the link's latency once.
    exchanges: usize,
    ms: f64,
    peak_bytes: Option<u64>,
    weight_bytes: Option<u64>,
    traffic: pcpp_core::Traffic,
}

/// Runs the per-rank decode benchmark.
pub fn run(a: DecodeBenchArgs) -> Result<()> {
    a.device.check_built()?;
    let device = a.device.device(0);
    if a.ranks == 0 || a.iters == 0 {
        bail!("--ranks and --iters must be at least 1");
    }
    if let Some(r) = a.rank {
        if r >= a.ranks {
            bail!("--rank {r}: must be below --ranks {}", a.ranks);
        }
    }
    let vae_dir = a.model.join("vae");
    let config_path = vae_dir.join("config.json");
    let config = VaeConfig::from_file(&config_path)
        .with_context(|| format!("reading {}", config_path.display()))?;
    let f = 1usize << config.levels();
    if a.height % f != 0 || a.width % f != 0 || a.height == 0 || a.width == 0 {
        bail!(
            "--height {} --width {}: must be positive multiples of the VAE's scale factor {f}",
            a.height,
            a.width
        );
    }
    let (lh, lw) = (a.height / f, a.width / f);
    if a.ranks > lh {
        bail!(
            "--ranks {}: more ranks than the {lh} latent rows of a {}-pixel-high image",
            a.ranks,
            a.height
        );
    }
    let dtype = a.vae_dtype.unwrap_or(match device {
        Device::Cpu => DType::F32,
        Device::Cuda(_) => pcpp_sdxl::generation::vae_dtype(&config, DType::F16),
    });
    if dtype == DType::F32 && device != Device::Cpu {
        pcpp_kernels::set_tf32(device, true)?;
    }
    let ranks: Vec<usize> = match a.rank {
        Some(r) => vec![r],
        None => (0..a.ranks).collect(),
    };
    for &r in &ranks {
        let res = run_rank(&a, &config, r, (lh, lw), dtype, device)
            .with_context(|| format!("rank {r} of {}", a.ranks))?;
        print_result(&a, &res, dtype, device, (lh, lw));
    }
    Ok(())
}

fn print_result(
    a: &DecodeBenchArgs,
    res: &RankDecode,
    dtype: DType,
    device: Device,
    (lh, lw): (usize, usize),
) {
    if a.json {
        let v = serde_json::json!({
            "bench": "vae_decode",
            "ranks": a.ranks,
            "rank": res.rank,
            "image_hw": [a.height, a.width],
            "latent_hw": [lh, lw],
            "latent_rows": res.latent_rows,
            "dtype": dtype.to_string(),
            "device": device.to_string(),
            "iters": a.iters,
            "exchanges": res.exchanges,
            "decode_ms": res.ms,
            "peak_bytes": res.peak_bytes,
            "weight_bytes": res.weight_bytes,
            "sent_bytes": res.traffic.sent.total(),
            "recvd_bytes": res.traffic.recvd.total(),
            "traffic": res.traffic,
        });
        println!("{v}");
    } else {
        let peak = res
            .peak_bytes
            .map(|p| format!(", peak {:.2} GiB", p as f64 / (1u64 << 30) as f64))
            .unwrap_or_default();
        println!(
            "decode rank {}/{} ({} of {lh} latent rows, {}×{} image, {dtype} on {device}): {:.3} ms{peak}; sends {} B, receives {} B",
            res.rank,
            a.ranks,
            res.latent_rows,
            a.height,
            a.width,
            res.ms,
            res.traffic.sent.total(),
            res.traffic.recvd.total()
        );
    }
}

fn run_rank(
    a: &DecodeBenchArgs,
    config: &VaeConfig,
    rank: usize,
    (lh, lw): (usize, usize),
    dtype: DType,
    device: Device,
) -> Result<RankDecode> {
    let ordinal = match device {
        Device::Cuda(o) => o,
        Device::Cpu => 0,
    };
    let world: Arc<dyn Transport> =
        SoloTransport::new(rank, a.ranks, TransportOptions::default())?.with_device(ordinal);
    let runtime = if a.ranks == 1 {
        decode_runtime(world, config, lh, lw)?
    } else {
        let group: Arc<dyn Transport> =
            SoloTransport::new(rank, a.ranks, TransportOptions::default())?.with_device(ordinal);
        decode_runtime_with_group(world, group, config, lh, lw)?
    };
    pcpp_kernels::synchronize(device)?;
    pcpp_kernels::reset_memory_high_water(device)?;
    let vae = VaeDecoder::load_with(&a.model.join("vae"), dtype, device, runtime.factory())?;
    pcpp_kernels::synchronize(device)?;
    let weight_bytes = pcpp_kernels::memory_high_water(device)?.map(|(alloc, _)| alloc);
    let plan = runtime.band_plan();
    let me = if runtime.is_serial() {
        0
    } else {
        runtime.grid().patch()
    };
    let rows = plan.band(plan.levels, me).len();
    let band = Tensor::rand_uniform(
        &[1, config.latent_channels, rows, lw],
        dtype,
        device,
        (-1.0, 1.0),
        rank as u64,
    )?;
    let mut times = Vec::new();
    for k in 0..a.warmup + a.iters {
        pcpp_kernels::synchronize(device)?;
        let t = Instant::now();
        let rgb = decode_bands(&vae, &runtime, &band)?;
        pcpp_kernels::synchronize(device)?;
        let ms = t.elapsed().as_secs_f64() * 1e3;
        drop(rgb);
        if k >= a.warmup {
            times.push(ms);
        }
    }
    // The report holds the last decode as its only step.
    let traffic = runtime.report().total;
    let peak_bytes = pcpp_kernels::memory_high_water(device)?.map(|(alloc, _)| alloc);
    Ok(RankDecode {
        rank,
        latent_rows: rows,
        exchanges: decoder_inventory(config).layers.len().saturating_sub(1),
        ms: median(times),
        peak_bytes,
        weight_bytes,
        traffic,
    })
}
