//! The flags that refine a parallel scheme, shared by `generate` and `plan`: the group-norm
//! statistics mode (PCPP §2.6), the sync mode after the warm-up (§2.1) and the naive-patch split
//! scheme (§5 `split_scheme`).

use anyhow::{bail, Result};
use clap::Args;
use pcpp_core::{GnMode, ParallelConfig, ParallelMode, SplitScheme, SyncMode};

/// `--gn-mode`, `--sync-mode` and `--split-scheme`.
#[derive(Debug, Clone, Default, Args)]
pub struct ModeFlags {
    /// Group-norm statistics in stale steps: sync, stale, corrected or separate (default
    /// corrected; pcpp and distrifusion only).
    #[arg(long)]
    pub gn_mode: Option<GnMode>,
    /// After the warm-up: async (stale context, the default), full (every layer synchronous at
    /// every step) or none (no exchange: frozen warm-up context, local group norm); pcpp and
    /// distrifusion only.
    #[arg(long)]
    pub sync_mode: Option<SyncMode>,
    /// How naive-patch cuts the image: rows, cols, or alternate (rows on even steps, columns on
    /// odd ones); naive-patch only.
    #[arg(long)]
    pub split_scheme: Option<SplitScheme>,
}

impl ModeFlags {
    /// Sets the flags given on `cfg`; errors for a flag the scheme has no use for.
    pub fn apply(&self, cfg: &mut ParallelConfig) -> Result<()> {
        let patch = matches!(cfg.mode, ParallelMode::Pcpp | ParallelMode::DistriFusion);
        if let Some(g) = self.gn_mode {
            if !patch {
                bail!("--gn-mode {g}: only pcpp and distrifusion exchange group-norm statistics (--parallel {})", cfg.mode);
            }
            cfg.gn_mode = g;
        }
        if let Some(s) = self.sync_mode {
            if !patch {
                bail!(
                    "--sync-mode {s}: only pcpp and distrifusion have stale steps (--parallel {})",
                    cfg.mode
                );
            }
            cfg.sync_mode = s;
        }
        if let Some(s) = self.split_scheme {
            if cfg.mode != ParallelMode::NaivePatch {
                bail!(
                    "--split-scheme {s}: only naive-patch cuts columns (--parallel {} always cuts rows)",
                    cfg.mode
                );
            }
            cfg.split_scheme = s;
        }
        Ok(())
    }
}
