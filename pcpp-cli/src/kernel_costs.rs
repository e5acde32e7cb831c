//! `pcpp-cli bench --kernel-costs`: what each kind of kernel costs inside the replayed step graph
//! (PCPP §7.1's graphs; no paper section of its own). For every kind of node (kernel name,
//! memcpy, memset), and for the library kernels, this source's own kernels and all of them
//! together, the step is timed with those nodes switched off, beside a timing with everything on
//! taken just before; the difference is their in-graph cost, with the launch gaps, the
//! programmatic-launch overlaps and the L2 residency of a real replay (a profiler that
//! serialises kernels measures each one alone, with a cold cache). The costs of the kinds need
//! not add up to the step: switching one kind off can also shorten the gaps around it.

#[cfg(feature = "cuda")]
use anyhow::Result;
#[cfg(feature = "cuda")]
use pcpp_sdxl::StepGraphs;

/// The in-graph cost of one kind of node, or of a group of kinds.
#[derive(Debug, Clone)]
pub(crate) struct KernelCost {
    /// The kernel's name, `(memcpy)`, `(memset)`, or a group in brackets.
    pub kind: String,
    /// Nodes of this kind in one replayed step.
    pub nodes: usize,
    /// Of those, how many the driver would not switch off (they ran in both timings).
    pub refused: usize,
    /// Median step with everything on, timed just before (ms).
    pub step_ms: f64,
    /// Median step with these nodes switched off (ms).
    pub without_ms: f64,
}

impl KernelCost {
    fn cost_ms(&self) -> f64 {
        self.step_ms - self.without_ms
    }

    /// The cost as a JSON object (the bench's `--json` output).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "kind": self.kind,
            "nodes": self.nodes,
            "refused": self.refused,
            "step_ms": self.step_ms,
            "without_ms": self.without_ms,
            "cost_ms": self.cost_ms(),
        })
    }
}

/// Times the step with each kind of node switched off in turn (and the groups: library kernels,
/// own kernels, every kernel, memcpy and memset node), `time(graphs)` giving the median of a
/// run of replayed steps. Every node is on again when it returns, also after a failed timing.
#[cfg(feature = "cuda")]
pub(crate) fn measure(
    graphs: &mut StepGraphs,
    time: &mut dyn FnMut(&mut StepGraphs) -> Result<f64>,
) -> Result<Vec<KernelCost>> {
    use pcpp_kernels::cuda::{kernel_names, MEMCPY_KIND, MEMSET_KIND};
    let own = kernel_names();
    let mut kinds: Vec<(String, usize)> = graphs.node_kinds()?.into_iter().collect();
    kinds.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let is_copy = |k: &str| k == MEMCPY_KIND || k == MEMSET_KIND;
    let is_own = |k: &str| own.iter().any(|o| o == k);
    let count = |pick: &dyn Fn(&str) -> bool| -> usize {
        kinds.iter().filter(|(k, _)| pick(k)).map(|(_, n)| n).sum()
    };
    type Pick<'a> = Box<dyn Fn(&str) -> bool + 'a>;
    let mut groups: Vec<(String, Pick)> = Vec::new();
    for (k, _) in &kinds {
        let k2 = k.clone();
        groups.push((k.clone(), Box::new(move |x: &str| x == k2)));
    }
    groups.push((
        "[library kernels: cuBLASLt, cuDNN]".into(),
        Box::new(|k: &str| !is_copy(k) && !is_own(k)),
    ));
    groups.push((
        "[this source's kernels]".into(),
        Box::new(|k: &str| is_own(k)),
    ));
    groups.push(("[every kernel]".into(), Box::new(|k: &str| !is_copy(k))));
    groups.push(("[every node]".into(), Box::new(|_: &str| true)));
    let mut out = Vec::new();
    for (kind, pick) in &groups {
        let step_ms = time(graphs)?;
        let (without, refused) = match graphs.set_kinds_enabled(pick.as_ref(), false) {
            Ok(refused) => (time(graphs), refused),
            Err(e) => (Err(e.into()), 0),
        };
        graphs.set_kinds_enabled(pick.as_ref(), true)?;
        // A failed timing is reported (NaN) and the other kinds still measured.
        let without_ms = without.unwrap_or_else(|e| {
            eprintln!("--kernel-costs: `{kind}` not measured: {e:#}");
            f64::NAN
        });
        out.push(KernelCost {
            kind: kind.clone(),
            nodes: count(pick.as_ref()),
            refused,
            step_ms,
            without_ms,
        });
    }
    Ok(out)
}

/// The costs as a table: kind, nodes per step, cost per step and per node, largest first (the
/// groups last).
pub(crate) fn print(costs: &[KernelCost]) {
    println!("| kind | nodes (not switched) | step (ms) | without (ms) | cost (ms) | per switched node (µs) |");
    println!("|---|---|---|---|---|---|");
    let (groups, mut kinds): (Vec<&KernelCost>, Vec<&KernelCost>) =
        costs.iter().partition(|c| c.kind.starts_with('['));
    kinds.sort_by(|a, b| b.cost_ms().total_cmp(&a.cost_ms()));
    for c in kinds.into_iter().chain(groups) {
        let refused = if c.refused > 0 {
            format!(" ({})", c.refused)
        } else {
            String::new()
        };
        println!(
            "| {} | {}{refused} | {:.3} | {:.3} | {:.3} | {:.2} |",
            c.kind,
            c.nodes,
            c.step_ms,
            c.without_ms,
            c.cost_ms(),
            1e3 * c.cost_ms() / c.nodes.saturating_sub(c.refused).max(1) as f64
        );
    }
}
