//! The VM description: a JSON file (serde, unknown fields rejected) plus CLI overrides.
//! Every validation error names the field and the offending value.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use thiserror::Error;

use tapir_net::mac::MacAddr;

use crate::nic_config::NicConfig;

/// `pci=noearly` skips the early PCI scans (the AMD GART aperture search reads config
/// space of all 65536 bus/device/function triples, a VM exit each).
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 pci=noearly";
pub const MIN_MEMORY_MIB: u64 = 16;
/// The guest RAM must fit below the MMIO hole plus what we map above 4 GiB; 64 GiB is a
/// generous cap that still catches unit mistakes (bytes given as MiB).
pub const MAX_MEMORY_MIB: u64 = 64 * 1024;
pub const MAX_VCPUS: u8 = 32;

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path}: {source}")]
    Parse { path: PathBuf, source: serde_json::Error },
    #[error("config field `{field}`: {message}")]
    Invalid { field: String, message: String },
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { field: field.into(), message: message.into() }
}

fn default_name() -> String {
    "tapir".to_string()
}
fn default_vcpus() -> u8 {
    1
}
fn default_memory() -> u64 {
    256
}
fn default_true() -> bool {
    true
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// Names the VM in logs and seeds derived MAC addresses.
    #[serde(default = "default_name")]
    pub name: String,
    #[serde(default = "default_vcpus")]
    pub vcpus: u8,
    #[serde(default = "default_memory")]
    pub memory_mib: u64,
    /// A bzImage or an ELF vmlinux with a PVH entry note.
    #[serde(default)]
    pub kernel: Option<PathBuf>,
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    #[serde(default)]
    pub cmdline: Option<String>,
    /// Appended to `cmdline` (or to the default), for per-run additions by scripts.
    #[serde(default)]
    pub cmdline_append: Option<String>,
    /// Connect the 16550 UART at 0x3f8 to stdin/stdout.
    #[serde(default = "default_true")]
    pub serial: bool,
    /// Writing V to port 0xf4 exits tapir with status (V << 1) | 1, like QEMU's isa-debug-exit.
    #[serde(default)]
    pub debug_exit: bool,
    #[serde(default)]
    pub nics: Vec<NicConfig>,
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            name: default_name(),
            vcpus: default_vcpus(),
            memory_mib: default_memory(),
            kernel: None,
            initrd: None,
            cmdline: None,
            cmdline_append: None,
            serial: true,
            debug_exit: false,
            nics: Vec::new(),
        }
    }
}

impl VmConfig {
    /// Reads a config file. Relative paths inside it are resolved against the file's
    /// directory, so example configs work from any working directory.
    pub fn from_file(path: &Path) -> Result<VmConfig, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
        let mut cfg: VmConfig = serde_json::from_str(&text)
            .map_err(|source| ConfigError::Parse { path: path.to_path_buf(), source })?;
        let base = path.parent().unwrap_or_else(|| Path::new("."));
        for p in [&mut cfg.kernel, &mut cfg.initrd].into_iter().flatten() {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        Ok(cfg)
    }

    pub fn kernel_path(&self) -> Result<&Path, ConfigError> {
        self.kernel
            .as_deref()
            .ok_or_else(|| invalid("kernel", "missing: give a kernel image in the config or with --kernel"))
    }

    pub fn effective_cmdline(&self) -> String {
        let base = self.cmdline.clone().unwrap_or_else(|| DEFAULT_CMDLINE.to_string());
        match self.cmdline_append.as_deref().map(str::trim).filter(|a| !a.is_empty()) {
            Some(extra) => format!("{base} {extra}"),
            None => base,
        }
    }

    /// Checks everything that can be checked without touching KVM or the network.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.name.is_empty() || self.name.len() > 64 {
            return Err(invalid("name", format!("{:?} must be 1 to 64 characters", self.name)));
        }
        if self.name.chars().any(|c| c.is_control() || c == '/') {
            return Err(invalid("name", format!("{:?} must not contain '/' or control characters", self.name)));
        }
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(invalid("vcpus", format!("{} is out of range 1..={MAX_VCPUS}", self.vcpus)));
        }
        if self.memory_mib < MIN_MEMORY_MIB || self.memory_mib > MAX_MEMORY_MIB {
            return Err(invalid(
                "memory_mib",
                format!("{} is out of range {MIN_MEMORY_MIB}..={MAX_MEMORY_MIB}", self.memory_mib),
            ));
        }
        let kernel = self.kernel_path()?;
        check_file("kernel", kernel)?;
        if let Some(initrd) = &self.initrd {
            check_file("initrd", initrd)?;
        }
        let cmdline = self.effective_cmdline();
        if cmdline.len() >= crate::boot::CMDLINE_MAX {
            return Err(invalid(
                "cmdline",
                format!("{} bytes is too long (limit {})", cmdline.len(), crate::boot::CMDLINE_MAX - 1),
            ));
        }
        if cmdline.contains('\0') {
            return Err(invalid("cmdline", "contains a NUL byte"));
        }
        let mut macs: Vec<(MacAddr, usize)> = Vec::new();
        for (index, nic) in self.nics.iter().enumerate() {
            nic.validate(index)?;
            let mac = nic.effective_mac(&self.name, index);
            if let Some((_, other)) = macs.iter().find(|(m, _)| *m == mac) {
                return Err(invalid(
                    format!("nics[{index}].mac"),
                    format!("{mac} is already used by nics[{other}]; every NIC of a VM needs its own MAC"),
                ));
            }
            macs.push((mac, index));
        }
        Ok(())
    }
}

fn check_file(field: &str, path: &Path) -> Result<(), ConfigError> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => Ok(()),
        Ok(_) => Err(invalid(field, format!("{} is not a regular file", path.display()))),
        Err(e) => Err(invalid(field, format!("{}: {e}", path.display()))),
    }
}

pub(crate) fn field_error(field: impl Into<String>, message: impl Into<String>) -> ConfigError {
    invalid(field, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<VmConfig, serde_json::Error> {
        serde_json::from_str(json)
    }

    #[test]
    fn defaults_fill_missing_fields() {
        let cfg = parse(r#"{"kernel": "/k"}"#).unwrap();
        assert_eq!(cfg.vcpus, 1);
        assert_eq!(cfg.memory_mib, 256);
        assert!(cfg.serial);
        assert!(!cfg.debug_exit);
        assert_eq!(cfg.effective_cmdline(), DEFAULT_CMDLINE);
    }

    #[test]
    fn unknown_fields_are_rejected_by_name() {
        let err = parse(r#"{"kernel": "/k", "memroy_mib": 5}"#).unwrap_err().to_string();
        assert!(err.contains("memroy_mib"), "{err}");
    }

    #[test]
    fn validation_names_field_and_value() {
        let dir = std::env::temp_dir().join(format!("tapir-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let kernel = dir.join("k");
        std::fs::write(&kernel, b"x").unwrap();
        let mut cfg = VmConfig { kernel: Some(kernel.clone()), ..Default::default() };
        assert!(cfg.validate().is_ok());

        cfg.vcpus = 0;
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("`vcpus`") && err.contains('0'), "{err}");
        cfg.vcpus = 1;

        cfg.memory_mib = 1;
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("`memory_mib`") && err.contains('1'), "{err}");
        cfg.memory_mib = 128;

        cfg.initrd = Some(dir.join("missing-initrd"));
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("`initrd`") && err.contains("missing-initrd"), "{err}");
        cfg.initrd = None;

        cfg.kernel = None;
        assert!(cfg.validate().unwrap_err().to_string().contains("`kernel`"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn relative_paths_resolve_against_config_dir() {
        let dir = std::env::temp_dir().join(format!("tapir-cfg-rel-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("vm.json");
        std::fs::write(&file, r#"{"kernel": "img/vmlinux", "initrd": "/abs/initrd"}"#).unwrap();
        let cfg = VmConfig::from_file(&file).unwrap();
        assert_eq!(cfg.kernel.unwrap(), dir.join("img/vmlinux"));
        assert_eq!(cfg.initrd.unwrap(), PathBuf::from("/abs/initrd"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[cfg(test)]
mod example_tests {
    use super::*;

    /// Every shipped example must stay valid against the schema.
    #[test]
    fn example_configs_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../resources/examples");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            let cfg = VmConfig::from_file(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            for (i, nic) in cfg.nics.iter().enumerate() {
                nic.validate(i).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            }
            seen += 1;
        }
        assert!(seen >= 5, "expected the example configs in {}", dir.display());
    }
}
