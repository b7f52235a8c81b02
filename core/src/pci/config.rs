//! A PCI type-0 configuration space: 256 bytes of registers with a write mask
//! per byte, BARs whose sizing protocol falls out of that mask, and a
//! capability list.
//!
//! Plain data ([`ConfigState`] serializes), so a device's PCI state can be
//! written out and read back.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::state::{check_len, StateError};

/// The size of the (conventional) configuration space.
pub const CONFIG_SIZE: usize = 256;
/// Where the capability list starts.
const FIRST_CAPABILITY: usize = 0x40;

const REG_VENDOR: usize = 0x00;
const REG_COMMAND: usize = 0x04;
const REG_STATUS: usize = 0x06;
const REG_REVISION: usize = 0x08;
const REG_HEADER_TYPE: usize = 0x0e;
const REG_BAR0: usize = 0x10;
const REG_SUBSYSTEM_VENDOR: usize = 0x2c;
const REG_CAPABILITIES: usize = 0x34;
const REG_INTERRUPT_LINE: usize = 0x3c;

/// Command register: the device answers memory accesses to its BARs.
pub const COMMAND_MEMORY: u16 = 1 << 1;
/// Command register: the device may master the bus (DMA, MSI).
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
/// Command register: INTx is disabled.
const COMMAND_INTX_DISABLE: u16 = 1 << 10;
/// Status register: the capability list is valid.
const STATUS_CAPABILITIES: u16 = 1 << 4;

/// BAR type bits: 64-bit memory BAR.
const BAR_MEM_64: u32 = 0b100;

/// Why a configuration space cannot be built as asked.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    /// A BAR slot that does not exist or is taken.
    #[error("BAR {0} does not exist or is already used")]
    BarSlot(usize),
    /// A BAR size that is not a power of two of at least 4 KiB.
    #[error("BAR size {0:#x} is not a power of two of at least 4 KiB")]
    BarSize(u64),
    /// The capabilities do not fit in the configuration space.
    #[error("capability of {0} bytes does not fit in the configuration space")]
    CapabilitySpace(usize),
}

/// The identity of a function.
#[derive(Clone, Copy, Debug)]
pub struct PciIdentity {
    pub vendor: u16,
    pub device: u16,
    /// Class code, subclass and programming interface.
    pub class: [u8; 3],
    pub revision: u8,
    pub subsystem_vendor: u16,
    pub subsystem: u16,
}

/// A memory BAR (this VMM uses 64-bit memory BARs only).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bar {
    /// Size in bytes (a power of two); 0 for an unused slot.
    pub size: u64,
}

/// The state of a configuration space, as plain data.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigState {
    /// The 256 register bytes.
    pub regs: Vec<u8>,
    /// Which bits of each byte the guest may write.
    pub wmask: Vec<u8>,
    /// The BARs, by slot (a 64-bit BAR takes its slot and the next).
    pub bars: [Bar; 6],
    /// Where the next capability goes.
    next_capability: usize,
    /// The offset of the last capability added (to chain the next one).
    last_capability: usize,
}

/// A type-0 configuration space.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PciConfig {
    state: ConfigState,
}

impl PciConfig {
    /// An endpoint (header type 0) with `id`, no BARs and no capabilities.
    pub fn new(id: PciIdentity) -> PciConfig {
        let mut c = PciConfig {
            state: ConfigState {
                regs: vec![0; CONFIG_SIZE],
                wmask: vec![0; CONFIG_SIZE],
                bars: [Bar::default(); 6],
                next_capability: FIRST_CAPABILITY,
                last_capability: 0,
            },
        };
        c.set_u16(REG_VENDOR, id.vendor);
        c.set_u16(REG_VENDOR + 2, id.device);
        c.state.regs[REG_REVISION] = id.revision;
        c.state.regs[REG_REVISION + 1] = id.class[2];
        c.state.regs[REG_REVISION + 2] = id.class[1];
        c.state.regs[REG_REVISION + 3] = id.class[0];
        c.state.regs[REG_HEADER_TYPE] = 0;
        c.set_u16(REG_SUBSYSTEM_VENDOR, id.subsystem_vendor);
        c.set_u16(REG_SUBSYSTEM_VENDOR + 2, id.subsystem);
        let command = COMMAND_MEMORY | COMMAND_BUS_MASTER | COMMAND_INTX_DISABLE | 1;
        c.state.wmask[REG_COMMAND..REG_COMMAND + 2].copy_from_slice(&command.to_le_bytes());
        // The interrupt line is scratch space for the OS.
        c.state.wmask[REG_INTERRUPT_LINE] = 0xff;
        c
    }

    /// Restores a configuration space from its state, checked as
    /// [`PciConfig::restore`] checks it against this one.
    pub fn from_state(&self, state: &ConfigState) -> Result<PciConfig, StateError> {
        let mut c = self.clone();
        c.restore(state)?;
        Ok(c)
    }

    /// Restores the registers of a saved `state` of this same function.
    /// What the device built (write masks, BARs, the capability layout, the
    /// identity and every other read-only header byte but the status
    /// register, each capability's ID and next pointer) must be exactly this
    /// space's: only what a guest or the device could have changed is taken.
    /// A refused state changes nothing.
    pub fn restore(&mut self, state: &ConfigState) -> Result<(), StateError> {
        check_len("PCI config registers", state.regs.len(), CONFIG_SIZE)?;
        check_len("PCI config write mask", state.wmask.len(), CONFIG_SIZE)?;
        let mine = &self.state;
        if state.wmask != mine.wmask
            || state.bars != mine.bars
            || state.next_capability != mine.next_capability
            || state.last_capability != mine.last_capability
        {
            return Err(StateError::mismatch(
                "PCI config",
                "write masks, BARs or capability layout differ",
            ));
        }
        let mut fixed: Vec<usize> = (0..FIRST_CAPABILITY)
            .filter(|&i| i != REG_STATUS && i != REG_STATUS + 1)
            .collect();
        let mut at = mine.regs[REG_CAPABILITIES] as usize;
        // The chain was built here: it ends, and every link is in range.
        while at != 0 && at + 1 < CONFIG_SIZE && fixed.len() < CONFIG_SIZE {
            fixed.extend([at, at + 1]);
            at = mine.regs[at + 1] as usize;
        }
        if let Some(i) = fixed
            .into_iter()
            .find(|&i| (state.regs[i] ^ mine.regs[i]) & !mine.wmask[i] != 0)
        {
            return Err(StateError::mismatch(
                "PCI config",
                format!("read-only byte {i:#x} differs"),
            ));
        }
        self.state.regs.copy_from_slice(&state.regs);
        Ok(())
    }

    /// The state as plain data.
    pub fn state(&self) -> &ConfigState {
        &self.state
    }

    fn set_u16(&mut self, at: usize, v: u16) {
        self.state.regs[at..at + 2].copy_from_slice(&v.to_le_bytes());
    }

    /// Reads a little-endian u16 register.
    pub fn u16_at(&self, at: usize) -> u16 {
        u16::from_le_bytes([self.state.regs[at], self.state.regs[at + 1]])
    }

    /// Reads a little-endian u32 register.
    pub fn u32_at(&self, at: usize) -> u32 {
        let r = &self.state.regs;
        u32::from_le_bytes([r[at], r[at + 1], r[at + 2], r[at + 3]])
    }

    /// The command register.
    pub fn command(&self) -> u16 {
        self.u16_at(REG_COMMAND)
    }

    /// Adds a 64-bit memory BAR of `size` bytes in `slot` (and `slot + 1`),
    /// placed at `address` (the firmware's assignment; the guest may move it).
    pub fn add_bar64(&mut self, slot: usize, size: u64, address: u64) -> Result<(), ConfigError> {
        // Every BAR here is 64-bit: slot `s` also takes `s + 1`.
        let taken =
            |s: usize| self.state.bars[s].size != 0 || (s > 0 && self.state.bars[s - 1].size != 0);
        if slot >= 5 || taken(slot) || taken(slot + 1) {
            return Err(ConfigError::BarSlot(slot));
        }
        if size < 0x1000 || !size.is_power_of_two() {
            return Err(ConfigError::BarSize(size));
        }
        self.state.bars[slot] = Bar { size };
        let reg = REG_BAR0 + 4 * slot;
        let mask = !(size - 1);
        let low = (address as u32 & mask as u32) | BAR_MEM_64;
        self.state.regs[reg..reg + 4].copy_from_slice(&low.to_le_bytes());
        self.state.regs[reg + 4..reg + 8].copy_from_slice(&((address >> 32) as u32).to_le_bytes());
        // The type bits are read-only; the address bits below the size read 0.
        self.state.wmask[reg..reg + 4].copy_from_slice(&(mask as u32 & !0xf).to_le_bytes());
        self.state.wmask[reg + 4..reg + 8].copy_from_slice(&((mask >> 32) as u32).to_le_bytes());
        Ok(())
    }

    /// The address BAR `slot` holds now (whether or not decoding is on).
    pub fn bar_address(&self, slot: usize) -> u64 {
        let reg = REG_BAR0 + 4 * slot;
        let low = (self.u32_at(reg) & !0xf) as u64;
        let high = self.u32_at(reg + 4) as u64;
        (high << 32) | low
    }

    /// The BAR slots in use with their sizes.
    pub fn bars(&self) -> impl Iterator<Item = (usize, u64)> + '_ {
        self.state
            .bars
            .iter()
            .enumerate()
            .filter(|(_, b)| b.size != 0)
            .map(|(i, b)| (i, b.size))
    }

    /// Adds a capability with `id` and `body` (the bytes after the ID and
    /// next pointer); `writable` marks which body bytes the guest may write.
    /// Returns its offset.
    pub fn add_capability(
        &mut self,
        id: u8,
        body: &[u8],
        writable: &[u8],
    ) -> Result<usize, ConfigError> {
        let len = (2 + body.len()).next_multiple_of(4);
        let at = self.state.next_capability;
        if at + len > CONFIG_SIZE {
            return Err(ConfigError::CapabilitySpace(len));
        }
        self.state.regs[at] = id;
        self.state.regs[at + 1] = 0;
        self.state.regs[at + 2..at + 2 + body.len()].copy_from_slice(body);
        for (i, &w) in writable.iter().enumerate().take(body.len()) {
            self.state.wmask[at + 2 + i] = w;
        }
        if self.state.last_capability == 0 {
            self.state.regs[REG_CAPABILITIES] = at as u8;
            let status = self.u16_at(REG_STATUS) | STATUS_CAPABILITIES;
            self.set_u16(REG_STATUS, status);
        } else {
            self.state.regs[self.state.last_capability + 1] = at as u8;
        }
        self.state.last_capability = at;
        self.state.next_capability = at + len;
        Ok(at)
    }

    /// Fills `data` from the registers at `offset`; bytes past the end read
    /// as all-ones.
    pub fn read(&self, offset: usize, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = self.state.regs.get(offset + i).copied().unwrap_or(0xff);
        }
    }

    /// Writes `data` at `offset` through the write mask. Bytes past the end
    /// are dropped.
    pub fn write(&mut self, offset: usize, data: &[u8]) {
        for (i, &b) in data.iter().enumerate() {
            let at = offset + i;
            if at >= CONFIG_SIZE {
                break;
            }
            let mask = self.state.wmask[at];
            self.state.regs[at] = (self.state.regs[at] & !mask) | (b & mask);
        }
    }

    /// Overwrites register bytes the device itself owns (read-only to the guest).
    pub fn set_bytes(&mut self, offset: usize, data: &[u8]) {
        if let Some(dst) = self.state.regs.get_mut(offset..offset + data.len()) {
            dst.copy_from_slice(data);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> PciConfig {
        PciConfig::new(PciIdentity {
            vendor: 0x1af4,
            device: 0x1042,
            class: [0x01, 0x00, 0x00],
            revision: 1,
            subsystem_vendor: 0x1af4,
            subsystem: 0x40,
        })
    }

    #[test]
    fn identity_reads_back() {
        let c = config();
        assert_eq!(c.u32_at(0), 0x1042_1af4);
        assert_eq!(c.u32_at(8), 0x0100_0001);
        assert_eq!(c.u32_at(0x2c), 0x0040_1af4);
        let mut b = [0u8; 4];
        c.read(0xfe, &mut b);
        assert_eq!(b, [0, 0, 0xff, 0xff], "past the end reads all-ones");
    }

    #[test]
    fn identity_is_read_only_and_the_command_register_is_not() {
        let mut c = config();
        c.write(0, &[0, 0, 0, 0]);
        assert_eq!(c.u32_at(0), 0x1042_1af4);
        c.write(4, &0xffffu16.to_le_bytes());
        assert_eq!(c.command(), 0x0407);
    }

    #[test]
    fn a_64_bit_bar_sizes_like_hardware_and_moves() {
        let mut c = config();
        c.add_bar64(0, 0x8000, 0xd000_0000).unwrap();
        assert_eq!(c.bar_address(0), 0xd000_0000);
        assert_eq!(c.u32_at(0x10) & 0xf, 0b100, "64-bit memory BAR");
        // Sizing: write all-ones, read the mask back.
        c.write(0x10, &[0xff; 4]);
        c.write(0x14, &[0xff; 4]);
        assert_eq!(c.u32_at(0x10), 0xffff_8004);
        assert_eq!(c.u32_at(0x14), 0xffff_ffff);
        // Placement: any size-aligned address, above 4 GiB too.
        c.write(0x10, &0xe000_0000u32.to_le_bytes());
        c.write(0x14, &1u32.to_le_bytes());
        assert_eq!(c.bar_address(0), 0x1_e000_0000);
        // Low bits below the size are ignored.
        c.write(0x10, &0xe000_1234u32.to_le_bytes());
        assert_eq!(c.bar_address(0), 0x1_e000_0000);
        assert_eq!(c.bars().collect::<Vec<_>>(), vec![(0, 0x8000)]);
    }

    #[test]
    fn bad_bars_are_refused() {
        let mut c = config();
        assert_eq!(c.add_bar64(5, 0x1000, 0), Err(ConfigError::BarSlot(5)));
        assert_eq!(c.add_bar64(0, 0x1800, 0), Err(ConfigError::BarSize(0x1800)));
        c.add_bar64(0, 0x1000, 0).unwrap();
        assert_eq!(c.add_bar64(1, 0x1000, 0), Err(ConfigError::BarSlot(1)));
    }

    #[test]
    fn capabilities_chain_from_0x34() {
        let mut c = config();
        let a = c
            .add_capability(0x11, &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10], &[0, 0xc0])
            .unwrap();
        let b = c.add_capability(0x09, &[0; 14], &[]).unwrap();
        assert_eq!((a, b), (0x40, 0x4c));
        assert_eq!(c.u16_at(6) & STATUS_CAPABILITIES, STATUS_CAPABILITIES);
        assert_eq!(c.state().regs[0x34], 0x40);
        assert_eq!(c.state().regs[0x41], 0x4c);
        assert_eq!(c.state().regs[0x4d], 0);
        c.write(a + 2, &[0xff, 0xff]);
        assert_eq!(
            c.state().regs[a + 2..a + 4],
            [1, 0xc2],
            "only the masked bits"
        );
        let mut big = config();
        assert!(big.add_capability(9, &[0; 180], &[]).is_ok());
        assert_eq!(
            big.add_capability(9, &[0; 20], &[]),
            Err(ConfigError::CapabilitySpace(24))
        );
        let state = c.state().clone();
        assert_eq!(
            config().from_state(&state),
            Err(StateError::mismatch(
                "PCI config",
                "write masks, BARs or capability layout differ"
            ))
        );
        let mut twin = config();
        twin.add_capability(0x11, &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10], &[0, 0xc0])
            .unwrap();
        twin.add_capability(0x09, &[0; 14], &[]).unwrap();
        assert_eq!(twin.from_state(&state).unwrap(), c);
    }

    #[test]
    fn a_restored_space_reads_and_writes_like_the_saved_one() {
        let mut c = config();
        c.add_bar64(0, 0x8000, 0xd000_0000).unwrap();
        c.add_capability(0x11, &[0; 10], &[0, 0xc0]).unwrap();
        let fresh = c.clone();
        c.write(0x10, &0xe000_0000u32.to_le_bytes());
        c.write(4, &0x0406u16.to_le_bytes());
        c.write(0x3c, &[11]);
        c.write(0x43, &[0x80]);
        let json = serde_json::to_string(c.state()).unwrap();
        let state: ConfigState = serde_json::from_str(&json).unwrap();
        let mut back = fresh.clone();
        back.restore(&state).unwrap();
        assert_eq!(back, c);
        for at in (0..CONFIG_SIZE).step_by(4) {
            assert_eq!(back.u32_at(at), c.u32_at(at), "{at:#x}");
        }
        // Sizing after the restore works as on the original.
        for d in [&mut back, &mut c] {
            d.write(0x10, &[0xff; 4]);
        }
        assert_eq!(back.u32_at(0x10), 0xffff_8004);
        assert_eq!(back.bar_address(0), c.bar_address(0));
    }

    #[test]
    fn hostile_config_states_are_refused() {
        let mut c = config();
        c.add_bar64(0, 0x8000, 0xd000_0000).unwrap();
        c.add_capability(0x11, &[0; 10], &[0, 0xc0]).unwrap();
        let good = c.state().clone();
        let spoilers: Vec<fn(&mut ConfigState)> = vec![
            |s| s.regs.truncate(255),
            |s| s.wmask.push(0),
            |s| s.wmask[0] = 0xff,       // the guest could rewrite the vendor
            |s| s.bars[1].size = 0x1000, // a BAR the device does not have
            |s| s.regs[0] ^= 1,          // another vendor
            |s| s.regs[0x10] ^= 0x4,     // a 32-bit BAR
            |s| s.regs[0x34] = 0x80,     // the capability list moved
            |s| s.regs[0x41] = 0x44,     // a capability's next pointer
            |s| s.next_capability = 0x100,
        ];
        for (i, spoil) in spoilers.iter().enumerate() {
            let mut bad = good.clone();
            spoil(&mut bad);
            assert!(c.restore(&bad).is_err(), "case {i}");
            assert_eq!(c.state(), &good, "case {i} changed the space");
        }
    }
}
