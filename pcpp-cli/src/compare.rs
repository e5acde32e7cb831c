//! `pcpp-cli compare A.png B.png`: PSNR and SSIM of two 8-bit images of the same size, the quality
//! measures PCPP and DistriFusion report against single-GPU output (PCPP paper §5; one metric
//! implementation for every scheme, see pcpp-algorithm.md §7.13). `pcpp-cli compare DIR_A DIR_B`
//! compares every PNG of `DIR_A` with the same-named one of `DIR_B` and prints per-image figures
//! and their means.
//!
//! PSNR uses data range 255 over all RGB samples. SSIM is Wang et al.'s, with an 11×11 Gaussian
//! window (σ = 1.5), K1 = 0.01, K2 = 0.03, L = 255, computed per channel over the valid window
//! positions and averaged.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;

/// Arguments of `pcpp-cli compare`.
#[derive(Debug, Args)]
pub struct CompareArgs {
    /// First image, or a folder of PNGs.
    a: PathBuf,
    /// Second image, or a folder with PNGs of the same names.
    b: PathBuf,
    /// Print JSON: keys `psnr` and `ssim` for two images; for two folders `images` (name, psnr,
    /// ssim), `mean_psnr`, `mean_ssim`, `count` and `missing` (names of DIR_A absent from DIR_B).
    #[arg(long)]
    json: bool,
}

/// An 8-bit RGB image.
pub struct Rgb {
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// `height·width·3` bytes, row-major.
    pub data: Vec<u8>,
}

/// Reads a PNG (or any format the `image` crate reads) as 8-bit RGB.
pub fn read_rgb(path: &Path) -> Result<Rgb> {
    let img =
        image::open(path).with_context(|| format!("{}: cannot read image", path.display()))?;
    let rgb = img.to_rgb8();
    Ok(Rgb {
        width: rgb.width() as usize,
        height: rgb.height() as usize,
        data: rgb.into_raw(),
    })
}

/// PSNR in dB (infinite for identical images).
pub fn psnr(a: &Rgb, b: &Rgb) -> f64 {
    let mse = a
        .data
        .iter()
        .zip(&b.data)
        .map(|(&x, &y)| {
            let d = x as f64 - y as f64;
            d * d
        })
        .sum::<f64>()
        / a.data.len() as f64;
    if mse == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (255.0f64 * 255.0 / mse).log10()
    }
}

fn gaussian_window(size: usize, sigma: f64) -> Vec<f64> {
    let c = (size / 2) as f64;
    let w: Vec<f64> = (0..size)
        .map(|i| (-((i as f64 - c).powi(2)) / (2.0 * sigma * sigma)).exp())
        .collect();
    let s: f64 = w.iter().sum();
    w.into_iter().map(|x| x / s).collect()
}

/// Mean SSIM over channels. Images smaller than the window use a window the size of the image.
pub fn ssim(a: &Rgb, b: &Rgb) -> f64 {
    let (w, h) = (a.width, a.height);
    let size = 11.min(w).min(h);
    let g = gaussian_window(size, 1.5);
    let (c1, c2) = ((0.01f64 * 255.0).powi(2), (0.03f64 * 255.0).powi(2));
    let mut total = 0.0;
    for ch in 0..3 {
        let px = |img: &Rgb, x: usize, y: usize| img.data[(y * w + x) * 3 + ch] as f64;
        let mut sum = 0.0;
        let mut count = 0usize;
        for y0 in 0..=h - size {
            for x0 in 0..=w - size {
                let (mut ma, mut mb, mut saa, mut sbb, mut sab) = (0.0, 0.0, 0.0, 0.0, 0.0);
                for (dy, gy) in g.iter().enumerate() {
                    for (dx, gx) in g.iter().enumerate() {
                        let k = gy * gx;
                        let (va, vb) = (px(a, x0 + dx, y0 + dy), px(b, x0 + dx, y0 + dy));
                        ma += k * va;
                        mb += k * vb;
                        saa += k * va * va;
                        sbb += k * vb * vb;
                        sab += k * va * vb;
                    }
                }
                let (va, vb, cov) = (saa - ma * ma, sbb - mb * mb, sab - ma * mb);
                sum += ((2.0 * ma * mb + c1) * (2.0 * cov + c2))
                    / ((ma * ma + mb * mb + c1) * (va + vb + c2));
                count += 1;
            }
        }
        total += sum / count as f64;
    }
    total / 3.0
}

/// PSNR and SSIM of two images; errors if their sizes differ.
pub fn compare_images(a: &Path, b: &Path) -> Result<(f64, f64)> {
    let (x, y) = (read_rgb(a)?, read_rgb(b)?);
    if (x.width, x.height) != (y.width, y.height) {
        bail!(
            "{} is {}×{} but {} is {}×{}",
            a.display(),
            x.width,
            x.height,
            b.display(),
            y.width,
            y.height
        );
    }
    Ok((psnr(&x, &y), ssim(&x, &y)))
}

fn psnr_json(p: f64) -> serde_json::Value {
    if p.is_finite() {
        serde_json::json!(p)
    } else {
        serde_json::json!("inf")
    }
}

/// Per-image figures of two folders.
pub struct FolderComparison {
    /// `(file name, psnr, ssim)` of every PNG of the first folder that the second one also has,
    /// sorted by name.
    pub images: Vec<(String, f64, f64)>,
    /// PNGs of the first folder that the second one lacks.
    pub missing: Vec<String>,
}

impl FolderComparison {
    /// Mean PSNR over images (infinite if any pair is identical) and mean SSIM.
    pub fn means(&self) -> (f64, f64) {
        let n = self.images.len().max(1) as f64;
        (
            self.images.iter().map(|i| i.1).sum::<f64>() / n,
            self.images.iter().map(|i| i.2).sum::<f64>() / n,
        )
    }
}

/// Compares the same-named PNGs of two folders. Errors if they have none in common.
pub fn compare_folders(a: &Path, b: &Path) -> Result<FolderComparison> {
    let mut names: Vec<String> = std::fs::read_dir(a)
        .with_context(|| format!("{}: cannot list", a.display()))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.to_ascii_lowercase().ends_with(".png") && !n.starts_with('.'))
        .collect();
    names.sort();
    let (mut images, mut missing) = (Vec::new(), Vec::new());
    for n in names {
        let other = b.join(&n);
        if !other.is_file() {
            missing.push(n);
            continue;
        }
        let (p, s) = compare_images(&a.join(&n), &other)?;
        images.push((n, p, s));
    }
    if images.is_empty() {
        bail!(
            "{} and {} have no PNG file names in common",
            a.display(),
            b.display()
        );
    }
    Ok(FolderComparison { images, missing })
}

fn run_folders(a: &CompareArgs) -> Result<()> {
    let c = compare_folders(&a.a, &a.b)?;
    let (mp, ms) = c.means();
    if a.json {
        let images: Vec<_> = c
            .images
            .iter()
            .map(|(n, p, s)| serde_json::json!({ "name": n, "psnr": psnr_json(*p), "ssim": s }))
            .collect();
        let doc = serde_json::json!({
            "images": images,
            "count": c.images.len(),
            "mean_psnr": psnr_json(mp),
            "mean_ssim": ms,
            "missing": c.missing,
        });
        return crate::output::print(&format!("{}\n", serde_json::to_string_pretty(&doc)?));
    }
    let mut out = String::new();
    for (n, p, s) in &c.images {
        out.push_str(&format!("{n}  PSNR {p:.3} dB  SSIM {s:.5}\n"));
    }
    for n in &c.missing {
        out.push_str(&format!("{n}  missing in {}\n", a.b.display()));
    }
    out.push_str(&format!(
        "mean of {} images: PSNR {mp:.3} dB  SSIM {ms:.5}\n",
        c.images.len()
    ));
    crate::output::print(&out)
}

/// Runs the command.
pub fn run(a: CompareArgs) -> Result<()> {
    match (a.a.is_dir(), a.b.is_dir()) {
        (true, true) => return run_folders(&a),
        (false, false) => {}
        _ => bail!(
            "{} and {}: give two images or two folders",
            a.a.display(),
            a.b.display()
        ),
    }
    let (p, s) = compare_images(&a.a, &a.b)?;
    if a.json {
        crate::output::print(&format!(
            "{}\n",
            serde_json::json!({ "psnr": psnr_json(p), "ssim": s })
        ))
    } else {
        crate::output::print(&format!("PSNR {p:.3} dB  SSIM {s:.5}\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn img(w: usize, h: usize, f: impl Fn(usize, usize, usize) -> u8) -> Rgb {
        let mut data = Vec::new();
        for y in 0..h {
            for x in 0..w {
                for c in 0..3 {
                    data.push(f(x, y, c));
                }
            }
        }
        Rgb {
            width: w,
            height: h,
            data,
        }
    }

    #[test]
    fn identical_images_are_perfect() {
        let a = img(16, 12, |x, y, c| (x * 13 + y * 7 + c * 50) as u8);
        assert!(psnr(&a, &a).is_infinite());
        assert!((ssim(&a, &a) - 1.0).abs() < 1e-12);
    }

    #[test]
    fn psnr_of_uniform_error() {
        let a = img(8, 8, |_, _, _| 100);
        let b = img(8, 8, |_, _, _| 110);
        // MSE = 100 → 10·log10(255²/100) = 28.1308 dB.
        assert!((psnr(&a, &b) - 28.130_803_6).abs() < 1e-6);
        let n = img(16, 16, |x, y, c| ((x * 31 + y * 17 + c) % 256) as u8);
        let m = img(16, 16, |x, y, c| {
            ((x * 31 + y * 17 + c + (x % 3) * 20) % 256) as u8
        });
        let s = ssim(&n, &m);
        assert!(s < 0.99 && s > -1.0, "{s}");
    }
}
