//! wgpu backend for moe-router (work in progress).
