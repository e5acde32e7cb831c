//! The nodes of a captured step graph by kind of kernel, switched off and on in the executable
//! graph. A bench attributes a replayed step's time to the kernels that run in it as the step's
//! time minus its time with one kind switched off: the cost of that kind inside the graph, with
//! the launch gaps, overlaps and L2 residency of a real replay, where a profiler that serialises
//! kernels measures each one alone and cold. A replay with nodes switched off computes nonsense;
//! it is only for timing. Bench tooling for the step graphs of PCPP §7.1, no paper section.

use std::collections::BTreeMap;
use std::ffi::CStr;

use cudarc::driver::sys as drv_sys;

use super::CudaGraphStep;
use crate::Result;

/// The kind that memory-copy nodes are grouped under.
pub const MEMCPY_KIND: &str = "(memcpy)";
/// The kind that memory-set nodes are grouped under.
pub const MEMSET_KIND: &str = "(memset)";

impl CudaGraphStep {
    /// Every kernel, memcpy and memset node of the graph with its kind: the kernel's name
    /// (C++ names shortened to their scope and identifier), [`MEMCPY_KIND`] or [`MEMSET_KIND`].
    fn kind_nodes(&self) -> Result<Vec<(String, drv_sys::CUgraphNode)>> {
        let err = |what: &str, e: drv_sys::CUresult| self.gpu.err(what, e);
        let g = self.graph.cu_graph();
        let mut n = 0usize;
        // SAFETY: `g` is the live graph this step owns; a null array asks for the count.
        let r = unsafe { drv_sys::cuGraphGetNodes(g, std::ptr::null_mut(), &mut n) };
        r.result().map_err(|_| err("cuGraphGetNodes", r))?;
        let mut nodes = vec![std::ptr::null_mut(); n];
        // SAFETY: `nodes` holds `n` entries.
        let r = unsafe { drv_sys::cuGraphGetNodes(g, nodes.as_mut_ptr(), &mut n) };
        r.result().map_err(|_| err("cuGraphGetNodes", r))?;
        nodes.truncate(n);
        let mut out = Vec::with_capacity(n);
        for node in nodes {
            let mut ty = drv_sys::CUgraphNodeType::CU_GRAPH_NODE_TYPE_EMPTY;
            // SAFETY: `node` belongs to `g`.
            let r = unsafe { drv_sys::cuGraphNodeGetType(node, &mut ty) };
            r.result().map_err(|_| err("cuGraphNodeGetType", r))?;
            let kind = match ty {
                drv_sys::CUgraphNodeType::CU_GRAPH_NODE_TYPE_KERNEL => self.kernel_name(node)?,
                drv_sys::CUgraphNodeType::CU_GRAPH_NODE_TYPE_MEMCPY => MEMCPY_KIND.to_string(),
                drv_sys::CUgraphNodeType::CU_GRAPH_NODE_TYPE_MEMSET => MEMSET_KIND.to_string(),
                _ => continue,
            };
            out.push((kind, node));
        }
        Ok(out)
    }

    /// The short name of the kernel that kernel node `node` launches.
    fn kernel_name(&self, node: drv_sys::CUgraphNode) -> Result<String> {
        // SAFETY: plain-data parameters, filled by the driver.
        let mut p: drv_sys::CUDA_KERNEL_NODE_PARAMS = unsafe { std::mem::zeroed() };
        // SAFETY: `node` is a kernel node of this step's graph.
        let r = unsafe { drv_sys::cuGraphKernelNodeGetParams_v2(node, &mut p) };
        r.result()
            .map_err(|_| self.gpu.err("cuGraphKernelNodeGetParams", r))?;
        let mut name: *const std::ffi::c_char = std::ptr::null();
        // SAFETY: `func` or `kern` is the node's live function; the driver returns a pointer to
        // a NUL-terminated name it owns.
        let r = unsafe {
            if !p.func.is_null() {
                drv_sys::cuFuncGetName(&mut name, p.func)
            } else {
                drv_sys::cuKernelGetName(&mut name, p.kern)
            }
        };
        if r.result().is_err() || name.is_null() {
            return Ok("(unnamed kernel)".to_string());
        }
        // SAFETY: checked non-null above; NUL-terminated per the driver's contract.
        let raw = unsafe { CStr::from_ptr(name) }.to_string_lossy();
        Ok(short_name(&raw))
    }

    /// The kinds of node in the graph ([`CudaGraphStep::set_kinds_enabled`]'s names) with how many
    /// nodes of each it holds.
    pub fn node_kinds(&self) -> Result<BTreeMap<String, usize>> {
        let mut kinds = BTreeMap::new();
        for (k, _) in self.kind_nodes()? {
            *kinds.entry(k).or_insert(0) += 1;
        }
        Ok(kinds)
    }

    /// Switches every node whose kind `pick` accepts off (`on == false`: it runs as an empty
    /// node, its dependencies kept) or back on in the executable graph, for the following
    /// replays. Returns how many nodes it switched and how many the driver would not switch
    /// (left as they were: it refuses some library kernels launched with thread-block clusters,
    /// `CUDA_ERROR_INVALID_CLUSTER_SIZE`).
    pub fn set_kinds_enabled(
        &self,
        pick: &dyn Fn(&str) -> bool,
        on: bool,
    ) -> Result<(usize, usize)> {
        let exec = self.graph.cu_graph_exec();
        let (mut switched, mut refused) = (0, 0);
        for (kind, node) in self.kind_nodes()? {
            if !pick(&kind) {
                continue;
            }
            // SAFETY: `node` is a kernel, memcpy or memset node of the graph `exec` was
            // instantiated from, the node types this call accepts.
            let r = unsafe { drv_sys::cuGraphNodeSetEnabled(exec, node, u32::from(on)) };
            if r.result().is_ok() {
                switched += 1;
            } else {
                refused += 1;
            }
        }
        Ok((switched, refused))
    }
}

/// A kernel's name as a profiler shows it, without the parameter and template lists: C names as
/// they are, Itanium-mangled C++ names (`_Z...`) as their nested scope and identifier
/// (`_ZN8cublasLt19splitKreduce_kernelILi32E...` → `cublasLt::splitKreduce_kernel`).
pub fn short_name(raw: &str) -> String {
    let Some(rest) = raw.strip_prefix("_Z") else {
        return raw.to_string();
    };
    let (nested, mut s) = match rest.strip_prefix('N') {
        Some(r) => (true, r.trim_start_matches(['K', 'V', 'r'])),
        None => (false, rest),
    };
    let mut parts = Vec::new();
    loop {
        let digits = s.bytes().take_while(u8::is_ascii_digit).count();
        let Ok(len) = s[..digits].parse::<usize>() else {
            break;
        };
        let Some(id) = s.get(digits..digits + len) else {
            break;
        };
        parts.push(id);
        s = &s[digits + len..];
        if !nested {
            break;
        }
    }
    if parts.is_empty() {
        raw.to_string()
    } else {
        parts.join("::")
    }
}

#[cfg(test)]
mod tests {
    use super::short_name;

    #[test]
    fn short_names_of_c_and_cpp_kernels() {
        assert_eq!(short_name("row_norm_reg5_f16"), "row_norm_reg5_f16");
        assert_eq!(
            short_name("_ZN8cublasLt19splitKreduce_kernelILi32ELi16EiffN6__halfEEEvv"),
            "cublasLt::splitKreduce_kernel"
        );
        assert_eq!(short_name("_Z6kernelPfi"), "kernel");
        assert_eq!(short_name("_ZNK3foo3barEv"), "foo::bar");
        assert_eq!(short_name("_Zbroken"), "_Zbroken");
    }
}
