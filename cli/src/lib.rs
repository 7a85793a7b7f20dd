//! The `moe-router` command-line tool as a library: [`run`] parses arguments and executes a
//! command; the binary is a thin wrapper around it (and the spec tests drive it directly).
//!
//! Exit codes: 0 success; 1 the command failed (bad input, invalid data, I/O error — the message
//! on stderr says what and where); 2 usage error (unknown flag, missing or malformed argument,
//! such as `--tokens 0`, `--layers 3-1` or an unknown `--preset`); 3 `validate` found the input
//! invalid.

use clap::{Parser, Subcommand};

pub mod backend;
pub mod bench;
pub mod demo;
pub mod error;
pub mod model;
pub mod plot;
pub mod route;
pub mod trace_cmds;

pub use error::CliError;

/// Mixture-of-Experts top-k routing with router replay.
#[derive(Debug, Parser)]
#[command(
    name = "moe-router",
    version,
    about,
    long_about = None,
    propagate_version = true,
    after_help = "Start here: `moe-router demo` plays out rollout routing replay (R3) end to end.\n\n\
Exit codes: 0 success; 1 the command failed (the message says what, where and what to do);\n\
2 usage error; 3 `validate` found the input invalid."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Route a batch of logits (or weigh given ids) and write ids, weights and statistics.
    Route(route::RouteArgs),
    /// Convert a routing trace between formats (mrt, npy, safetensors, sglang, nrlre1, r3v1, prime-rl).
    Convert(trace_cmds::ConvertArgs),
    /// Show a trace's header, sequences, chunks, recovery state and load (works on truncated files).
    Inspect(trace_cmds::InspectArgs),
    /// Check a trace: checksums, ids, duplicates, all-zero layers, coverage (exit 3 when invalid).
    Validate(trace_cmds::ValidateArgs),
    /// Compare two traces: router and token mismatch fractions, per-layer mismatch and overlap.
    Diff(trace_cmds::DiffArgs),
    /// Join per-sample or per-rank captures into one .mrt trace (conflicting routes are errors).
    Merge(trace_cmds::MergeArgs),
    /// Play out rollout routing replay (R3) end to end on a small synthetic MoE model.
    #[command(long_about = demo::LONG_ABOUT)]
    Demo(demo::DemoArgs),
    /// Quick routing throughput of every backend compiled in and available here.
    Bench(bench::BenchArgs),
}

/// Exit code: success.
pub const EXIT_OK: u8 = 0;
/// Exit code: the command failed (message on stderr).
pub const EXIT_FAILED: u8 = 1;
/// Exit code: usage error.
pub const EXIT_USAGE: u8 = 2;
/// Exit code: `validate` found the input invalid.
pub const EXIT_INVALID: u8 = 3;

/// Parses `args` (including the program name) and runs the command; returns the exit code.
/// Errors are printed to stderr (captured by [`trace_cmds::capture_output`]).
pub fn run<I, T>(args: I) -> u8
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let cli = match Cli::try_parse_from(args) {
        Ok(c) => c,
        Err(e) => {
            if trace_cmds::capturing() {
                let text = e.render().to_string();
                trace_cmds::emit(text.trim_end().to_string(), e.use_stderr());
            } else {
                let _ = e.print();
            }
            return if e.use_stderr() { EXIT_USAGE } else { EXIT_OK };
        }
    };
    let result = match cli.command {
        Command::Route(a) => route::run(&a),
        Command::Convert(a) => trace_cmds::convert(&a),
        Command::Inspect(a) => trace_cmds::inspect(&a),
        Command::Validate(a) => trace_cmds::validate(&a),
        Command::Diff(a) => trace_cmds::diff(&a),
        Command::Merge(a) => trace_cmds::merge(&a),
        Command::Demo(a) => demo::run(&a),
        Command::Bench(a) => bench::run(&a),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            trace_cmds::emit(format!("error: {e}"), true);
            e.exit_code()
        }
    }
}
