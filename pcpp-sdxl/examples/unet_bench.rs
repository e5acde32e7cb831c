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
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        config: PathBuf::from("models/sdxl-base-1.0-configs/unet"),
        dtype: DType::F16,
        cases: Vec::new(),
        iters: 20,
        graph: true,
        json: false,
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
    let t0 = Instant::now();
    let cfg = UNetConfig::from_file(&a.config.join("config.json"))?;
    let w = Weights::random(&a.config.join("tensor_manifest.json"), a.dtype, dev, 0)?;
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
        let r = |shape: &[usize], seed| Tensor::rand_uniform(shape, a.dtype, dev, (-1.0, 1.0), seed);
        let sample = r(&[b, 4, h, wd], 1)?;
        let t = Tensor::from_vec(&[b], vec![500.0; b])?
            .to_dtype(a.dtype)?
            .to_device(dev)?;
        let cond = UNetCond::new(
            r(&[b, 77, 2048], 2)?,
            Some(r(&[b, 1280], 3)?),
            Some(Tensor::from_vec(&[b, 6], vec![1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0].repeat(b))?
                .to_dtype(a.dtype)?
                .to_device(dev)?),
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
        let mut graph_ms = None;
        if a.graph {
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
            graph_ms = Some(median(v));
        }
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

fn main() {
    if let Err(e) = run() {
        eprintln!("unet_bench: {e}");
        std::process::exit(1);
    }
}
