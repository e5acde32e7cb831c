//! `pcpp-cli bench`: times one UNet forward on the CPU (the serial model that PCPP §2 splits into
//! patches; no paper section of its own), for the CPU comparison with diffusers in
//! `docs/benchmarks.md`. With `--parallel`, `--ranks` or `--device cuda` it times one rank's
//! steady patch-parallel step instead ([`crate::band_bench`]).
//!
//! The model comes from a diffusers folder (`--model DIR`, default the tiny SDXL test model) or
//! from a config alone with seeded random weights (`--config DIR/unet/config.json
//! --random-weights`). Inputs are seeded random tensors of the requested shape (values do not change
//! the work done). Each iteration is a complete forward, including the cross-attention K/V of the
//! text conditioning, as one `UNet2DConditionModel.forward` call in diffusers.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Parser;
use pcpp_core::{ParallelMode, SerialFactory, StepCtx};
use pcpp_kernels::cpu::profile;
use pcpp_kernels::{DType, Tensor};
use pcpp_sdxl::{UNet, UNetCond};

use crate::generate::DeviceArg;

/// Arguments of `pcpp-cli bench`.
#[derive(Debug, Clone, Parser)]
pub struct Args {
    /// Diffusers pipeline folder whose `unet/` is timed (ignored with --config).
    #[arg(long, default_value = "models/tiny-sdxl")]
    pub model: PathBuf,
    /// A UNet `config.json` to build instead of --model (needs --random-weights).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Seeded random weights built from the config (of --config, else of --model's `unet/`); a
    /// `tensor_manifest.json` next to the config fixes the exact names and shapes.
    #[arg(long)]
    pub random_weights: bool,
    /// Seed of the random weights and inputs.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Latent height (rows of the UNet input).
    #[arg(long, default_value_t = 32)]
    pub height: usize,
    /// Latent width (columns of the UNet input).
    #[arg(long, default_value_t = 24)]
    pub width: usize,
    /// Batch size (2 = one classifier-free-guidance pair).
    #[arg(long, default_value_t = 2)]
    pub batch: usize,
    /// Text tokens of the conditioning.
    #[arg(long, default_value_t = 77)]
    pub tokens: usize,
    /// CPU threads (default: all available cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Untimed forwards before measuring.
    #[arg(long, default_value_t = 5)]
    pub warmup: usize,
    /// Timed forwards.
    #[arg(long, default_value_t = 50)]
    pub iters: usize,
    /// Print one JSON line instead of text.
    #[arg(long)]
    pub json: bool,
    /// Also print the mean time per kernel kind of the timed forwards (to stderr; on a GPU, the GPU
    /// time of each op kind of the timed eager steps).
    #[arg(long)]
    pub profile: bool,
    /// Where the UNet runs (`cuda`: GPU 0; needs a build with `--features cuda`).
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: DeviceArg,
    /// Storage dtype of weights and activations (default f32 on the CPU, f16 on a GPU).
    #[arg(long)]
    pub dtype: Option<DType>,
    /// Patch-parallel scheme whose per-rank steady step is timed: pcpp, distrifusion,
    /// naive-patch or serial (the whole image).
    #[arg(long, default_value = "serial")]
    pub parallel: ParallelMode,
    /// Ranks the image is split over; each rank's step is timed alone on this device.
    #[arg(long, default_value_t = 1)]
    pub ranks: usize,
    /// Time only this rank (default: every rank, one after another).
    #[arg(long)]
    pub rank: Option<usize>,
    /// PCPP portion: one value, or one per resolution level separated by commas.
    #[arg(long, default_value = "0.3")]
    pub portion: String,
    /// Synchronous warm-up steps before the steady steps (pcpp, distrifusion; default 1).
    #[arg(long)]
    pub warmup_steps: Option<usize>,
    /// With --batch 2, keep both CFG branches on every rank instead of splitting the ranks
    /// into two groups.
    #[arg(long)]
    pub no_cfg_split: bool,
    /// On a GPU, time eager steps only (no CUDA-graph replay of the steady step).
    #[arg(long)]
    pub no_graph: bool,
    /// On a GPU, after timing the replayed step, time it again with each kind of kernel (and
    /// memcpy, memset) switched off in the graph, and print what each kind costs inside the
    /// replayed step.
    #[arg(long)]
    pub kernel_costs: bool,
    /// On a GPU, attention kernels (`PCPP_FLASH128` names) to time one after the other on the
    /// same weights in this process, comma-separated, e.g. `ws,ws3,ws,ws3`: one result
    /// each, named. The other kernel choices come from the environment.
    #[arg(long, value_delimiter = ',')]
    pub attention: Vec<String>,
    /// On a GPU, small-row GEMM choices (`PCPP_SMALL_GEMM` levels, each optionally with a row
    /// cap as in `PCPP_SMALL_GEMM_ROWS` and then a K-split cap as in `PCPP_SMALL_GEMM_SPLITS`) to
    /// time one after the other on the same weights in this process, comma-separated, e.g.
    /// `1,0,geglu,1/128,1/256/4`: one result each (for each attention kernel of --attention),
    /// named.
    #[arg(long, value_delimiter = ',')]
    pub small_gemm: Vec<String>,
}

/// Seeded uniform values in `[-1, 1)` (SplitMix64).
fn random_tensor(shape: &[usize], seed: u64) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let mut state = seed.wrapping_mul(0x2545_F491_4F6C_DD1D) ^ 0x9E37_79B9_7F4A_7C15;
    let data = (0..n)
        .map(|_| {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            (z >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect();
    Ok(Tensor::from_vec(shape, data)?)
}

/// The inputs of one forward: sample, timesteps, and the conditioning tensors.
struct Inputs {
    sample: Tensor,
    timesteps: Tensor,
    cond: UNetCond,
}

impl Inputs {
    fn new(unet: &UNet, a: &Args) -> Result<Inputs> {
        let cfg = unet.config();
        let b = a.batch;
        let cond = UNetCond::random(
            cfg,
            b,
            a.tokens,
            (8 * a.height, 8 * a.width),
            DType::F32,
            pcpp_kernels::Device::Cpu,
            a.seed,
        )?;
        Ok(Inputs {
            sample: random_tensor(&[b, cfg.in_channels, a.height, a.width], a.seed + 1)?,
            timesteps: Tensor::from_vec(&[b], (0..b).map(|i| [999.0, 261.0][i % 2]).collect())?,
            cond,
        })
    }

    /// Fresh conditioning (so each forward recomputes the cross-attention K/V, as diffusers does).
    fn cond(&self) -> UNetCond {
        let c = &self.cond;
        UNetCond::new(
            c.encoder_hidden_states.clone(),
            c.text_embeds.clone(),
            c.time_ids.clone(),
        )
    }
}

fn forward(unet: &UNet, ctx: &StepCtx, x: &Inputs) -> Result<Tensor> {
    Ok(unet.forward(ctx, &x.sample, &x.timesteps, &x.cond(), None)?)
}

/// The median of `v` (the mean of the two middle values for an even count; NaN when empty).
pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

/// Runs the benchmark.
pub fn run(a: Args) -> Result<()> {
    crate::kernel_env::check_attention(&a.attention, a.device.device(0))?;
    crate::kernel_env::check_small_gemm(&a.small_gemm, a.device.device(0))?;
    if a.kernel_costs && (a.device == DeviceArg::Cpu || a.no_graph) {
        bail!("--kernel-costs times the replayed CUDA graph: it needs --device cuda, without --no-graph");
    }
    let per_rank = a.device != DeviceArg::Cpu || a.ranks != 1 || a.parallel != ParallelMode::Serial;
    if per_rank && a.device != DeviceArg::Cpu {
        return crate::band_bench::run(&a);
    }
    if !per_rank && a.dtype.is_some_and(|d| d != DType::F32) {
        bail!("--dtype: the CPU UNet bench runs in f32; other dtypes apply with --parallel, --ranks or --device cuda");
    }
    if a.iters == 0 || a.batch == 0 {
        bail!("--iters and --batch must be at least 1");
    }
    let threads = a.threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    if threads == 0 {
        bail!("--threads must be at least 1");
    }
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .context("cannot start the CPU thread pool")?;
    if per_rank {
        return pool.install(|| crate::band_bench::run(&a));
    }
    pool.install(|| run_in_pool(&a, threads))
}

fn run_in_pool(a: &Args, threads: usize) -> Result<()> {
    let t0 = Instant::now();
    let (unet, source) = match &a.config {
        Some(cfg) => {
            if !a.random_weights {
                bail!(
                    "--config {} needs --random-weights (weights come from --model otherwise)",
                    cfg.display()
                );
            }
            let unet = UNet::random(cfg, DType::F32, &SerialFactory, a.seed)
                .with_context(|| format!("building a random-weight UNet from {}", cfg.display()))?;
            (
                unet,
                format!("{} (random weights, seed {})", cfg.display(), a.seed),
            )
        }
        None => {
            if a.random_weights {
                let cfg = a.model.join("unet/config.json");
                let unet =
                    UNet::random(&cfg, DType::F32, &SerialFactory, a.seed).with_context(|| {
                        format!("building a random-weight UNet from {}", cfg.display())
                    })?;
                (
                    unet,
                    format!("{} (random weights, seed {})", cfg.display(), a.seed),
                )
            } else {
                let dir = a.model.join("unet");
                let unet = UNet::load(&dir, DType::F32, &SerialFactory)
                    .with_context(|| format!("loading the UNet of {}", a.model.display()))?;
                (unet, dir.display().to_string())
            }
        }
    };
    let load_s = t0.elapsed().as_secs_f64();
    let inputs = Inputs::new(&unet, a)?;
    let ctx = StepCtx::serial();

    // FLOPs of one forward (the GEMMs: linear, convolution, attention).
    profile::reset();
    profile::enable(true);
    let out = forward(&unet, &ctx, &inputs);
    profile::enable(false);
    let out = out?;
    let flops = profile::gemm_flops();
    if !out.to_vec_f32()?.iter().all(|v| v.is_finite()) {
        bail!("the forward produced non-finite values");
    }

    for _ in 0..a.warmup {
        forward(&unet, &ctx, &inputs)?;
    }
    // With --profile the timed forwards also feed the per-kernel counters (a clock read per kernel
    // call, far below the noise).
    profile::reset();
    profile::enable(a.profile);
    let mut ms = Vec::with_capacity(a.iters);
    for _ in 0..a.iters {
        let t = Instant::now();
        forward(&unet, &ctx, &inputs)?;
        ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    profile::enable(false);
    let kernels = profile::snapshot();
    let min = ms.iter().copied().fold(f64::INFINITY, f64::min);
    let median = median(ms.clone());
    let tflops = flops as f64 / (median * 1e-3) / 1e12;

    if a.json {
        let v = serde_json::json!({
            "pcpp_cpu_unet_ms": (median * 1e3).round() / 1e3,
            "min_ms": (min * 1e3).round() / 1e3,
            "threads": threads,
            "batch": a.batch,
            "latent_hw": [a.height, a.width],
            "tokens": a.tokens,
            "warmup": a.warmup,
            "iters": a.iters,
            "gflop": flops as f64 / 1e9,
            "tflops": tflops,
            "model": source,
        });
        println!("{v}");
    } else {
        println!("UNet {source}");
        println!(
            "input [{}, {}, {}, {}], {} tokens, {threads} thread(s), loaded in {load_s:.2} s",
            a.batch,
            unet.config().in_channels,
            a.height,
            a.width,
            a.tokens
        );
        println!(
            "forward: median {median:.3} ms, min {min:.3} ms over {} iterations ({} warm-up); {:.3} GFLOP, {:.4} TFLOP/s",
            a.iters,
            a.warmup,
            flops as f64 / 1e9,
            tflops
        );
    }
    if a.profile {
        print_profile(&kernels, a.iters, ms.iter().sum::<f64>() / a.iters as f64);
    }
    Ok(())
}

/// Prints the per-kind counters of `iters` timed forwards (to stderr), per forward: calls,
/// milliseconds and GEMM GFLOP (GPU ops: GPU time between events around each op).
pub(crate) fn print_profile(kernels: &[profile::KernelStats], iters: usize, mean_ms: f64) {
    let n = iters.max(1) as f64;
    let total: f64 = kernels.iter().map(|k| k.seconds).sum::<f64>() / n;
    eprintln!(
        "kernel        calls      ms   GFLOP  (per forward, mean of the timed ones; {:.3} ms in kernels, {mean_ms:.3} ms mean forward)",
        total * 1e3,
    );
    for k in kernels.iter().filter(|k| k.calls > 0) {
        eprintln!(
            "{:<12} {:>6} {:>7.3} {:>7.3}",
            k.kernel.name(),
            k.calls as f64 / n,
            k.seconds * 1e3 / n,
            k.flops as f64 / 1e9 / n
        );
    }
}
