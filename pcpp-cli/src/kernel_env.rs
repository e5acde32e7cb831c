//! Kernel choices for comparison runs, taken from the environment before any GPU work:
//! `PCPP_FLASH128=ws|ws-split4|ws-split2|ws-split1|ws-small-wide|ws-no-small|ws-whole|ws2|ws3|ws3-overlap|ws-pingpong|ws-overlap|hopper|shared-q64|shared-q|registers-q`
//! (the flash-attention kernel: `ws` takes FlashAttention-3's warp specialisation on Hopper's
//! warpgroup MMAs (TMA producer, ping-pong, intra-warpgroup overlap) for head sizes 64 and 128 on
//! sm_90a devices, at head size 64 with each head's rows split between three-warpgroup (192-row)
//! and two-warpgroup (128-row) tiles where the two launches finish their waves first;
//! where a head-size-64 grid over at most 512 keys has fewer 64-row tiles than
//! multiprocessors (a band's), 64-row `mma.sync` tiles instead, each block's key tiles split
//! between up to four groups of warps; `ws-split2` and `ws-split1` with at most two groups or
//! one chain, `ws-split4` as `ws`;
//! `ws-small-wide` as `ws` with the small-grid kernel also for up to two waves of tiles
//! over up to 2 048 keys (a band's level-1 self-attention; measured slower);
//! `ws-no-small` without those;
//! `ws-whole` it with one tile height per grid, three warpgroups where their grid finishes its
//! waves first; `ws2` and `ws3` it with two or three warpgroups always, `ws3-overlap` three without the
//! ping-pong, `ws-pingpong` and `ws-overlap` it with one of its two schedules, `hopper`
//! the warpgroup MMAs without warp specialisation, all `shared-q64` elsewhere; the others
//! choose among the head-size-128 kernels of every device), `PCPP_VECTOR_KERNELS=1|0`
//! (vectorised element-wise kernels, row-broadcast kernel, one warp per norm row, fused rotary
//! embedding), `PCPP_FUSED_EPILOGUES=1|0` (a linear layer's
//! tanh GELU or accumulator in cuBLASLt's epilogue), `PCPP_CONV_NHWC=1|0` (f16/bf16
//! convolutions in NHWC with kept filters and the bias fused into the output transpose, or
//! cuDNN's NCHW calls), `PCPP_AUTOTUNE=1|0|report` (the first call of each GEMM and convolution
//! shape times the libraries' candidate algorithms and keeps the fastest, or takes their
//! heuristic choice; `report` tunes and writes each shape's candidates and times to stderr),
//! `PCPP_NORM_REGISTERS=1|0` (layer norms that hold the row in registers, or read it three
//! times; same bits), `PCPP_DEVICE_WINDOWS=1|0` (the device path keeps the self-attention's
//! K/V windows and the group norm's statistics in place, or concatenates them and copies its
//! sends; same values), `PCPP_PROGRAMMATIC_LAUNCH=1|0` (kernels of pcpp's own source launched
//! with programmatic dependent launch on sm_90 and later, each starting while the one before it
//! finishes; same values), `PCPP_FLASH_PERSISTENT=1|0` (the warp-specialised attention runs as
//! a persistent grid of one block per multiprocessor where its tiles take more than one wave,
//! or as one block per tile; same values), `PCPP_GEGLU_PREFETCH=1|0` (a GEGLU
//! thread takes up to four rows, loading the next while it computes one, or one row; same
//! bits), `PCPP_SMALL_GEMM=1|geglu|gemm|0` (linear layers of at most 1 024 rows on pcpp's
//! warpgroup-MMA GEMMs on sm_90a: `1` with GEGLU and the transformer blocks' layer norms inside
//! them, `geglu` with GEGLU only, `gemm` the GEMMs alone; `0` cuBLASLt with those as their own
//! passes; off by default, measured slower than cuBLASLt), `PCPP_SMALL_GEMM_ROWS=256|128|64`
//! (the most rows of one of those GEMMs' blocks: fewer read the weights more often but give a
//! GEMM more blocks), `PCPP_SMALL_GEMM_SPLITS=8|4|2|1` (the most blocks of a cluster that share
//! one tile's K), `PCPP_LT_REDUCTION=any|inplace|off` (the split-K reductions cuBLASLt may
//! choose: any, only in place in the output by the GEMM's own blocks, or no split-K GEMMs). Unset
//! means the defaults (`ws`, `1`, `1`, `1`, `0`, `1`, `1`, `1`, `1`, `1`, `0`, `256`, `8`, `any`);
//! `flux-bench`'s `--variants` items ([`parse_variant`]) set the first three, and `bench`'s
//! `--attention` list ([`check_attention`], [`apply_attention`]) the first.
//! Without the `cuda` feature there is nothing to choose and the variables are ignored.

use anyhow::{bail, Result};
use pcpp_kernels::Device;

/// The attention kernels by name, the default first.
const FLASH: [&str; 16] = [
    "ws",
    "ws-split2",
    "ws-split1",
    "ws-split4",
    "ws-small-wide",
    "ws-no-small",
    "ws-whole",
    "ws2",
    "ws3",
    "ws3-overlap",
    "ws-pingpong",
    "ws-overlap",
    "hopper",
    "shared-q64",
    "shared-q",
    "registers-q",
];

/// The levels of `PCPP_SMALL_GEMM` (`pcpp_kernels::cuda::SmallGemm::parse`), the default first.
const SMALL_GEMM: [&str; 4] = ["0", "gemm", "geglu", "1"];

/// A set of kernel choices: from the environment ([`apply`]) or one `--variants` item of a
/// benchmark ([`parse_variant`]).
#[derive(Debug, Clone)]
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub struct Variant {
    flash: &'static str,
    fused: bool,
    vector: bool,
    nhwc: bool,
    tune: bool,
    tune_report: bool,
    regnorm: bool,
    windows: bool,
    programmatic: bool,
    persistent: bool,
    geglu_prefetch: bool,
    small_gemm: &'static str,
    small_gemm_rows: usize,
    small_gemm_splits: usize,
    lt_reduction: &'static str,
}

impl Default for Variant {
    /// The measured defaults.
    fn default() -> Self {
        Variant {
            flash: FLASH[0],
            fused: true,
            vector: true,
            nhwc: true,
            tune: false,
            tune_report: false,
            regnorm: true,
            windows: true,
            programmatic: true,
            persistent: true,
            geglu_prefetch: true,
            small_gemm: SMALL_GEMM[0],
            small_gemm_rows: 256,
            small_gemm_splits: 8,
            lt_reduction: LT_REDUCTION[0],
        }
    }
}

/// The kernel named `name`, or `None`.
fn flash_name(name: &str) -> Option<&'static str> {
    FLASH.iter().copied().find(|f| *f == name)
}

/// Applies the variables; an unknown value is an error naming the variable. Without the `cuda`
/// feature there is nothing to choose and they are ignored.
pub fn apply() -> Result<()> {
    if !cfg!(feature = "cuda") {
        return Ok(());
    }
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let switch = |name: &str| -> Result<bool> {
        match var(name).as_deref() {
            None | Some("1") => Ok(true),
            Some("0") => Ok(false),
            Some(v) => bail!("{name}={v}: expected 1 or 0"),
        }
    };
    // The value of variable `name` where set: one of `allowed`.
    let named =
        |name: &str, allowed: &[&'static str]| -> Result<Option<&'static str>> {
            var(name)
                .map(|t| {
                    allowed.iter().copied().find(|s| *s == t).ok_or_else(|| {
                        anyhow::anyhow!("{name}={t}: expected {}", allowed.join(", "))
                    })
                })
                .transpose()
        };
    let mut v = Variant::default();
    if let Some(f) = named("PCPP_FLASH128", &FLASH)? {
        v.flash = f;
    }
    v.fused = switch("PCPP_FUSED_EPILOGUES")?;
    v.vector = switch("PCPP_VECTOR_KERNELS")?;
    v.nhwc = switch("PCPP_CONV_NHWC")?;
    (v.tune, v.tune_report) = match var("PCPP_AUTOTUNE").as_deref() {
        None | Some("0") => (false, false),
        Some("1") => (true, false),
        Some("report") => (true, true),
        Some(t) => bail!("PCPP_AUTOTUNE={t}: expected 1, 0 or report"),
    };
    v.regnorm = switch("PCPP_NORM_REGISTERS")?;
    v.windows = switch("PCPP_DEVICE_WINDOWS")?;
    v.programmatic = switch("PCPP_PROGRAMMATIC_LAUNCH")?;
    v.persistent = switch("PCPP_FLASH_PERSISTENT")?;
    v.geglu_prefetch = switch("PCPP_GEGLU_PREFETCH")?;
    if let Some(level) = named("PCPP_SMALL_GEMM", &SMALL_GEMM)? {
        v.small_gemm = level;
    }
    if let Some(t) = var("PCPP_SMALL_GEMM_ROWS") {
        v.small_gemm_rows = one_of(&t, &ROWS)
            .ok_or_else(|| anyhow::anyhow!("PCPP_SMALL_GEMM_ROWS={t}: expected 64, 128 or 256"))?;
    }
    if let Some(t) = var("PCPP_SMALL_GEMM_SPLITS") {
        v.small_gemm_splits = one_of(&t, &SPLITS)
            .ok_or_else(|| anyhow::anyhow!("PCPP_SMALL_GEMM_SPLITS={t}: expected 1, 2, 4 or 8"))?;
    }
    if let Some(r) = named("PCPP_LT_REDUCTION", &LT_REDUCTION)? {
        v.lt_reduction = r;
    }
    v.apply();
    Ok(())
}

/// The values of `PCPP_LT_REDUCTION`, the default first.
const LT_REDUCTION: [&str; 3] = ["any", "inplace", "off"];

/// Parses one `--variants` item: an attention kernel of `PCPP_FLASH128`, then optional
/// `+fused` (GEMM epilogues on; without it they are off) and `+scalar` (vectorised kernels
/// off; without it on). GPU runs of a `cuda` build only.
pub fn parse_variant(spec: &str, device: Device) -> Result<Variant> {
    if device == Device::Cpu || !cfg!(feature = "cuda") {
        bail!("--variants {spec}: kernel variants exist only for --device cuda");
    }
    let mut parts = spec.split('+');
    let name = parts.next().unwrap_or_default();
    let Some(flash) = flash_name(name) else {
        bail!(
            "--variants {spec}: `{name}` is not one of {}",
            FLASH.join(", ")
        );
    };
    let mut v = Variant {
        flash,
        fused: false,
        ..Variant::default()
    };
    for p in parts {
        match p {
            "fused" => v.fused = true,
            "scalar" => v.vector = false,
            _ => bail!("--variants {spec}: unknown part `{p}` (expected fused or scalar)"),
        }
    }
    Ok(v)
}

impl Variant {
    /// Puts the choices in force (later kernel launches and graph captures use them).
    pub fn apply(&self) {
        #[cfg(feature = "cuda")]
        {
            use pcpp_kernels::cuda::{
                set_autotune, set_autotune_report, set_conv_nhwc, set_flash_persistent,
                set_fused_epilogues, set_geglu_prefetch, set_norm_registers,
                set_programmatic_launch, set_small_gemm, set_vector_kernels,
            };
            set_flash(self.flash);
            set_fused_epilogues(self.fused);
            set_vector_kernels(self.vector);
            set_conv_nhwc(self.nhwc);
            set_autotune(self.tune);
            set_autotune_report(self.tune_report);
            set_norm_registers(self.regnorm);
            pcpp_core::set_device_windows(self.windows);
            set_programmatic_launch(self.programmatic);
            set_flash_persistent(self.persistent);
            set_geglu_prefetch(self.geglu_prefetch);
            set_small_gemm(
                pcpp_kernels::cuda::SmallGemm::parse(self.small_gemm)
                    .unwrap_or(pcpp_kernels::cuda::SmallGemm::Off),
            );
            pcpp_kernels::cuda::set_small_gemm_rows(self.small_gemm_rows);
            pcpp_kernels::cuda::set_small_gemm_splits(self.small_gemm_splits);
            use pcpp_kernels::cuda::LtReduction;
            pcpp_kernels::cuda::set_lt_reduction(match self.lt_reduction {
                "inplace" => LtReduction::InPlace,
                "off" => LtReduction::Off,
                _ => LtReduction::Any,
            });
        }
    }
}

/// Puts the attention kernel `name` (one of [`FLASH`]) in force.
#[cfg(feature = "cuda")]
fn set_flash(name: &str) {
    use pcpp_kernels::cuda::{set_flash128, set_small_split, Flash128};
    set_small_split(match name {
        "ws-split1" => 1,
        "ws-split2" => 2,
        "ws-split4" | "ws-small-wide" => 4,
        _ => pcpp_kernels::cuda::SMALL_SPLIT_DEFAULT,
    });
    set_flash128(match name {
        "shared-q" => Flash128::SharedQ,
        "registers-q" => Flash128::RegistersQ,
        "shared-q64" => Flash128::SharedQ64,
        "hopper" => Flash128::Hopper,
        "ws-pingpong" => Flash128::WarpspecPingpong,
        "ws-overlap" => Flash128::WarpspecOverlap,
        "ws2" => Flash128::Warpspec2,
        "ws-whole" => Flash128::WarpspecWhole,
        "ws3" => Flash128::Warpspec3,
        "ws3-overlap" => Flash128::Warpspec3Overlap,
        "ws-no-small" => Flash128::WarpspecNoSmall,
        "ws-small-wide" => Flash128::WarpspecSmallWide,
        _ => Flash128::Warpspec,
    });
}

/// Checks a benchmark's list of kernel choices `flag`: GPU runs of a `cuda` build only, and
/// every item one that `valid` accepts (else the error names it and what was `expected`).
fn check_gpu_list(
    flag: &str,
    items: &[String],
    device: Device,
    valid: impl Fn(&str) -> bool,
    expected: impl FnOnce() -> String,
) -> Result<()> {
    if items.is_empty() {
        return Ok(());
    }
    if device == Device::Cpu || !cfg!(feature = "cuda") {
        bail!("{flag}: kernel choices exist only for --device cuda");
    }
    match items.iter().find(|i| !valid(i)) {
        Some(i) => bail!("{flag} {i}: expected {}", expected()),
        None => Ok(()),
    }
}

/// Checks `names` (a benchmark's `--attention` list) against the attention kernels of
/// `PCPP_FLASH128`: GPU runs of a `cuda` build only.
pub fn check_attention(names: &[String], device: Device) -> Result<()> {
    let valid = |n: &str| flash_name(n).is_some();
    check_gpu_list("--attention", names, device, valid, || {
        format!("one of {}", FLASH.join(", "))
    })
}

/// Puts the attention kernel `name` in force (checked by [`check_attention`]).
pub fn apply_attention(name: &str) {
    #[cfg(feature = "cuda")]
    set_flash(name);
    #[cfg(not(feature = "cuda"))]
    let _ = name;
}

/// The row caps of `PCPP_SMALL_GEMM_ROWS` and the K-split caps of `PCPP_SMALL_GEMM_SPLITS`.
const ROWS: [usize; 3] = [64, 128, 256];
const SPLITS: [usize; 4] = [1, 2, 4, 8];

/// `t` as one of `allowed`.
fn one_of(t: &str, allowed: &[usize]) -> Option<usize> {
    t.parse().ok().filter(|v| allowed.contains(v))
}

/// A `--small-gemm` item: a `PCPP_SMALL_GEMM` level, then optionally `/ROWS` (a row cap, default
/// 256) and `/SPLITS` (a K-split cap, default 8).
fn small_gemm_item(item: &str) -> Option<(&'static str, usize, usize)> {
    let mut parts = item.split('/');
    let first = parts.next()?;
    let level = SMALL_GEMM.iter().copied().find(|s| *s == first)?;
    let rows = parts.next().map_or(Some(256), |r| one_of(r, &ROWS))?;
    let splits = parts.next().map_or(Some(8), |r| one_of(r, &SPLITS))?;
    parts.next().is_none().then_some((level, rows, splits))
}

/// Checks `bench --small-gemm` items: a GPU run of a `cuda` build, each item a level of
/// `PCPP_SMALL_GEMM` with an optional `/64`, `/128` or `/256` row cap and then an optional
/// `/1`, `/2`, `/4` or `/8` K-split cap.
pub fn check_small_gemm(items: &[String], device: Device) -> Result<()> {
    let valid = |i: &str| small_gemm_item(i).is_some();
    check_gpu_list("--small-gemm", items, device, valid, || {
        format!(
            "a level ({}), optionally /ROWS (64, 128, 256), then /SPLITS (1, 2, 4, 8)",
            SMALL_GEMM.join(", ")
        )
    })
}

/// Puts the `--small-gemm` item `item` in force (checked by [`check_small_gemm`]).
pub fn apply_small_gemm(item: &str) {
    #[cfg(feature = "cuda")]
    if let Some((level, rows, splits)) = small_gemm_item(item) {
        use pcpp_kernels::cuda::SmallGemm;
        use pcpp_kernels::cuda::{set_small_gemm, set_small_gemm_rows, set_small_gemm_splits};
        set_small_gemm(SmallGemm::parse(level).unwrap_or(SmallGemm::Off));
        set_small_gemm_rows(rows);
        set_small_gemm_splits(splits);
    }
    #[cfg(not(feature = "cuda"))]
    let _ = item;
}

/// The kernel choices in force, for a benchmark's JSON line (empty on the CPU).
pub fn choices(device: Device) -> serde_json::Value {
    #[cfg(feature = "cuda")]
    if device != Device::Cpu {
        return serde_json::json!({
            "flash128": format!("{:?}", pcpp_kernels::cuda::flash128()),
            "vector_kernels": pcpp_kernels::cuda::vector_kernels(),
            "fused_epilogues": pcpp_kernels::cuda::fused_epilogues(),
            "conv_nhwc": pcpp_kernels::cuda::conv_nhwc(),
            "autotune": pcpp_kernels::cuda::autotune(),
            "norm_registers": pcpp_kernels::cuda::norm_registers(),
            "device_windows": pcpp_core::device_windows(),
            "programmatic_launch": pcpp_kernels::cuda::programmatic_launch(),
            "flash_persistent": pcpp_kernels::cuda::flash_persistent(),
            "geglu_prefetch": pcpp_kernels::cuda::geglu_prefetch(),
            "small_gemm": pcpp_kernels::cuda::small_gemm().name(),
            "small_gemm_rows": pcpp_kernels::cuda::small_gemm_rows(),
            "small_gemm_splits": pcpp_kernels::cuda::small_gemm_splits(),
        });
    }
    let _ = device;
    serde_json::json!({})
}

#[cfg(test)]
mod tests {
    use super::small_gemm_item;

    #[test]
    fn small_gemm_items_name_a_level_and_optional_caps() {
        assert_eq!(small_gemm_item("1"), Some(("1", 256, 8)));
        assert_eq!(small_gemm_item("geglu/128"), Some(("geglu", 128, 8)));
        assert_eq!(small_gemm_item("0/64"), Some(("0", 64, 8)));
        assert_eq!(small_gemm_item("1/256/4"), Some(("1", 256, 4)));
        for bad in [
            "2",
            "fused",
            "1/96",
            "1/",
            "/64",
            "gemm/128/64",
            "1/256/3",
            "1/64/2/2",
        ] {
            assert_eq!(small_gemm_item(bad), None, "{bad}");
        }
    }
}
