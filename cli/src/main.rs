//! `moe-router`: the command-line tool (see the library [`moe_router_cli`] for the commands and
//! exit codes).

use std::process::ExitCode;

fn main() -> ExitCode {
    ExitCode::from(moe_router_cli::run(std::env::args_os()))
}
