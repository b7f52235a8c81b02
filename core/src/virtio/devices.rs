//! Which virtio devices a VM can have, as JSON (`{"kind": "rng"}`, ...):
//! one tagged enum the C ABI, the TypeScript API and the CLI share. Each kind
//! builds its device after checking the host side (files, sockets, TAPs), so a
//! bad configuration is an error before the VM runs.

use serde::Deserialize;

use super::balloon::{Balloon, BalloonConfig, DEFAULT_STATS_INTERVAL_MS};
use super::block::{Block, BlockConfig};
use super::net::{Net, NetConfig};
use super::rng::Rng;
use super::vsock::Vsock;
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
    /// virtio-blk: a disk backed by a raw image file (or block device).
    Block {
        #[serde(default)]
        name: Option<String>,
        /// The image's path.
        path: String,
        /// Offer the disk read-only (VIRTIO_BLK_F_RO; writes are IOERR).
        #[serde(default)]
        readonly: bool,
        /// What GET_ID returns (at most 20 printable ASCII characters).
        #[serde(default)]
        serial: String,
        /// Limits on the disk's bytes and requests per second.
        #[serde(default, rename = "rateLimiter")]
        rate_limiter: Option<crate::rate_limiter::RateLimiterConfig>,
    },
    /// virtio-balloon: memory back from the guest at a target the host sets,
    /// statistics and free page reporting (see `balloon`).
    #[serde(rename_all = "camelCase")]
    Balloon {
        /// The device's name in listings (default: the kind and a number).
        #[serde(default)]
        name: Option<String>,
        /// How often the guest is asked for statistics (0: only on request).
        #[serde(default = "default_stats_interval")]
        stats_interval_ms: u32,
        /// Offer VIRTIO_BALLOON_F_DEFLATE_ON_OOM.
        #[serde(default)]
        deflate_on_oom: bool,
        /// Offer VIRTIO_BALLOON_F_REPORTING.
        #[serde(default = "default_true")]
        free_page_reporting: bool,
    },
    /// virtio-vsock: guest streams to host Unix sockets (Firecracker's
    /// convention: `path` for host-initiated connections, `path_<port>` for
    /// the guest's).
    Vsock {
        /// The device's name in listings.
        #[serde(default)]
        name: Option<String>,
        /// The guest's context id (3 to 2^32 - 2).
        cid: u64,
        /// The host socket the device listens on.
        path: String,
    },
    /// virtio-net on a TAP (`{"kind": "net", "tap": "tap0"}` or
    /// `{"kind": "net", "netns": "ns1", "hostAddress": "10.0.2.1/24"}`).
    Net(NetConfig),
}

fn default_stats_interval() -> u32 {
    DEFAULT_STATS_INTERVAL_MS
}

fn default_true() -> bool {
    true
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
            DeviceConfig::Block { .. } => "block",
            DeviceConfig::Balloon { .. } => "balloon",
            DeviceConfig::Vsock { .. } => "vsock",
            DeviceConfig::Net(_) => "net",
        }
    }

    /// The name the user gave, if any.
    pub fn name(&self) -> Option<&str> {
        match self {
            DeviceConfig::Rng { name }
            | DeviceConfig::Block { name, .. }
            | DeviceConfig::Balloon { name, .. }
            | DeviceConfig::Vsock { name, .. } => name.as_deref(),
            DeviceConfig::Net(c) => c.name.as_deref(),
        }
    }

    /// Builds the device, checking its host-side resources.
    pub fn build(&self) -> Result<Box<dyn VirtioDevice>, VirtioError> {
        self.build_claiming(true)
    }

    /// Builds the device; with `claim` false it takes no exclusive host
    /// resource (a disk image's lock, a vsock socket's path) until
    /// [`VirtioDevice::take_over`].
    pub fn build_claiming(&self, claim: bool) -> Result<Box<dyn VirtioDevice>, VirtioError> {
        match self {
            DeviceConfig::Rng { .. } => Ok(Box::new(Rng::default())),
            DeviceConfig::Block {
                path,
                readonly,
                serial,
                rate_limiter,
                ..
            } => {
                let config = BlockConfig {
                    path: path.clone(),
                    readonly: *readonly,
                    serial: serial.clone(),
                    rate_limiter: *rate_limiter,
                };
                if claim {
                    Block::open(config)
                } else {
                    Block::open_unclaimed(config)
                }
            }
            .map(|b| Box::new(b) as Box<dyn VirtioDevice>)
            .map_err(|e| VirtioError::Malformed(e.to_string())),
            DeviceConfig::Balloon {
                stats_interval_ms,
                deflate_on_oom,
                free_page_reporting,
                ..
            } => Ok(Box::new(Balloon::new(BalloonConfig {
                stats_interval_ms: *stats_interval_ms,
                deflate_on_oom: *deflate_on_oom,
                free_page_reporting: *free_page_reporting,
            }))),
            DeviceConfig::Vsock { cid, path, .. } if claim => Ok(Box::new(Vsock::new(*cid, path)?)),
            DeviceConfig::Vsock { cid, path, .. } => {
                Ok(Box::new(Vsock::new_unclaimed(*cid, path)?))
            }
            DeviceConfig::Net(c) => Ok(Box::new(Net::new(c)?)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_block_device_checks_its_image_when_built() {
        let c =
            DeviceConfig::from_json(br#"{"kind":"block","path":"/nonexistent/disk.img"}"#).unwrap();
        assert_eq!(c.kind(), "block");
        let Err(VirtioError::Malformed(m)) = c.build() else {
            panic!("a missing image must not build");
        };
        assert_eq!(m, "disk image /nonexistent/disk.img does not exist");
        let img = std::env::temp_dir().join(format!("dv-devices-{}.img", std::process::id()));
        std::fs::write(&img, [0u8; 4096]).unwrap();
        let json = format!(
            r#"{{"kind":"block","name":"d","path":{:?},"readonly":true,"serial":"s"}}"#,
            img.to_string_lossy()
        );
        let c = DeviceConfig::from_json(json.as_bytes()).unwrap();
        assert_eq!(c.name(), Some("d"));
        let d = c.build().unwrap();
        assert_eq!(d.describe()["readonly"], true);
        drop(d);
        std::fs::remove_file(img).unwrap();
        assert!(
            DeviceConfig::from_json(br#"{"kind":"block"}"#).is_err(),
            "path is required"
        );
    }

    #[test]
    fn parses_kinds_and_refuses_unknown_ones() {
        let c = DeviceConfig::from_json(br#"{"kind":"rng"}"#).unwrap();
        assert_eq!(c, DeviceConfig::Rng { name: None });
        assert_eq!(c.kind(), "rng");
        let named = DeviceConfig::from_json(br#"{"kind":"rng","name":"entropy"}"#).unwrap();
        assert_eq!(named.name(), Some("entropy"));
        let b = DeviceConfig::from_json(br#"{"kind":"balloon","statsIntervalMs":0}"#).unwrap();
        assert_eq!(
            b,
            DeviceConfig::Balloon {
                name: None,
                stats_interval_ms: 0,
                deflate_on_oom: false,
                free_page_reporting: true
            }
        );
        assert_eq!(b.kind(), "balloon");
        let net = DeviceConfig::from_json(br#"{"kind":"net","tap":"tap0","name":"eth"}"#).unwrap();
        assert_eq!((net.kind(), net.name()), ("net", Some("eth")));
        for bad in [
            &br#"{"kind":"net","tap":"tap0","bogus":1}"#[..],
            br#"{"kind":"balloon","statsIntervalMs":-1}"#,
            br#"{"kind":"balloon","stats_interval_ms":5}"#,
            br#"{"kind":"floppy"}"#,
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

    #[test]
    fn a_vsock_device_needs_a_cid_and_a_path_whose_directory_exists() {
        let c =
            DeviceConfig::from_json(br#"{"kind":"vsock","cid":3,"path":"/tmp/x.sock"}"#).unwrap();
        assert_eq!(c.kind(), "vsock");
        for bad in [
            &br#"{"kind":"vsock","cid":3}"#[..],
            br#"{"kind":"vsock","path":"/tmp/x"}"#,
            br#"{"kind":"vsock","cid":-1,"path":"/tmp/x"}"#,
            br#"{"kind":"vsock","cid":3,"path":"/tmp/x","port":1}"#,
        ] {
            assert!(DeviceConfig::from_json(bad).is_err());
        }
        let missing = DeviceConfig::from_json(
            br#"{"kind":"vsock","cid":3,"path":"/nonexistent-dv-dir/v.sock"}"#,
        )
        .unwrap();
        let e = missing.build().err().unwrap();
        assert_eq!(
            e.to_string(),
            "vsock path /nonexistent-dv-dir/v.sock: its directory does not exist"
        );
    }
}
