//! Which virtio devices a VM can have, as JSON (`{"kind": "rng"}`, ...):
//! one tagged enum the C ABI, the TypeScript API and the CLI share. Each kind
//! builds its device after checking the host side (files, sockets, TAPs), so a
//! bad configuration is an error before the VM runs.

use serde::Deserialize;

use super::rng::Rng;
use super::{VirtioDevice, VirtioError};

/// A device's configuration.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "camelCase", deny_unknown_fields)]
pub enum DeviceConfig {
    /// virtio-rng: entropy from the host's getrandom.
    Rng {
        /// The device's name in listings (default: the kind and a number).
        #[serde(default)]
        name: Option<String>,
    },
}

impl DeviceConfig {
    /// Parses a configuration from JSON.
    pub fn from_json(json: &[u8]) -> Result<DeviceConfig, VirtioError> {
        serde_json::from_slice(json)
            .map_err(|e| VirtioError::Malformed(format!("device configuration: {e}")))
    }

    /// The kind, as in the JSON.
    pub fn kind(&self) -> &'static str {
        match self {
            DeviceConfig::Rng { .. } => "rng",
        }
    }

    /// The name the user gave, if any.
    pub fn name(&self) -> Option<&str> {
        match self {
            DeviceConfig::Rng { name } => name.as_deref(),
        }
    }

    /// Builds the device, checking its host-side resources.
    pub fn build(&self) -> Result<Box<dyn VirtioDevice>, VirtioError> {
        match self {
            DeviceConfig::Rng { .. } => Ok(Box::new(Rng::default())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_kinds_and_refuses_unknown_ones() {
        let c = DeviceConfig::from_json(br#"{"kind":"rng"}"#).unwrap();
        assert_eq!(c, DeviceConfig::Rng { name: None });
        assert_eq!(c.kind(), "rng");
        let named = DeviceConfig::from_json(br#"{"kind":"rng","name":"entropy"}"#).unwrap();
        assert_eq!(named.name(), Some("entropy"));
        for bad in [
            &br#"{"kind":"floppy"}"#[..],
            br#"{"kind":"rng","x":1}"#,
            b"[",
            b"{}",
        ] {
            assert!(matches!(
                DeviceConfig::from_json(bad),
                Err(VirtioError::Malformed(_))
            ));
        }
    }
}
