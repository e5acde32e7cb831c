//! Output files of the CLI: checks that an output path can be written before any model work, and
//! writes PNG images (with the generation parameters in a `parameters` text chunk, the convention of
//! common Stable Diffusion front ends) atomically: a temporary file in the same folder, then a rename,
//! so a failure never leaves a partial file.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

fn parent_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Fails unless `path`'s folder exists and a file can be created in it (`flag` names the option).
pub fn check_writable(path: &Path, flag: &str) -> Result<()> {
    if path.is_dir() {
        bail!(
            "{flag} {}: is a directory, expected a file path",
            path.display()
        );
    }
    let dir = parent_of(path);
    if !dir.is_dir() {
        bail!(
            "{flag} {}: folder {} does not exist",
            path.display(),
            dir.display()
        );
    }
    let probe = dir.join(format!(".pcpp-write-test-{}", std::process::id()));
    match fs::File::create(&probe) {
        Ok(_) => {
            let _ = fs::remove_file(&probe);
            Ok(())
        }
        Err(e) => bail!(
            "{flag} {}: cannot write in {}: {e}",
            path.display(),
            dir.display()
        ),
    }
}

/// Prints to standard output; a closed pipe (`pcpp-cli plan | head`) ends quietly.
pub fn print(text: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|_| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(e).context("writing to standard output")
        }
        _ => Ok(()),
    }
}

/// Writes `bytes` to `path` through a temporary file and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = parent_of(path);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let res = (|| -> std::io::Result<()> {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if let Err(e) = res {
        let _ = fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("writing {}", path.display()));
    }
    Ok(())
}

/// Encodes an 8-bit RGB image (`h·w·3` bytes, row-major) as PNG with optional text chunks.
pub fn encode_png(
    rgb: &[u8],
    width: usize,
    height: usize,
    text: &[(&str, String)],
) -> Result<Vec<u8>> {
    if rgb.len() != width * height * 3 {
        bail!(
            "internal: {} bytes for a {width}×{height} RGB image",
            rgb.len()
        );
    }
    let mut buf = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut buf, width as u32, height as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        for (k, v) in text {
            enc.add_itxt_chunk(k.to_string(), v.clone())
                .context("PNG text chunk")?;
        }
        let mut w = enc.write_header().context("PNG header")?;
        w.write_image_data(rgb).context("PNG data")?;
        w.finish().context("PNG end")?;
    }
    Ok(buf)
}

/// Writes a PNG atomically.
pub fn write_png(
    path: &Path,
    rgb: &[u8],
    width: usize,
    height: usize,
    text: &[(&str, String)],
) -> Result<()> {
    write_atomic(path, &encode_png(rgb, width, height, text)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn png_round_trips_with_parameters() {
        let rgb: Vec<u8> = (0..4 * 3 * 3).map(|i| (i * 7) as u8).collect();
        let bytes = encode_png(&rgb, 4, 3, &[("parameters", "a fox\nSteps: 2".into())]).unwrap();
        let dec = png::Decoder::new(std::io::Cursor::new(&bytes));
        let mut r = dec.read_info().unwrap();
        let texts: Vec<_> = r
            .info()
            .utf8_text
            .iter()
            .map(|t| (t.keyword.clone(), t.get_text().unwrap()))
            .collect();
        assert_eq!(
            texts,
            vec![("parameters".to_string(), "a fox\nSteps: 2".to_string())]
        );
        let mut out = vec![0; r.output_buffer_size()];
        r.next_frame(&mut out).unwrap();
        assert_eq!(out, rgb);
    }

    #[test]
    fn unwritable_targets_are_named() {
        let e = check_writable(Path::new("/nonexistent-dir-xyz/out.png"), "--output").unwrap_err();
        assert!(e.to_string().contains("--output"), "{e}");
        assert!(e.to_string().contains("does not exist"), "{e}");
    }
}
