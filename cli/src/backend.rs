//! Backend choice on the command line: the facade's [`BackendKind`] and [`AnyRouter`], and the
//! clap parser for `--backend`.

pub use moe_router::backend::cpu_name;
pub use moe_router::{AnyRouter, BackendKind};

/// The clap value parser of `--backend`: `cpu`, `cuda` or `wgpu` (shown as possible values).
pub fn backend_parser() -> impl clap::builder::TypedValueParser<Value = BackendKind> {
    use clap::builder::TypedValueParser;
    clap::builder::PossibleValuesParser::new(BackendKind::NAMES).try_map(|s| s.parse::<BackendKind>())
}

/// Threads the CPU backend uses (rayon's pool size).
pub fn rayon_threads() -> usize {
    rayon::current_num_threads()
}
