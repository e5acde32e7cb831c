//! `pcpp-cli generate --prompts FILE --output-dir DIR`: the quality workflow's batch generation
//! (PCPP paper §5: images of one prompt list under two schemes, compared with `pcpp-cli compare
//! DIR_A DIR_B`). One prompt a line; line `i` (from 0) is written to `DIR/{i:05}.png` with seed
//! `--seed + i`, so every scheme draws the same noise for the same line. Images already in the
//! folder are skipped, so an interrupted run resumes where it stopped. The models are loaded once
//! for the whole list (`generate` makes every job with one loaded pipeline per rank).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;

use crate::generate::{seeded_noise, GenerateArgs, Job};
use pcpp_kernels::Tensor;

/// `--prompts` and `--output-dir`.
#[derive(Debug, Clone, Default, Args)]
pub struct BatchFlags {
    /// A text file with one prompt a line: generates one image per non-empty line into
    /// --output-dir (seed --seed + line index, file `{index:05}.png`, from 0), skipping images that
    /// already exist.
    #[arg(long, requires = "output_dir")]
    pub prompts: Option<PathBuf>,
    /// The folder --prompts writes into (created if missing).
    #[arg(long, requires = "prompts")]
    pub output_dir: Option<PathBuf>,
}

impl GenerateArgs {
    /// The prompt (empty when --prompts gives them).
    pub fn prompt(&self) -> &str {
        self.prompt.as_deref().unwrap_or("")
    }

    /// SDXL's classifier-free guidance scale: `--guidance`, 5 by default.
    pub fn cfg_scale(&self) -> f32 {
        self.guidance.unwrap_or(5.0)
    }

    /// The output PNG (empty when --output-dir is given).
    pub fn output(&self) -> &Path {
        self.output.as_deref().unwrap_or(Path::new(""))
    }
}

/// The file name of prompt line `index` (from 0).
pub fn image_name(index: usize) -> String {
    format!("{index:05}.png")
}

/// The seed of prompt line `index`.
pub fn line_seed(seed: u64, index: usize) -> u64 {
    seed.wrapping_add(index as u64)
}

/// `(index, prompt)` of every non-empty line of `text`.
pub fn prompt_lines(text: &str) -> Vec<(usize, String)> {
    text.lines()
        .enumerate()
        .map(|(i, l)| (i, l.trim().to_string()))
        .filter(|(_, l)| !l.is_empty())
        .collect()
}

/// The one job of a run without `--prompts`: `--prompt` into `--output`, with the noise of
/// `--init-noise` (read and checked by `read`, the model family's reader) or of `--seed`.
pub fn single_job(
    a: &GenerateArgs,
    shape: &[usize],
    read: impl FnOnce(&Path) -> Result<Tensor>,
) -> Result<Job> {
    let (noise, seed) = match &a.init_noise {
        Some(p) => (read(p)?, format!("init-noise {}", p.display())),
        None => (seeded_noise(shape, a.seed)?, a.seed.to_string()),
    };
    Ok(Job {
        prompt: a.prompt().to_string(),
        noise,
        output: a.output().to_path_buf(),
        seed,
        line: None,
    })
}

/// The jobs of `--prompts` (lines whose image is not in `--output-dir` yet, noise of shape
/// `shape` from seed `--seed + index`) and the number of lines skipped because their image exists.
pub fn jobs(a: &GenerateArgs, shape: &[usize]) -> Result<(Vec<Job>, usize)> {
    let (Some(file), Some(dir)) = (a.batch.prompts.clone(), a.batch.output_dir.clone()) else {
        bail!("--prompts and --output-dir go together");
    };
    for (flag, given) in [
        ("--init-noise", a.init_noise.is_some()),
        ("--save-latents", a.save_latents.is_some()),
        ("--report", a.report.is_some()),
    ] {
        if given {
            bail!("{flag} names one file and cannot be used with --prompts");
        }
    }
    let text = std::fs::read_to_string(&file)
        .with_context(|| format!("--prompts {}: cannot read", file.display()))?;
    let lines = prompt_lines(&text);
    if lines.is_empty() {
        bail!("--prompts {}: no prompts (one a line)", file.display());
    }
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("--output-dir {}: cannot create", dir.display()))?;
    crate::output::check_writable(&dir.join(image_name(0)), "--output-dir")?;
    let mut jobs = Vec::new();
    let mut skipped = 0;
    for (i, prompt) in lines {
        let output = dir.join(image_name(i));
        if output.is_file() {
            skipped += 1;
            continue;
        }
        let seed = line_seed(a.seed, i);
        jobs.push(Job {
            prompt,
            noise: seeded_noise(shape, seed)?,
            output,
            seed: seed.to_string(),
            line: Some(i + 1),
        });
    }
    Ok((jobs, skipped))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_keep_their_index_and_seed() {
        let l = prompt_lines("a cat\n\n  a dog  \n");
        assert_eq!(l, vec![(0, "a cat".into()), (2, "a dog".into())]);
        assert_eq!(image_name(2), "00002.png");
        assert_eq!(line_seed(10, 2), 12);
        assert_eq!(line_seed(u64::MAX, 1), 0);
    }
}
