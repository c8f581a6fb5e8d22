//! The host tap backend: one tap interface, opened with IFF_VNET_HDR so checksum and
//! segmentation offloads cross to the host kernel as metadata instead of being done in
//! software.
//!
//! tapir issues its own tun ioctls (through nix) instead of using a tun crate, because it
//! needs IFF_VNET_HDR, IFF_MULTI_QUEUE, TUNSETVNETHDRSZ and TUNSETOFFLOAD.
//!
//! Config (`TapConfig`), e.g.:
//!
//! ```json
//! {"ifname": "tap0"}
//! {"ifname": "tapir-web", "bridge": "br0"}
//! {"fd": 3}
//! {"ifname": "tap1", "vnet_hdr": false}
//! ```
//!
//! Lifetime rules:
//! - A tap that tapir creates is non-persistent, so the kernel deletes it when the fd
//!   closes, including when tapir is killed. The fd is close-on-exec so no child process
//!   keeps it alive.
//! - A tap that existed before (e.g. a persistent tap pre-created for a user without
//!   root) is left as it was found, apart from being brought up and attached to a bridge.
//! - If the tap is deleted under a running VM, the backend logs one error, reports the
//!   link down, counts every later frame as dropped, and swaps its poll fd for an fd that
//!   never polls readable, so an event loop does not spin on POLLERR.

mod netlink;
mod sys;
#[cfg(test)]
mod tests;

use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};

use libc::c_short;
use serde::Deserialize;
use thiserror::Error;

use crate::backend::{Backend, BackendCounters, BackendError, Offloads, VnetHdr, MAX_FRAME_LEN};
use crate::counters::{drop_reasons, LinkCounters};
use crate::log_limit::LogLimiter;
use crate::mac::MacAddr;
use crate::warn_limited;

/// Name pattern for taps created without a configured name; the kernel fills in `%d`.
pub const DEFAULT_IFNAME_PATTERN: &str = "tapir%d";

/// `"backend": {"type": "tap", ...}` in the VM config.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct TapConfig {
    /// An existing tap to attach to, or the name of the tap to create. Without it (and
    /// without `fd`), tapir creates `tapir0`, `tapir1`, ...
    pub ifname: Option<String>,
    /// An already-open tap fd handed over by a launcher (tapir takes ownership).
    pub fd: Option<i32>,
    /// An existing bridge to attach the tap to.
    pub bridge: Option<String>,
    /// Carry virtio-net headers (and with them checksum/TSO offloads) through the tap.
    pub vnet_hdr: bool,
}

impl Default for TapConfig {
    fn default() -> Self {
        TapConfig { ifname: None, fd: None, bridge: None, vnet_hdr: true }
    }
}

#[derive(Debug, Error)]
pub enum TapError {
    #[error("tap \"{field}\": {value:?} {reason}")]
    InvalidConfig { field: &'static str, value: String, reason: String },
    #[error("tap: cannot open /dev/net/tun: {source}{hint}")]
    OpenTunDevice { source: io::Error, hint: &'static str },
    #[error(
        "tap \"ifname\": {ifname:?} does not exist and creating a tap needs CAP_NET_ADMIN. \
         Pre-create it once as root and give it to your user: \
         `ip tuntap add dev {ifname} mode tap user $USER vnet_hdr multi_queue && ip link set {ifname} up{bridge_hint}`"
    )]
    NeedsCapNetAdmin { ifname: String, bridge_hint: String },
    #[error(
        "tap \"ifname\": {ifname:?} exists but this user may not attach to it ({owner}). \
         Re-create it for your user: `ip tuntap del dev {ifname} mode tap && \
         ip tuntap add dev {ifname} mode tap user $USER vnet_hdr multi_queue`"
    )]
    NotPermitted { ifname: String, owner: String },
    #[error("tap \"ifname\": {ifname:?} is already in use by another process")]
    Busy { ifname: String },
    #[error(
        "tap \"ifname\": {ifname:?} already has {queues} open queue(s) held by another \
         process; two VMs on one tap would each see part of its traffic"
    )]
    AlreadyAttached { ifname: String, queues: u32 },
    #[error("tap \"ifname\": {ifname:?} exists but is not a tap ({what})")]
    NotATap { ifname: String, what: String },
    #[error("tap {ifname:?}: {op} failed: {source}")]
    Ioctl { ifname: String, op: &'static str, source: io::Error },
    #[error("tap \"bridge\": {bridge:?}: cannot attach tap {ifname:?}: {reason}")]
    Bridge { bridge: String, ifname: String, reason: String },
}

/// The MAC tapir gives the host side of a tap it creates: the guest's MAC with its first
/// octet replaced by 0xfe (0xfa if it already was 0xfe). It differs from the guest's own MAC (which the host must not
/// claim), and being numerically high it never becomes a bridge's address (a bridge
/// takes the lowest MAC among its ports).
pub fn host_side_mac(guest: MacAddr) -> MacAddr {
    let mut octets = guest.0;
    octets[0] = if octets[0] == 0xfe { 0xfa } else { 0xfe };
    MacAddr(octets)
}

fn invalid(field: &'static str, value: &str, reason: impl Into<String>) -> TapError {
    TapError::InvalidConfig { field, value: value.to_string(), reason: reason.into() }
}

fn validate_ifname(field: &'static str, name: &str) -> Result<(), TapError> {
    if name.is_empty() {
        return Err(invalid(field, name, "is empty"));
    }
    if name.len() > sys::MAX_IFNAME_LEN {
        return Err(invalid(
            field,
            name,
            format!("is longer than {} bytes, the kernel's limit", sys::MAX_IFNAME_LEN),
        ));
    }
    if name == "." || name == ".." || name.bytes().any(|b| b == b'/' || b == b':' || b <= b' ') {
        return Err(invalid(field, name, "is not a valid interface name"));
    }
    Ok(())
}

impl TapConfig {
    pub fn validate(&self) -> Result<(), TapError> {
        if let Some(name) = &self.ifname {
            validate_ifname("ifname", name)?;
        }
        if let Some(bridge) = &self.bridge {
            validate_ifname("bridge", bridge)?;
            if bridge.contains('%') {
                return Err(invalid("bridge", bridge, "is not a valid interface name"));
            }
        }
        if let Some(fd) = self.fd {
            if fd < 0 {
                return Err(invalid("fd", &fd.to_string(), "is negative"));
            }
        }
        Ok(())
    }
}

drop_reasons! {
    /// The drops a tap counts, in the order `counters()` reports them.
    enum DropKind {
        TapGone => "tap_gone",
        TapDown => "tap_down",
        TxRejected => "tx_rejected_by_kernel",
        TxError => "tx_error",
        TxTooLarge => "tx_too_large",
        TxOffloadWithoutVnetHdr => "tx_offload_without_vnet_hdr",
        RxError => "rx_error",
        RxTooLargeForBuffer => "rx_too_large_for_buffer",
        RxRunt => "rx_runt",
    }
}

pub struct Tap {
    /// The tap fd; once the tap is gone, a silent eventfd under the same number.
    fd: OwnedFd,
    ifname: String,
    /// tapir created this tap, so it must vanish when tapir exits.
    created: bool,
    /// Every frame on this fd is preceded by a 12-byte virtio-net header.
    vnet_hdr: bool,
    supported: Offloads,
    rx_offloads: Offloads,
    gone: bool,
    counts: LinkCounters<DropKind>,
    log: LogLimiter,
    /// Receive buffer for callers whose buffer is shorter than `MAX_FRAME_LEN`: a short
    /// read from a tap loses the frame, so the read always has room for the largest one.
    scratch: Vec<u8>,
}

impl Tap {
    /// Opens (or creates) the tap `cfg` describes, sets up its virtio-net header and
    /// offloads, attaches it to `cfg.bridge` and brings it up. `mac_hint` is the guest's
    /// MAC: a tap tapir creates gets `host_side_mac(mac_hint)` as its own address.
    pub fn open(cfg: &TapConfig, mac_hint: Option<MacAddr>) -> Result<Tap, TapError> {
        cfg.validate()?;
        let (fd, ifname, created, flags) = match cfg.fd {
            Some(raw) => adopt_fd(raw, cfg)?,
            None => attach_by_name(cfg)?,
        };
        let ioctl_err = |op, source| TapError::Ioctl { ifname: ifname.clone(), op, source };

        let vnet_hdr = flags & sys::IFF_VNET_HDR != 0;
        if vnet_hdr {
            sys::set_vnet_hdr_size(fd.as_fd(), VnetHdr::LEN as libc::c_int)
                .map_err(|e| ioctl_err("TUNSETVNETHDRSZ", e))?;
        } else if cfg.vnet_hdr {
            log::warn!(
                "tap {ifname}: the handed-over fd has no virtio-net header (IFF_VNET_HDR); \
                 running without checksum/TSO offloads"
            );
        }
        let supported =
            if vnet_hdr && cfg.vnet_hdr { probe_offloads(fd.as_fd()) } else { Offloads::NONE };
        // Until the guest negotiates offloads, the kernel must hand us finished frames.
        if let Err(e) = sys::set_offload(fd.as_fd(), 0) {
            if vnet_hdr {
                return Err(ioctl_err("TUNSETOFFLOAD", e));
            }
        }

        let control = sys::ControlSocket::new().map_err(|e| ioctl_err("socket", e))?;
        if let Some(guest_mac) = mac_hint {
            set_or_check_host_mac(&control, &ifname, created, guest_mac);
        }
        if let Some(bridge) = &cfg.bridge {
            attach_to_bridge(&control, &ifname, bridge)?;
        }
        bring_up(&control, &ifname)?;

        log::info!(
            "tap {ifname}: {} (vnet_hdr {}, offloads {:?})",
            if created { "created" } else { "attached" },
            vnet_hdr,
            supported
        );
        Ok(Tap {
            fd,
            ifname,
            created,
            vnet_hdr,
            supported,
            rx_offloads: Offloads::NONE,
            gone: false,
            counts: LinkCounters::new(),
            log: LogLimiter::default_rate(),
            scratch: Vec::new(),
        })
    }

    /// The kernel's name for the tap (with any `%d` resolved).
    pub fn ifname(&self) -> &str {
        &self.ifname
    }

    /// Whether tapir created this tap (and it disappears when the backend is dropped).
    pub fn created(&self) -> bool {
        self.created
    }

    /// Whether the tap was deleted under us.
    pub fn is_gone(&self) -> bool {
        self.gone
    }

    /// The offloads last given to the kernel through `set_rx_offloads`.
    pub fn rx_offloads(&self) -> Offloads {
        self.rx_offloads
    }

    /// The tap was deleted (`ip link del`): log once, go link-down, and stop the poll fd
    /// from reporting POLLERR forever.
    fn mark_gone(&mut self, err: io::Error) -> BackendError {
        log::error!(
            "tap {}: the interface is gone ({err}); this NIC's link is down and its frames \
             are dropped from now on",
            self.ifname
        );
        self.gone = true;
        match crate::sys::EventFd::new() {
            Ok(silent) => {
                if let Err(e) = sys::replace_fd(silent.as_fd(), self.fd.as_raw_fd()) {
                    log::error!("tap {}: cannot retire its fd: {e}", self.ifname);
                }
            }
            Err(e) => log::error!("tap {}: cannot retire its fd: {e}", self.ifname),
        }
        BackendError::Io(io::Error::new(err.kind(), format!("tap {} is gone: {err}", self.ifname)))
    }

    fn send_error(&mut self, err: io::Error) -> BackendError {
        match err.raw_os_error() {
            Some(libc::EBADFD) => {
                self.counts.dropped(DropKind::TapGone);
                self.mark_gone(err)
            }
            Some(libc::EAGAIN) => BackendError::WouldBlock,
            Some(libc::EIO) => {
                self.counts.dropped(DropKind::TapDown);
                warn_limited!(self.log, "tap {}: interface is down; frame dropped", self.ifname);
                BackendError::Dropped("tap interface is down")
            }
            Some(libc::EINVAL) => {
                self.counts.dropped(DropKind::TxRejected);
                warn_limited!(
                    self.log,
                    "tap {}: kernel rejected a frame (bad offload header?)",
                    self.ifname
                );
                BackendError::Dropped("tap rejected the frame")
            }
            _ => {
                self.counts.dropped(DropKind::TxError);
                warn_limited!(self.log, "tap {}: write failed: {err}", self.ifname);
                BackendError::Dropped("tap write failed")
            }
        }
    }

    fn read_frame(&mut self, into_scratch: bool, buf: &mut [u8]) -> io::Result<(VnetHdr, usize)> {
        let raw = self.fd.as_raw_fd();
        let target: &mut [u8] = if into_scratch { &mut self.scratch } else { buf };
        if !self.vnet_hdr {
            return crate::sys::read(raw, target).map(|n| (VnetHdr::default(), n));
        }
        let mut hdr_bytes = [0u8; VnetHdr::LEN];
        let n = crate::sys::readv2(raw, &mut hdr_bytes, target)?;
        if n < VnetHdr::LEN {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "short virtio-net header"));
        }
        let mut hdr = VnetHdr::from_bytes(&hdr_bytes).unwrap_or_default();
        // The kernel fills only the first 10 bytes; num_buffers is the frontend's field.
        hdr.num_buffers = 0;
        Ok((hdr, n - VnetHdr::LEN))
    }
}

fn tun_open_error(source: io::Error) -> TapError {
    let hint = match source.raw_os_error() {
        Some(libc::ENOENT) | Some(libc::ENODEV) | Some(libc::ENXIO) => {
            " (is the tun module loaded? `modprobe tun`)"
        }
        Some(libc::EACCES) | Some(libc::EPERM) => {
            " (this user may not open it; hand tapir a tap fd through \"fd\" or run with access to /dev/net/tun)"
        }
        _ => "",
    };
    TapError::OpenTunDevice { source, hint }
}

/// Takes over a tap fd that a launcher opened for us.
fn adopt_fd(raw: RawFd, cfg: &TapConfig) -> Result<(OwnedFd, String, bool, c_short), TapError> {
    let value = raw.to_string();
    if !sys::fd_is_open(raw) {
        return Err(invalid("fd", &value, "is not an open file descriptor"));
    }
    // SAFETY: `raw` is open (checked above); borrowing it for the checks below does not
    // take ownership, so nothing is closed if they fail.
    let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(raw) };
    let (name, flags) = sys::get_iff(borrowed).map_err(|e| match e.raw_os_error() {
        Some(libc::EBADFD) => {
            invalid("fd", &value, "is a /dev/net/tun fd not attached to any interface")
        }
        _ => invalid("fd", &value, format!("is not a tap file descriptor (TUNGETIFF: {e})")),
    })?;
    let kind = flags & (libc::IFF_TUN as c_short | sys::IFF_TAP);
    if kind != sys::IFF_TAP {
        return Err(invalid(
            "fd",
            &value,
            format!("belongs to {name}, a tun (layer 3) device, not a tap"),
        ));
    }
    if flags & sys::IFF_NO_PI == 0 {
        return Err(invalid(
            "fd",
            &value,
            format!("belongs to tap {name}, which was opened without IFF_NO_PI (packet-information headers are not supported)"),
        ));
    }
    if let Some(want) = &cfg.ifname {
        if *want != name {
            return Err(invalid(
                "ifname",
                want,
                format!("does not match the tap of \"fd\" {raw}, which is {name:?}"),
            ));
        }
    }
    sys::make_nonblocking_cloexec(borrowed)
        .map_err(|e| invalid("fd", &value, format!("cannot be made non-blocking: {e}")))?;
    // SAFETY: the configuration hands this fd to tapir; from here on we own and close it.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    Ok((fd, name, false, flags))
}

/// Opens /dev/net/tun and attaches to (or creates) the named tap.
fn attach_by_name(cfg: &TapConfig) -> Result<(OwnedFd, String, bool, c_short), TapError> {
    let name = cfg.ifname.clone().unwrap_or_else(|| DEFAULT_IFNAME_PATTERN.to_string());
    let existing = if name.contains('%') { None } else { sys::ifindex(&name) };
    let info = existing.and_then(|index| netlink::query_link(index).ok());
    if let Some(info) = &info {
        if let Some(kind) = info.kind.as_deref().filter(|k| *k != "tun") {
            return Err(TapError::NotATap {
                ifname: name,
                what: format!("it is a {kind} interface"),
            });
        }
        if let (Some(true), Some(queues)) = (info.tun_multi_queue, info.tun_num_queues) {
            if queues > 0 {
                return Err(TapError::AlreadyAttached { ifname: name, queues });
            }
        }
    }

    let fd = sys::open_tun_device().map_err(tun_open_error)?;
    let base = sys::IFF_TAP | sys::IFF_NO_PI | if cfg.vnet_hdr { sys::IFF_VNET_HDR } else { 0 };
    // An existing tap created without multi_queue refuses a multi-queue attach (EINVAL).
    let attached = match sys::set_iff(fd.as_fd(), &name, base | sys::IFF_MULTI_QUEUE) {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => sys::set_iff(fd.as_fd(), &name, base),
        other => other,
    };
    if let Err(e) = attached {
        return Err(match e.raw_os_error() {
            Some(libc::EPERM) | Some(libc::EACCES) if existing.is_some() => {
                TapError::NotPermitted {
                    owner: match info.and_then(|i| i.tun_owner) {
                        Some(uid) => format!("it belongs to uid {uid}"),
                        None => "it is not owned by this user".to_string(),
                    },
                    ifname: name,
                }
            }
            Some(libc::EPERM) | Some(libc::EACCES) => TapError::NeedsCapNetAdmin {
                bridge_hint: match &cfg.bridge {
                    Some(br) => format!(" && ip link set {name} master {br}"),
                    None => String::new(),
                },
                ifname: name,
            },
            Some(libc::EBUSY) => TapError::Busy { ifname: name },
            Some(libc::EINVAL) if existing.is_some() => TapError::NotATap {
                ifname: name,
                what: "the kernel refused to attach to it as a tap; it may be a tun device".into(),
            },
            _ => TapError::Ioctl { ifname: name, op: "TUNSETIFF", source: e },
        });
    }
    let (actual, flags) = sys::get_iff(fd.as_fd()).map_err(|e| TapError::Ioctl {
        ifname: name.clone(),
        op: "TUNGETIFF",
        source: e,
    })?;
    let created = existing.is_none();
    if created && flags & sys::IFF_PERSIST != 0 {
        // Somebody made it persistent between our check and our attach; a tap we create
        // must disappear with us.
        let _ = sys::set_persist(fd.as_fd(), false);
    }
    Ok((fd, actual, created, flags))
}

/// Finds which offloads the kernel accepts by trying them, then switches all off.
fn probe_offloads(fd: std::os::fd::BorrowedFd<'_>) -> Offloads {
    let accepts = |flags| sys::set_offload(fd, flags).is_ok();
    let mut offloads = Offloads::NONE;
    if !accepts(sys::TUN_F_CSUM) {
        return offloads;
    }
    offloads.csum = true;
    offloads.tso4 = accepts(sys::TUN_F_CSUM | sys::TUN_F_TSO4);
    offloads.tso6 = accepts(sys::TUN_F_CSUM | sys::TUN_F_TSO6);
    let any_tso = if offloads.tso4 { sys::TUN_F_TSO4 } else { sys::TUN_F_TSO6 };
    offloads.tso_ecn =
        (offloads.tso4 || offloads.tso6) && accepts(sys::TUN_F_CSUM | any_tso | sys::TUN_F_TSO_ECN);
    offloads.ufo = accepts(sys::TUN_F_CSUM | sys::TUN_F_UFO);
    let _ = sys::set_offload(fd, 0);
    offloads
}

fn offload_flags(offloads: Offloads) -> libc::c_ulong {
    if !offloads.csum {
        return 0;
    }
    let mut flags = sys::TUN_F_CSUM;
    if offloads.tso4 {
        flags |= sys::TUN_F_TSO4;
    }
    if offloads.tso6 {
        flags |= sys::TUN_F_TSO6;
    }
    if offloads.tso_ecn && (offloads.tso4 || offloads.tso6) {
        flags |= sys::TUN_F_TSO_ECN;
    }
    if offloads.ufo {
        flags |= sys::TUN_F_UFO;
    }
    flags
}

fn set_or_check_host_mac(
    control: &sys::ControlSocket,
    ifname: &str,
    created: bool,
    guest: MacAddr,
) {
    if created {
        let host = host_side_mac(guest);
        if let Err(e) = control.set_hwaddr(ifname, host) {
            log::warn!("tap {ifname}: cannot set its host-side MAC to {host}: {e}");
        }
        return;
    }
    match control.hwaddr(ifname) {
        Ok(host) if host == guest => log::warn!(
            "tap {ifname}: its host-side MAC is {host}, the same as the guest's; the host \
             will take the guest's frames for its own. Give the guest another \"mac\" or \
             change the tap's (`ip link set {ifname} address ...`)"
        ),
        Ok(_) => {}
        Err(e) => log::debug!("tap {ifname}: cannot read its MAC: {e}"),
    }
}

fn attach_to_bridge(
    control: &sys::ControlSocket,
    ifname: &str,
    bridge: &str,
) -> Result<(), TapError> {
    let fail = |reason: String| TapError::Bridge {
        bridge: bridge.to_string(),
        ifname: ifname.to_string(),
        reason,
    };
    let Some(bridge_index) = sys::ifindex(bridge) else {
        return Err(invalid(
            "bridge",
            bridge,
            "does not exist (create it with `ip link add NAME type bridge`)",
        ));
    };
    if let Ok(info) = netlink::query_link(bridge_index) {
        match info.kind.as_deref() {
            Some("bridge") => {}
            Some(kind) => {
                return Err(invalid(
                    "bridge",
                    bridge,
                    format!("is not a bridge (it is a {kind} interface)"),
                ))
            }
            None => return Err(invalid("bridge", bridge, "is not a bridge")),
        }
    }
    let tap_index =
        control.index(ifname).map_err(|e| fail(format!("cannot find the tap's index: {e}")))?;
    if let Ok(info) = netlink::query_link(tap_index as u32) {
        match info.master {
            Some(master) if master == bridge_index => return Ok(()),
            Some(master) => {
                let other = sys::ifname_of_index(master).unwrap_or_else(|| format!("#{master}"));
                return Err(fail(format!("the tap is already a port of {other}")));
            }
            None => {}
        }
    }
    control.bridge_add(bridge, tap_index).map_err(|e| match e.raw_os_error() {
        Some(libc::EOPNOTSUPP) | Some(libc::EINVAL) => {
            invalid("bridge", bridge, format!("is not a bridge ({e})"))
        }
        Some(libc::EPERM) | Some(libc::EACCES) => fail(format!(
            "needs CAP_NET_ADMIN; attach it beforehand with `ip link set {ifname} master {bridge}` \
             and drop \"bridge\" from the config"
        )),
        _ => fail(e.to_string()),
    })?;
    log::info!("tap {ifname}: attached to bridge {bridge}");
    Ok(())
}

fn bring_up(control: &sys::ControlSocket, ifname: &str) -> Result<(), TapError> {
    match control.bring_up(ifname) {
        Ok(()) => Ok(()),
        Err(e) if matches!(e.raw_os_error(), Some(libc::EPERM) | Some(libc::EACCES)) => {
            log::warn!(
                "tap {ifname}: it is down and bringing it up needs CAP_NET_ADMIN; frames will \
                 not flow until you run `ip link set {ifname} up`"
            );
            Ok(())
        }
        Err(e) => {
            Err(TapError::Ioctl { ifname: ifname.to_string(), op: "SIOCSIFFLAGS (up)", source: e })
        }
    }
}

impl Backend for Tap {
    fn kind(&self) -> &'static str {
        "tap"
    }

    fn poll_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    fn supported_offloads(&self) -> Offloads {
        self.supported
    }

    fn set_rx_offloads(&mut self, offloads: Offloads) -> io::Result<()> {
        let offloads = offloads.and(self.supported);
        if self.gone || !self.vnet_hdr {
            self.rx_offloads = offloads;
            return Ok(());
        }
        match sys::set_offload(self.fd.as_fd(), offload_flags(offloads)) {
            Ok(()) => {
                self.rx_offloads = offloads;
                Ok(())
            }
            Err(e) if e.raw_os_error() == Some(libc::EBADFD) => {
                let _ = self.mark_gone(e);
                Ok(())
            }
            Err(e) => {
                Err(io::Error::new(e.kind(), format!("tap {}: TUNSETOFFLOAD: {e}", self.ifname)))
            }
        }
    }

    fn send(&mut self, hdr: &VnetHdr, frame: &[u8]) -> Result<(), BackendError> {
        if self.gone {
            self.counts.dropped(DropKind::TapGone);
            return Err(BackendError::Dropped("tap is gone"));
        }
        if frame.len() > MAX_FRAME_LEN {
            self.counts.dropped(DropKind::TxTooLarge);
            return Err(BackendError::Dropped("frame larger than MAX_FRAME_LEN"));
        }
        if !self.vnet_hdr && !hdr.is_plain() {
            self.counts.dropped(DropKind::TxOffloadWithoutVnetHdr);
            return Err(BackendError::Dropped("offloaded frame on a tap without vnet_hdr"));
        }
        let raw = self.fd.as_raw_fd();
        let result = loop {
            let r = if self.vnet_hdr {
                let hdr = VnetHdr { num_buffers: 0, ..*hdr };
                crate::sys::writev2(raw, &hdr.to_bytes(), frame)
            } else {
                crate::sys::write(raw, frame)
            };
            match r {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => break other,
            }
        };
        match result {
            Ok(_) => {
                // A tap takes a frame whole or not at all.
                self.counts.sent(frame.len());
                Ok(())
            }
            Err(e) => Err(self.send_error(e)),
        }
    }

    fn recv(&mut self, buf: &mut [u8]) -> Result<Option<(VnetHdr, usize)>, BackendError> {
        if self.gone {
            return Ok(None);
        }
        let into_scratch = buf.len() < MAX_FRAME_LEN;
        if into_scratch && self.scratch.len() < MAX_FRAME_LEN {
            self.scratch = vec![0u8; MAX_FRAME_LEN];
        }
        let result = loop {
            match self.read_frame(into_scratch, buf) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => break other,
            }
        };
        let (hdr, len) = match result {
            Ok(frame) => frame,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
            Err(e) if e.raw_os_error() == Some(libc::EBADFD) => return Err(self.mark_gone(e)),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                self.counts.dropped(DropKind::RxRunt);
                return Err(BackendError::Dropped("tap frame shorter than its header"));
            }
            Err(e) => {
                self.counts.dropped(DropKind::RxError);
                warn_limited!(self.log, "tap {}: read failed: {e}", self.ifname);
                return Err(BackendError::Dropped("tap read failed"));
            }
        };
        if into_scratch {
            let Some(dst) = buf.get_mut(..len) else {
                self.counts.dropped(DropKind::RxTooLargeForBuffer);
                return Err(BackendError::Dropped("frame larger than receive buffer"));
            };
            dst.copy_from_slice(self.scratch.get(..len).unwrap_or(&[]));
        }
        self.counts.received(len);
        Ok(Some((hdr, len)))
    }

    fn link_up(&self) -> bool {
        !self.gone
    }

    fn counters(&self) -> BackendCounters {
        self.counts.report(vec![("tap_gone", u64::from(self.gone))])
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        if self.created && !self.gone {
            // Non-persistent taps vanish when their last fd closes; make sure ours is one.
            if let Err(e) = sys::set_persist(self.fd.as_fd(), false) {
                log::warn!("tap {}: cannot clear persistence before closing: {e}", self.ifname);
            }
        }
    }
}
