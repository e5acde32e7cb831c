//! Build script of `pcpp-comm`.
//!
//! Only does something when the `ucx` feature is enabled: it locates the
//! system UCX (Debian `libucx-dev`) through `pkg-config`, links `libucp` /
//! `libucs`, and runs `bindgen` on `<ucp/api/ucp.h>`, allow-listing just the
//! `ucp_*` / `ucs_*` functions, types and constants the UCX back-end uses
//! (`src/ucx/ffi.rs` includes the result). See `docs/ucx.md` for why the
//! bindings are generated here instead of coming from a `*-sys` crate.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    #[cfg(feature = "ucx")]
    ucx::generate();
}

#[cfg(feature = "ucx")]
mod ucx {
    use std::env;
    use std::path::PathBuf;

    const FUNCTIONS: &[&str] = &[
        "ucp_config_read",
        "ucp_config_release",
        "ucp_config_modify",
        "ucp_init_version",
        "ucp_cleanup",
        "ucp_get_version_string",
        "ucp_worker_create",
        "ucp_worker_destroy",
        "ucp_worker_get_address",
        "ucp_worker_release_address",
        "ucp_worker_progress",
        "ucp_worker_flush_nbx",
        "ucp_ep_create",
        "ucp_ep_close_nbx",
        "ucp_tag_send_nbx",
        "ucp_tag_recv_nbx",
        "ucp_tag_recv_request_test",
        "ucp_request_check_status",
        "ucp_request_cancel",
        "ucp_request_free",
        "ucs_status_string",
        "ucp_context_query",
    ];

    const TYPES: &[&str] = &[
        "ucs_status_t",
        "ucs_status_ptr_t",
        "ucs_thread_mode_t",
        "ucp_params_t",
        "ucp_params_field",
        "ucp_feature",
        "ucp_worker_params_t",
        "ucp_worker_params_field",
        "ucp_ep_params_t",
        "ucp_ep_params_field",
        "ucp_err_handling_mode_t",
        "ucp_err_handler_t",
        "ucp_ep_close_flags_t",
        "ucp_op_attr_t",
        "ucp_request_param_t",
        "ucp_tag_recv_info_t",
        "ucp_context_attr_t",
        "ucp_context_attr_field",
        "ucs_memory_type_t",
    ];

    pub fn generate() {
        println!("cargo:rerun-if-env-changed=PKG_CONFIG_PATH");
        let lib = pkg_config::Config::new()
            .atleast_version("1.10")
            .probe("ucx")
            .unwrap_or_else(|e| {
                panic!(
                    "feature `ucx` needs the UCX development files (Debian/Ubuntu: \
                     apt-get install libucx-dev pkg-config libclang-dev clang): {e}"
                )
            });
        let mut builder = bindgen::Builder::default()
            .header_contents("pcpp_ucx_wrapper.h", "#include <ucp/api/ucp.h>\n")
            .allowlist_var("UCP_API_MAJOR")
            .allowlist_var("UCP_API_MINOR")
            .prepend_enum_name(false)
            .derive_default(true)
            .layout_tests(false)
            .generate_comments(false)
            .parse_callbacks(Box::new(bindgen::CargoCallbacks::new()));
        for f in FUNCTIONS {
            builder = builder.allowlist_function(f);
        }
        for t in TYPES {
            builder = builder.allowlist_type(t);
        }
        for dir in &lib.include_paths {
            builder = builder.clang_arg(format!("-I{}", dir.display()));
        }
        let bindings = builder
            .generate()
            .unwrap_or_else(|e| panic!("bindgen failed on <ucp/api/ucp.h>: {e}"));
        let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
        bindings
            .write_to_file(out.join("ucx_bindings.rs"))
            .expect("writing ucx_bindings.rs to OUT_DIR");
    }
}
