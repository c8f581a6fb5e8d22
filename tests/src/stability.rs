//! Issue 11's measured comparison: the same two-guest transfer, booted N times under
//! tapir and N times under QEMU as the inner VMM of the emulated nested-virt runner, with
//! the same kernel, the same initramfs and the same kind of link between the guests.
//! Every run is classified, so the failure rates of the two VMMs can be compared.
//!
//! A run is one outer VM: the receiving guest boots, and once its init runs the sending
//! guest boots and sends `PAYLOAD_BYTES` of random data over busybox nc. The runs of the
//! VMMs alternate, so a slow or noisy stretch of the host hits both. No run is retried.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::time::Duration;

use crate::runner::outer_kernel_crash;
use crate::{value_after, Runner, RunnerError, Scenario};

pub const PAYLOAD_BYTES: usize = 2 * 1024 * 1024;
/// A guest process (tapir or QEMU) is killed after this long: a guest whose console
/// stopped (a frozen guest) is ended by it.
const GUEST_TIMEOUT_SECS: u32 = 300;
/// Once one guest has ended, the other gets this long to finish before it is killed.
const PEER_GRACE_SECS: u32 = 60;
/// How long the sender's boot waits for the receiver's init.
const RECEIVER_READY_SECS: u32 = 240;
/// The whole outer-VM run, including its own boot.
const RUN_TIMEOUT: Duration = Duration::from_secs(900);
const STREAM_PORT: u16 = 7100;
const EXIT_MARKER: &str = "STABILITY-EXIT-";
/// Printed when the script kills a guest that outlived its peer by `PEER_GRACE_SECS`.
const KILLED_MARKER: &str = "STABILITY-KILLED-";
const READY_MARKER: &str = "TAPIR-GUEST-READY";
const GUEST_STATUS_MARKER: &str = "TAPIR-GUEST-STATUS=";
/// The status `timeout(1)` exits with when it had to kill the VMM.
const TIMED_OUT: i32 = 124;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Vmm {
    Tapir,
    Qemu,
}

impl fmt::Display for Vmm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Vmm::Tapir => "tapir",
            Vmm::Qemu => "qemu",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Model {
    E1000,
    VirtioNet,
}

impl Model {
    fn tapir_name(self) -> &'static str {
        match self {
            Model::E1000 => "e1000",
            Model::VirtioNet => "virtio-net",
        }
    }

    fn qemu_device(self) -> &'static str {
        match self {
            Model::E1000 => "e1000",
            Model::VirtioNet => "virtio-net-pci",
        }
    }

    fn linux_driver(self) -> &'static str {
        match self {
            Model::E1000 => "e1000",
            Model::VirtioNet => "virtio_net",
        }
    }

    /// The short name in the summary line.
    pub fn label(self) -> &'static str {
        match self {
            Model::E1000 => "e1000",
            Model::VirtioNet => "virtio",
        }
    }
}

/// How one guest's VMM process ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestEnd {
    /// The guest's command exited 0 and the VMM reported it (debug-exit status 1).
    Completed,
    /// A triple fault, or (QEMU with `-no-reboot`) a reset the guest did not ask for.
    TripleFault,
    /// The guest kernel panicked or oopsed.
    KernelCrash,
    /// The VMM was killed before the guest's init ran.
    Stalled,
    /// The guest's init ran, then the guest stopped making progress until it was killed.
    Hung,
    /// Still running `PEER_GRACE_SECS` after its peer ended, so the script killed it:
    /// the peer's failure, not its own.
    OutlivedPeer,
    /// Anything else: the guest's command failed, or the VMM refused to start.
    Failed(String),
}

impl GuestEnd {
    /// Classifies a guest from its VMM's exit status, its console log, and whether the
    /// script killed it after its peer ended.
    pub fn classify(vmm: Vmm, status: Option<i32>, log: &str, killed: bool) -> GuestEnd {
        let ready = log.contains(READY_MARKER);
        if log.contains("guest triple fault") {
            return GuestEnd::TripleFault;
        }
        if ["Kernel panic", "Oops:", "BUG: ", "general protection fault"].iter().any(|sign| log.contains(sign)) {
            return GuestEnd::KernelCrash;
        }
        if killed {
            return GuestEnd::OutlivedPeer;
        }
        let reported = value_after(log, GUEST_STATUS_MARKER).map(str::trim);
        match (status, reported) {
            (Some(1), Some("0")) => GuestEnd::Completed,
            (Some(TIMED_OUT), _) | (Some(137 | 143), None) => {
                if ready {
                    GuestEnd::Hung
                } else {
                    GuestEnd::Stalled
                }
            }
            // QEMU runs with -no-reboot: a guest reset ends it with status 0. The guest
            // only resets on purpose after printing its status.
            (Some(0), None) if vmm == Vmm::Qemu => GuestEnd::TripleFault,
            (status, reported) => GuestEnd::Failed(format!(
                "{vmm} exited {}, guest status {}",
                status.map_or("?".to_string(), |s| s.to_string()),
                reported.unwrap_or("none")
            )),
        }
    }
}

/// How one outer-VM run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunResult {
    /// The script ran to its end; each guest's end and whether the payload arrived intact.
    Finished { receiver: GuestEnd, sender: GuestEnd, transferred: bool, driver_ok: bool },
    /// The outer kernel oopsed or panicked (its signature).
    OuterKernelCrash(String),
    /// The outer VM ended or hung without reporting the script's end.
    OuterVmBroke(String),
}

/// One cell of the comparison: a VMM with one NIC model.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Tally {
    pub runs: u32,
    pub transfers: u32,
    pub triple_faults: u32,
    pub kernel_crashes: u32,
    pub stalls: u32,
    pub hangs: u32,
    pub outer_crashes: u32,
    pub outer_broke: u32,
    /// Guests killed because they outlived a failed peer (not failures of their own).
    pub outlived_peer: u32,
    pub other: u32,
}

impl Tally {
    pub fn add(&mut self, result: &RunResult) {
        self.runs += 1;
        match result {
            RunResult::OuterKernelCrash(_) => self.outer_crashes += 1,
            RunResult::OuterVmBroke(_) => self.outer_broke += 1,
            RunResult::Finished { receiver, sender, transferred, driver_ok } => {
                if *transferred && *driver_ok {
                    self.transfers += 1;
                }
                for end in [receiver, sender] {
                    match end {
                        GuestEnd::Completed => {}
                        GuestEnd::TripleFault => self.triple_faults += 1,
                        GuestEnd::KernelCrash => self.kernel_crashes += 1,
                        GuestEnd::Stalled => self.stalls += 1,
                        GuestEnd::Hung => self.hangs += 1,
                        GuestEnd::OutlivedPeer => self.outlived_peer += 1,
                        GuestEnd::Failed(_) => self.other += 1,
                    }
                }
            }
        }
    }

    /// Runs whose transfer did not complete, over all runs.
    pub fn failure_rate(&self) -> f64 {
        if self.runs == 0 {
            return 0.0;
        }
        f64::from(self.runs - self.transfers) / f64::from(self.runs)
    }
}

impl fmt::Display for Tally {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "runs={} transfers_completed={} guest_triple_faults={} guest_kernel_crashes={} guest_stalls={} guest_hangs={} outer_kernel_crashes={} outer_vm_broke={} outlived_peer={} other={} failure_rate={:.2}",
            self.runs,
            self.transfers,
            self.triple_faults,
            self.kernel_crashes,
            self.stalls,
            self.hangs,
            self.outer_crashes,
            self.outer_broke,
            self.outlived_peer,
            self.other,
            self.failure_rate()
        )
    }
}

/// `tapir/qemu` for one model: the ratio of failure rates, or what stands for it when
/// QEMU never failed.
pub fn rate_ratio(tapir: &Tally, qemu: &Tally) -> String {
    let (t, q) = (tapir.failure_rate(), qemu.failure_rate());
    let counts = format!("({}/{} vs {}/{})", tapir.runs - tapir.transfers, tapir.runs, qemu.runs - qemu.transfers, qemu.runs);
    if q > 0.0 {
        format!("{:.2} {counts}", t / q)
    } else if t == 0.0 {
        format!("0/0 {counts}")
    } else {
        format!("inf {counts}")
    }
}

fn receiver_script(driver: &str) -> String {
    format!(
        r#"echo "DRIVER=$(basename $(readlink /sys/class/net/eth0/device/driver))"
[ "$(basename $(readlink /sys/class/net/eth0/device/driver))" = {driver} ] || exit 5
ip link set eth0 up
ip addr add 10.20.0.1/24 dev eth0
printf '#!/bin/sh\ncat > /tmp/received\n' > /tmp/receive.sh
chmod +x /tmp/receive.sh
timeout {GUEST_TIMEOUT_SECS} nc -l -p 5000 -e /tmp/receive.sh
echo "GOT=$(sha256sum < /tmp/received | cut -d' ' -f1) $(wc -c < /tmp/received)"
exit 0
"#
    )
}

fn sender_script(driver: &str) -> String {
    format!(
        r#"echo "DRIVER=$(basename $(readlink /sys/class/net/eth0/device/driver))"
[ "$(basename $(readlink /sys/class/net/eth0/device/driver))" = {driver} ] || exit 5
ip link set eth0 up
ip addr add 10.20.0.2/24 dev eth0
i=0; until ping -c1 -W1 10.20.0.1 >/dev/null 2>&1; do i=$((i+1)); [ $i -gt 120 ] && exit 2; sleep 1; done
head -c {PAYLOAD_BYTES} /dev/urandom > /tmp/payload
echo "SENT=$(sha256sum < /tmp/payload | cut -d' ' -f1) $(wc -c < /tmp/payload)"
i=0; until nc 10.20.0.1 5000 < /tmp/payload 2>/dev/null; do i=$((i+1)); [ $i -gt 60 ] && exit 3; sleep 1; done
echo SEND-DONE
exit 0
"#
    )
}

fn quote(path: &Path) -> String {
    format!("'{}'", path.display().to_string().replace('\'', r"'\''"))
}

/// One trial's guests, written into a scenario directory, and the outer script.
pub struct Trial {
    pub vmm: Vmm,
    pub model: Model,
    scenario: Scenario,
}

impl Trial {
    pub fn new(vmm: Vmm, model: Model, sequence: u32) -> Result<Trial, RunnerError> {
        let mut scenario = Scenario::new(&format!("stability-{vmm}-{}-{sequence}", model.label()))?;
        let (receive_nic, send_nic) = (
            format!(
                r#"[{{"model": "{}", "backend": {{"type": "stream", "listen": "127.0.0.1:{STREAM_PORT}"}}}}]"#,
                model.tapir_name()
            ),
            format!(
                r#"[{{"model": "{}", "backend": {{"type": "stream", "connect": "127.0.0.1:{STREAM_PORT}", "connect_timeout_ms": 60000}}}}]"#,
                model.tapir_name()
            ),
        );
        scenario.guest("receiver", 1, &receive_nic, &receiver_script(model.linux_driver()))?;
        scenario.guest("sender", 1, &send_nic, &sender_script(model.linux_driver()))?;
        Ok(Trial { vmm, model, scenario })
    }

    /// The command that boots guest `vm` under this trial's VMM, console in its log.
    fn guest_command(&self, vm: &str, listen: bool, mac: &str) -> String {
        let log = quote(&self.scenario.log_path(vm));
        match self.vmm {
            Vmm::Tapir => self.scenario.tapir_command(vm, ""),
            Vmm::Qemu => {
                let server = if listen { "on" } else { "off" };
                format!(
                    "qemu-system-x86_64 -accel kvm -machine pc -cpu host -smp 1 -m 256 -nodefaults -display none \
                     -no-reboot -serial stdio -kernel {kernel} -initrd {initrd} -append '{cmdline}' \
                     -device isa-debug-exit,iobase=0xf4,iosize=4 \
                     -netdev stream,id=n0,server={server},addr.type=inet,addr.host=127.0.0.1,addr.port={STREAM_PORT} \
                     -device {device},netdev=n0,mac={mac} > {log} 2>&1",
                    kernel = quote(&self.scenario.images().vmlinuz),
                    initrd = quote(&self.scenario.initrd_path(vm)),
                    cmdline = self.scenario.guest_kernel_cmdline(),
                    device = self.model.qemu_device(),
                )
            }
        }
    }

    /// The outer VM's script: the receiver, then (once its init runs) the sender; when
    /// one ends the other gets `PEER_GRACE_SECS`; each VMM's exit status is printed.
    pub fn script(&self) -> String {
        let receiver = self.guest_command("receiver", true, "52:54:00:12:34:01");
        let sender = self.guest_command("sender", false, "52:54:00:12:34:02");
        let receiver_log = quote(&self.scenario.log_path("receiver"));
        format!(
            r#"
timeout {GUEST_TIMEOUT_SECS} {receiver} & R=$!
i=0; until grep -q {READY_MARKER} {receiver_log} 2>/dev/null || ! kill -0 $R 2>/dev/null; do i=$((i+1)); [ $i -gt {RECEIVER_READY_SECS} ] && break; sleep 1; done
timeout {GUEST_TIMEOUT_SECS} {sender} & S=$!
while kill -0 $R 2>/dev/null && kill -0 $S 2>/dev/null; do sleep 1; done
i=0; while kill -0 $R 2>/dev/null || kill -0 $S 2>/dev/null; do
  i=$((i+1))
  if [ $i -gt {PEER_GRACE_SECS} ]; then
    kill -0 $R 2>/dev/null && {{ echo {KILLED_MARKER}receiver; kill $R; }}
    kill -0 $S 2>/dev/null && {{ echo {KILLED_MARKER}sender; kill $S; }}
    break
  fi
  sleep 1
done
wait $R; echo {EXIT_MARKER}receiver=$?
wait $S; echo {EXIT_MARKER}sender=$?
"#
        )
    }

    /// Classifies a finished run from the runner's result and the guests' logs.
    pub fn classify(&self, result: &Result<crate::RunOutcome, RunnerError>) -> RunResult {
        let console = match result {
            Ok(outcome) => outcome.console.clone(),
            Err(RunnerError::Timeout { tail, .. } | RunnerError::NoStatus { tail, .. }) => tail.clone(),
            Err(other) => return RunResult::OuterVmBroke(other.to_string()),
        };
        if let Some(sign) = outer_kernel_crash(&console) {
            return RunResult::OuterKernelCrash(sign.to_string());
        }
        let outcome = match result {
            Ok(outcome) => outcome,
            Err(e) => return RunResult::OuterVmBroke(e.to_string().lines().next().unwrap_or_default().to_string()),
        };
        let log = |vm: &str| std::fs::read_to_string(self.scenario.log_path(vm)).unwrap_or_default().replace("\r\n", "\n");
        let status = |vm: &str| {
            value_after(&outcome.output, &format!("{EXIT_MARKER}{vm}=")).and_then(|s| s.trim().parse::<i32>().ok())
        };
        let (receiver_log, sender_log) = (log("receiver"), log("sender"));
        let sent = value_after(&sender_log, "SENT=").map(str::trim);
        let got = value_after(&receiver_log, "GOT=").map(str::trim);
        let driver = format!("DRIVER={}", self.model.linux_driver());
        let killed = |vm: &str| outcome.output.lines().any(|line| line.trim() == format!("{KILLED_MARKER}{vm}"));
        RunResult::Finished {
            receiver: GuestEnd::classify(self.vmm, status("receiver"), &receiver_log, killed("receiver")),
            sender: GuestEnd::classify(self.vmm, status("sender"), &sender_log, killed("sender")),
            transferred: sent.is_some_and(|s| s.ends_with(&format!(" {PAYLOAD_BYTES}"))) && sent == got,
            driver_ok: receiver_log.contains(&driver) && sender_log.contains(&driver),
        }
    }

    /// Runs the trial once and keeps the guests' logs beside the scenario's.
    pub fn run(&self, runner: &Runner) -> RunResult {
        let result = runner.run(&self.script(), RUN_TIMEOUT);
        self.classify(&result)
    }

    pub fn dir(&self) -> &Path {
        self.scenario.dir()
    }
}

/// The summary lines: one per VMM and model, then the ratio line.
pub fn summary(tallies: &BTreeMap<(Vmm, Model), Tally>) -> String {
    let mut out = String::new();
    for ((vmm, model), tally) in tallies {
        out.push_str(&format!("{vmm:5} {:6} {tally}\n", model.label()));
    }
    let empty = Tally::default();
    let ratio = |model| {
        rate_ratio(
            tallies.get(&(Vmm::Tapir, model)).unwrap_or(&empty),
            tallies.get(&(Vmm::Qemu, model)).unwrap_or(&empty),
        )
    };
    out.push_str(&format!(
        "nested failure rate tapir/qemu: e1000={} virtio={}\n",
        ratio(Model::E1000),
        ratio(Model::VirtioNet)
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const DONE: &str = "TAPIR-GUEST-READY\nGOT=abc 2097152\nTAPIR-GUEST-STATUS=0\n";

    #[test]
    fn guests_are_classified_from_status_and_console() {
        assert_eq!(GuestEnd::classify(Vmm::Tapir, Some(1), DONE, false), GuestEnd::Completed);
        assert_eq!(GuestEnd::classify(Vmm::Qemu, Some(1), DONE, false), GuestEnd::Completed);
        let fault = "TAPIR-GUEST-READY\ntapir: error: vCPU 0 stopped: guest triple fault (KVM_EXIT_SHUTDOWN) at RIP 0xfff0\n";
        assert_eq!(GuestEnd::classify(Vmm::Tapir, Some(6), fault, false), GuestEnd::TripleFault);
        // QEMU with -no-reboot exits 0 on a reset: one the guest did not ask for.
        assert_eq!(GuestEnd::classify(Vmm::Qemu, Some(0), "TAPIR-GUEST-READY\n", false), GuestEnd::TripleFault);
        // The same exit after the script killed it (QEMU exits 0 on SIGTERM) is its peer's doing.
        let killed = "TAPIR-GUEST-READY\nqemu-system-x86_64: terminating on signal 15 from pid 124 (timeout)\n";
        assert_eq!(GuestEnd::classify(Vmm::Qemu, Some(0), killed, true), GuestEnd::OutlivedPeer);
        assert!(matches!(GuestEnd::classify(Vmm::Tapir, Some(0), "TAPIR-GUEST-READY\n", false), GuestEnd::Failed(_)));
        let panic = "TAPIR-GUEST-READY\n[ 9.1] Kernel panic - not syncing: Fatal exception\n";
        assert_eq!(GuestEnd::classify(Vmm::Qemu, Some(0), panic, true), GuestEnd::KernelCrash);
        assert_eq!(GuestEnd::classify(Vmm::Tapir, Some(TIMED_OUT), "[ 0.5] booting\n", false), GuestEnd::Stalled);
        assert_eq!(GuestEnd::classify(Vmm::Tapir, Some(TIMED_OUT), "TAPIR-GUEST-READY\n", false), GuestEnd::Hung);
        assert_eq!(GuestEnd::classify(Vmm::Qemu, Some(143), "TAPIR-GUEST-READY\n", false), GuestEnd::Hung);
        let failed = GuestEnd::classify(Vmm::Tapir, Some(7), "TAPIR-GUEST-READY\nTAPIR-GUEST-STATUS=3\n", false);
        assert_eq!(failed, GuestEnd::Failed("tapir exited 7, guest status 3".into()));
    }

    #[test]
    fn tallies_count_every_kind_of_end_and_the_ratio_names_the_counts() {
        let mut tapir = Tally::default();
        let ok = RunResult::Finished {
            receiver: GuestEnd::Completed,
            sender: GuestEnd::Completed,
            transferred: true,
            driver_ok: true,
        };
        tapir.add(&ok);
        tapir.add(&RunResult::Finished {
            receiver: GuestEnd::Hung,
            sender: GuestEnd::TripleFault,
            transferred: false,
            driver_ok: true,
        });
        tapir.add(&RunResult::OuterKernelCrash("BUG: ".into()));
        tapir.add(&ok);
        assert_eq!((tapir.runs, tapir.transfers, tapir.triple_faults, tapir.hangs, tapir.outer_crashes), (4, 2, 1, 1, 1));
        assert!((tapir.failure_rate() - 0.5).abs() < 1e-9);
        let mut qemu = Tally::default();
        for _ in 0..4 {
            qemu.add(&ok);
        }
        assert_eq!(rate_ratio(&tapir, &qemu), "inf (2/4 vs 0/4)");
        assert_eq!(rate_ratio(&qemu, &qemu), "0/0 (0/4 vs 0/4)");
        qemu.add(&RunResult::OuterVmBroke("reset".into()));
        assert_eq!(rate_ratio(&tapir, &qemu), "2.50 (2/4 vs 1/5)");
        let mut tallies = BTreeMap::new();
        tallies.insert((Vmm::Tapir, Model::E1000), tapir);
        tallies.insert((Vmm::Qemu, Model::E1000), qemu);
        let text = summary(&tallies);
        assert!(text.lines().last().unwrap().starts_with("nested failure rate tapir/qemu: e1000=2.50 "), "{text}");
        assert!(text.contains("runs=4 transfers_completed=2 guest_triple_faults=1"), "{text}");
    }
}
