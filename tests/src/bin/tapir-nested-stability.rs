//! Boots the same two-guest 2 MiB transfer N times under tapir and N times under QEMU
//! (each NIC model, VMMs alternating) in the e2e runner, and prints how each run ended,
//! a line per VMM and model, and the ratio of failure rates. No run is retried.
//!
//!   tapir-nested-stability N [e1000|virtio|both]
//!
//! Exits 0 when tapir's failure rate is at or below QEMU's for every model measured, 1
//! when it is above, 2 on bad arguments or a set-up failure.

use std::collections::BTreeMap;
use std::io::Write;
use std::process::ExitCode;

use tapir_tests::stability::{summary, Model, Tally, Trial, Vmm};
use tapir_tests::Runner;

fn parse_models(arg: Option<&str>) -> Option<Vec<Model>> {
    match arg.unwrap_or("both") {
        "both" => Some(vec![Model::E1000, Model::VirtioNet]),
        "e1000" => Some(vec![Model::E1000]),
        "virtio" => Some(vec![Model::VirtioNet]),
        _ => None,
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let runs = args.get(1).and_then(|n| n.parse::<u32>().ok()).filter(|n| *n > 0);
    let (Some(runs), Some(models)) = (runs, parse_models(args.get(2).map(String::as_str))) else {
        eprintln!("usage: tapir-nested-stability N [e1000|virtio|both]   (N >= 1)");
        return ExitCode::from(2);
    };
    let runner = match Runner::detect() {
        Ok(runner) => runner,
        Err(e) => {
            eprintln!("tapir-nested-stability: {e}");
            return ExitCode::from(2);
        }
    };
    println!("tapir-nested-stability: {runs} runs per VMM and model in {} mode", runner.mode());
    let mut tallies: BTreeMap<(Vmm, Model), Tally> = BTreeMap::new();
    let mut sequence = 0;
    for round in 0..runs {
        // Alternate which VMM goes first, so neither always runs on a fresher machine.
        let order = if round % 2 == 0 { [Vmm::Tapir, Vmm::Qemu] } else { [Vmm::Qemu, Vmm::Tapir] };
        for &model in &models {
            for vmm in order {
                sequence += 1;
                let trial = match Trial::new(vmm, model, sequence) {
                    Ok(trial) => trial,
                    Err(e) => {
                        eprintln!("tapir-nested-stability: {e}");
                        return ExitCode::from(2);
                    }
                };
                let started = std::time::Instant::now();
                let result = trial.run(&runner);
                println!(
                    "run {} {vmm} {}: {result:?} ({:.0} s, logs in {})",
                    round + 1,
                    model.label(),
                    started.elapsed().as_secs_f64(),
                    trial.dir().display()
                );
                let _ = std::io::stdout().flush();
                tallies.entry((vmm, model)).or_default().add(&result);
            }
        }
    }
    print!("{}", summary(&tallies));
    let worse = models.iter().any(|model| {
        let rate = |vmm| tallies.get(&(vmm, *model)).map_or(0.0, Tally::failure_rate);
        rate(Vmm::Tapir) > rate(Vmm::Qemu)
    });
    if worse {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}
