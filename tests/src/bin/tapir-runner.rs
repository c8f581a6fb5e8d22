//! Runs a shell script the way the end-to-end tests do: directly on a host with hardware
//! virtualization, or inside the emulated nested-virt runner elsewhere. Prints the
//! script's output and exits with its status.
//!
//!   tapir-runner SCRIPT [TIMEOUT_SECS]

use std::process::ExitCode;
use std::time::Duration;

use tapir_tests::Runner;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let Some(path) = args.get(1) else {
        eprintln!("usage: tapir-runner SCRIPT [TIMEOUT_SECS]");
        return ExitCode::from(2);
    };
    let timeout = args.get(2).and_then(|t| t.parse().ok()).unwrap_or(900);
    let script = match std::fs::read_to_string(path) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("tapir-runner: {path}: {e}");
            return ExitCode::from(2);
        }
    };
    let runner = match Runner::detect() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("tapir-runner: {e}");
            return ExitCode::from(2);
        }
    };
    eprintln!("tapir-runner: {} mode", runner.mode());
    match runner.run(&script, Duration::from_secs(timeout)) {
        Ok(outcome) => {
            print!("{}", outcome.output);
            eprintln!("tapir-runner: script exited {} after {:.1} s", outcome.status, outcome.elapsed.as_secs_f64());
            ExitCode::from(u8::try_from(outcome.status).unwrap_or(1))
        }
        Err(e) => {
            eprintln!("tapir-runner: {e}");
            ExitCode::from(2)
        }
    }
}
