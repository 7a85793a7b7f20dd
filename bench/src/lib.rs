//! Bench binaries of moe-router: `bench-cuda` (feature `cuda`) and `bench-wgpu` (feature
//! `wgpu`; with `cuda` too it also times the CUDA backend in the same run). They live above the
//! facade so that no backend crate depends on another. Method and numbers: `docs/benchmarks.md`.
