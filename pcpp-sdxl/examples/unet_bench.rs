//! UNet step benchmark on one GPU with random weights for a real config (no checkpoint needed):
//! median milliseconds per step eager and replayed from a CUDA graph, and device memory in use.
//!
//! `unet_bench [--config DIR] [--dtype f16] [--batch 2] [--height 128] [--width 128] [--iters 20]
//! [--no-graph] [--json]` — height and width are latent sizes (image pixels / 8).

use std::path::PathBuf;
use std::time::Instant;

use pcpp_core::{SerialFactory, StepCtx};
use pcpp_kernels::cuda::{capture_graph, copy_into, gpu};
use pcpp_kernels::{DType, Device, Tensor};
use pcpp_sdxl::weights::Weights;
use pcpp_sdxl::{UNet, UNetCond, UNetConfig};

struct Args {
    config: PathBuf,
    dtype: DType,
    cases: Vec<(usize, usize, usize)>,
    iters: usize,
    graph: bool,
    json: bool,
    ops: bool,
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        config: PathBuf::from("models/sdxl-base-1.0-configs/unet"),
        dtype: DType::F16,
        cases: Vec::new(),
        iters: 20,
        graph: true,
        json: false,
        ops: false,
    };
    let (mut b, mut h, mut w) = (1usize, 128usize, 128usize);
    let mut it = std::env::args().skip(1);
    let num = |v: Option<String>, f: &str| -> Result<usize, String> {
        v.ok_or(format!("{f} needs a value"))?
            .parse()
            .map_err(|e| format!("{f}: {e}"))
    };
    while let Some(f) = it.next() {
        match f.as_str() {
            "--config" => a.config = PathBuf::from(it.next().ok_or("--config needs a value")?),
            "--dtype" => a.dtype = it.next().ok_or("--dtype needs a value")?.parse()?,
            "--batch" => b = num(it.next(), "--batch")?,
            "--height" => h = num(it.next(), "--height")?,
            "--width" => w = num(it.next(), "--width")?,
            // Adds the case given so far and starts another.
            "--case" => a.cases.push((b, h, w)),
            "--iters" => a.iters = num(it.next(), "--iters")?,
            "--no-graph" => a.graph = false,
            "--json" => a.json = true,
            // Times single ops at the shapes of an SDXL step at 1024², b = 2, then exits.
            "--ops" => a.ops = true,
            "--image" => {
                return Err("--image is gone: a whole image is timed by `pcpp-cli generate` (the pipeline's one denoising loop); see docs/benchmarks.md".into())
            }
            other => return Err(format!("unknown flag {other}")),
        }
    }
    a.cases.push((b, h, w));
    a.cases.dedup();
    Ok(a)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let a = parse()?;
    let dev = Device::Cuda(0);
    let g = gpu(0)?;
    if a.ops {
        return op_bench(a.dtype, a.iters);
    }
    let t0 = Instant::now();
    let cfg = UNetConfig::from_file(&a.config.join("config.json"))?;
    let w = Weights::random_from_manifest(&a.config.join("tensor_manifest.json"), a.dtype, 0)?
        .on_device(dev);
    let unet = UNet::build(cfg, &w, &SerialFactory)?;
    g.synchronize()?;
    let (free0, total) = g.mem_info()?;
    eprintln!(
        "{} ({}), random {} weights built in {:.1} s, {:.2} GiB in use",
        g.name(),
        g.arch(),
        a.dtype,
        t0.elapsed().as_secs_f64(),
        (total - free0) as f64 / (1u64 << 30) as f64
    );
    let mut results = Vec::new();
    for &(b, h, wd) in &a.cases {
        let r =
            |shape: &[usize], seed| Tensor::rand_uniform(shape, a.dtype, dev, (-1.0, 1.0), seed);
        let sample = r(&[b, 4, h, wd], 1)?;
        let t = Tensor::from_vec(&[b], vec![500.0; b])?
            .to_dtype(a.dtype)?
            .to_device(dev)?;
        let cond = UNetCond::new(
            r(&[b, 77, 2048], 2)?,
            Some(r(&[b, 1280], 3)?),
            Some(
                Tensor::from_vec(
                    &[b, 6],
                    [1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0].repeat(b),
                )?
                .to_dtype(a.dtype)?
                .to_device(dev)?,
            ),
        );
        let ctx = StepCtx::serial();
        let step = || unet.forward(&ctx, &sample, &t, &cond, None);
        for _ in 0..3 {
            step()?;
        }
        g.synchronize()?;
        let mut eager = Vec::new();
        for _ in 0..a.iters {
            let s = Instant::now();
            let o = step()?;
            g.synchronize()?;
            eager.push(s.elapsed().as_secs_f64() * 1e3);
            drop(o);
        }
        let eager_ms = median(eager);
        let graph_ms = if a.graph {
            let timed = || -> Result<f64, Box<dyn std::error::Error>> {
                let out = r(&[b, 4, h, wd], 9)?;
                let graph = capture_graph(0, || {
                    let o = step().map_err(|e| pcpp_kernels::KernelError::Invalid {
                        op: "unet step",
                        msg: e.to_string(),
                    })?;
                    copy_into(&o, &out)
                })?;
                for _ in 0..3 {
                    graph.replay()?;
                }
                g.synchronize()?;
                let mut v = Vec::new();
                for _ in 0..a.iters {
                    let s = Instant::now();
                    graph.replay()?;
                    g.synchronize()?;
                    v.push(s.elapsed().as_secs_f64() * 1e3);
                }
                // The replayed output must equal an eager step's.
                let eager_out = step()?.to_vec_f32()?;
                let graph_out = out.to_vec_f32()?;
                let diff = eager_out
                    .iter()
                    .zip(&graph_out)
                    .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
                let finite = graph_out.iter().all(|x| x.is_finite());
                eprintln!("b{b} {h}x{wd}: graph vs eager max |diff| {diff:e}, finite {finite}");
                Ok(median(v))
            };
            match timed() {
                Ok(ms) => Some(ms),
                Err(e) => {
                    eprintln!("b{b} {h}x{wd}: CUDA graph failed: {e}");
                    None
                }
            }
        } else {
            None
        };
        let (free, _) = g.mem_info()?;
        let used_gib = (total - free) as f64 / (1u64 << 30) as f64;
        if !a.json {
            println!(
                "b{b} {h}x{wd} ({}x{} px) {}: eager {eager_ms:.2} ms, graph {} ms, {used_gib:.2} GiB in use",
                h * 8,
                wd * 8,
                a.dtype,
                graph_ms.map_or("-".into(), |x| format!("{x:.2}"))
            );
        }
        results.push(format!(
            "{{\"batch\":{b},\"height\":{h},\"width\":{wd},\"dtype\":\"{}\",\"eager_ms\":{eager_ms:.3},\"graph_ms\":{},\"mem_gib\":{used_gib:.3}}}",
            a.dtype,
            graph_ms.map_or("null".into(), |x| format!("{x:.3}"))
        ));
    }
    if a.json {
        println!("[{}]", results.join(","));
    }
    Ok(())
}

/// Median milliseconds of `f` over `iters` runs (after 2 warm-ups), synchronised each time.
fn time_op(
    iters: usize,
    f: &dyn Fn() -> pcpp_kernels::Result<Tensor>,
) -> Result<f64, Box<dyn std::error::Error>> {
    let g = gpu(0)?;
    for _ in 0..2 {
        f()?;
    }
    g.synchronize()?;
    let mut v = Vec::new();
    for _ in 0..iters {
        let s = Instant::now();
        let o = f()?;
        g.synchronize()?;
        v.push(s.elapsed().as_secs_f64() * 1e3);
        drop(o);
    }
    Ok(median(v))
}

fn op_bench(dt: DType, iters: usize) -> Result<(), Box<dyn std::error::Error>> {
    use pcpp_kernels::Conv2dParams;
    let dev = Device::Cuda(0);
    let r = |shape: &[usize], seed| Tensor::rand_uniform(shape, dt, dev, (-1.0, 1.0), seed);
    let mut rows: Vec<(String, f64)> = Vec::new();
    for (c, hw) in [(320usize, 128usize), (640, 64), (1280, 32)] {
        let x = r(&[2, c, hw, hw], 1)?;
        let w = r(&[c, c, 3, 3], 2)?.affine(0.05, 0.0)?;
        let bias = r(&[c], 3)?;
        let p = Conv2dParams::new(1, 1);
        rows.push((
            format!("conv3x3 {c}ch {hw}x{hw}"),
            time_op(iters, &|| x.conv2d(&w, Some(&bias), p))?,
        ));
        let gm = r(&[c], 4)?;
        rows.push((
            format!("group_norm+silu {c}ch {hw}x{hw}"),
            time_op(iters, &|| {
                x.group_norm(32, Some(&gm), Some(&bias), 1e-5, true)
            })?,
        ));
        rows.push((
            format!("to_tokens {c}ch {hw}x{hw}"),
            time_op(iters, &|| x.to_tokens())?,
        ));
        rows.push((
            format!("add {c}ch {hw}x{hw}"),
            time_op(iters, &|| x.add(&x))?,
        ));
        rows.push((
            format!("cat x2 {c}ch {hw}x{hw}"),
            time_op(iters, &|| Tensor::cat(&[&x, &x], 1))?,
        ));
    }
    for (l, heads) in [(4096usize, 10usize), (1024, 20)] {
        let dm = heads * 64;
        let q = r(&[2, l, dm], 5)?;
        let k = r(&[2, l, dm], 6)?;
        let v = r(&[2, l, dm], 7)?;
        rows.push((
            format!("self-attention {l} tok {heads} heads"),
            time_op(iters, &|| Tensor::attention(&q, &k, &v, heads, false))?,
        ));
        let kc = r(&[2, 77, dm], 8)?;
        rows.push((
            format!("cross-attention {l}x77 {heads} heads"),
            time_op(iters, &|| Tensor::attention(&q, &kc, &kc, heads, false))?,
        ));
        let w = r(&[dm, dm], 9)?.affine(0.05, 0.0)?;
        let b = r(&[dm], 10)?;
        rows.push((
            format!("linear {}x{dm}x{dm}", 2 * l),
            time_op(iters, &|| q.linear(&w, Some(&b)))?,
        ));
        let w1 = r(&[8 * dm, dm], 11)?.affine(0.05, 0.0)?;
        let b1 = r(&[8 * dm], 12)?;
        rows.push((
            format!("linear ff1 {}x{dm}x{}", 2 * l, 8 * dm),
            time_op(iters, &|| q.linear(&w1, Some(&b1)))?,
        ));
        let h = q.linear(&w1, Some(&b1))?;
        rows.push((
            format!("geglu {}x{}", 2 * l, 8 * dm),
            time_op(iters, &|| h.geglu())?,
        ));
        let gm = r(&[dm], 13)?;
        rows.push((
            format!("layer_norm {}x{dm}", 2 * l),
            time_op(iters, &|| q.layer_norm(Some(&gm), Some(&b), 1e-5))?,
        ));
    }
    for (name, ms) in rows {
        println!("op {name:<40} {ms:8.3} ms");
    }
    Ok(())
}

fn main() {
    if let Err(e) = run() {
        eprintln!("unet_bench: {e}");
        std::process::exit(1);
    }
}
