//! UCX back-end (feature `ucx`).
