//! One guest NIC in the config: its model, its MAC, and its backend.

use serde::Deserialize;

use tapir_net::mac::MacAddr;

use crate::config::{field_error, ConfigError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum NicModel {
    #[serde(rename = "virtio-net")]
    VirtioNet,
    #[serde(rename = "e1000")]
    E1000,
}

impl std::fmt::Display for NicModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            NicModel::VirtioNet => "virtio-net",
            NicModel::E1000 => "e1000",
        })
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NicConfig {
    pub model: NicModel,
    /// Absent: derived from the VM name and this NIC's index (stable, locally administered).
    #[serde(default)]
    pub mac: Option<String>,
    /// Advertised to a virtio-net guest (VIRTIO_NET_F_MTU); e1000 ignores it.
    #[serde(default)]
    pub mtu: Option<u16>,
    pub backend: crate::nic_config::BackendConfig,
}

/// Where a NIC's frames go. The `type` field picks the backend.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum BackendConfig {
    Tap(tapir_net::tap::TapConfig),
    User(tapir_net::nat::UserNetConfig),
    Stream(tapir_net::socket::StreamConfig),
    Dgram(tapir_net::socket::DgramConfig),
}

impl NicConfig {
    pub fn effective_mac(&self, vm_name: &str, index: usize) -> MacAddr {
        self.mac
            .as_deref()
            .and_then(|m| m.parse::<MacAddr>().ok())
            .unwrap_or_else(|| MacAddr::derive(vm_name, index))
    }

    pub fn validate(&self, index: usize) -> Result<(), ConfigError> {
        if let Some(mac) = &self.mac {
            mac.parse::<MacAddr>()
                .and_then(MacAddr::validate_for_nic)
                .map_err(|e| field_error(format!("nics[{index}].mac"), e.to_string()))?;
        }
        if let Some(mtu) = self.mtu {
            if !(68..=65520).contains(&mtu) {
                return Err(field_error(format!("nics[{index}].mtu"), format!("{mtu} is out of range 68..=65520")));
            }
        }
        Ok(())
    }
}
