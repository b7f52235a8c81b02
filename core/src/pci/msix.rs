//! MSI-X: the capability, the vector table and the pending-bit array a device
//! exposes in one of its BARs, and delivery through an [`MsiSink`] (KVM MSI
//! routes and irqfds in a VM; a recorder in unit tests).
//!
//! The guest programs each vector's address and data in the table; a vector
//! or the whole function can be masked, and an interrupt raised while masked
//! sets the vector's pending bit and is delivered when it is unmasked, as the
//! PCI spec requires. The guest controls every table byte: writes are bounded
//! to the table, odd sizes are ignored.

use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

use crate::state::{check_bits, check_len, StateError};

/// The MSI-X capability ID.
pub const MSIX_CAPABILITY_ID: u8 = 0x11;
/// Bytes per table entry.
pub const ENTRY_SIZE: u64 = 16;
/// Message control: MSI-X enable.
const CONTROL_ENABLE: u16 = 1 << 15;
/// Message control: function mask.
const CONTROL_FUNCTION_MASK: u16 = 1 << 14;
/// Vector control: the vector is masked.
const VECTOR_MASKED: u32 = 1;

/// Where interrupts go.
pub trait MsiSink: Send + Sync {
    /// The guest set vector `vector`'s message (or it was masked: `None`).
    fn set_route(&self, vector: u16, message: Option<(u64, u32)>);
    /// Delivers vector `vector` (its route is set).
    fn fire(&self, vector: u16);
}

/// One table entry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsixEntry {
    pub address: u64,
    pub data: u32,
    pub control: u32,
}

/// The MSI-X state of a function, as plain data.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsixState {
    pub entries: Vec<MsixEntry>,
    /// One pending bit per vector.
    pub pending: Vec<u64>,
    pub enabled: bool,
    pub function_masked: bool,
}

/// The MSI-X block of one function, shared by the vCPU threads (table
/// accesses) and the device's worker (interrupts).
pub struct Msix {
    state: Mutex<MsixState>,
    sink: Arc<dyn MsiSink>,
}

impl Msix {
    /// `vectors` vectors (1-2048), all masked, delivering to `sink`.
    pub fn new(vectors: u16, sink: Arc<dyn MsiSink>) -> Msix {
        let vectors = vectors.clamp(1, 2048);
        Msix {
            state: Mutex::new(MsixState {
                entries: vec![
                    MsixEntry {
                        control: VECTOR_MASKED,
                        ..Default::default()
                    };
                    vectors as usize
                ],
                pending: vec![0; (vectors as usize).div_ceil(64)],
                enabled: false,
                function_masked: false,
            }),
            sink,
        }
    }

    fn lock(&self) -> MutexGuard<'_, MsixState> {
        // Plain data updated field by field: a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The number of vectors.
    pub fn vectors(&self) -> u16 {
        self.lock().entries.len() as u16
    }

    /// The capability's body (after ID and next pointer): message control,
    /// table offset/BIR, PBA offset/BIR; and its write mask (enable and
    /// function-mask bits only).
    pub fn capability(&self, bar: u8, table: u32, pba: u32) -> (Vec<u8>, Vec<u8>) {
        let control = self.vectors() - 1;
        let mut body = control.to_le_bytes().to_vec();
        body.extend_from_slice(&(table | bar as u32).to_le_bytes());
        body.extend_from_slice(&(pba | bar as u32).to_le_bytes());
        (body, vec![0, 0xc0])
    }

    /// The guest wrote the message control register.
    pub fn set_control(&self, control: u16) {
        let mut s = self.lock();
        s.enabled = control & CONTROL_ENABLE != 0;
        s.function_masked = control & CONTROL_FUNCTION_MASK != 0;
        self.deliver_pending(&mut s);
    }

    /// The table's size in bytes.
    pub fn table_len(&self) -> u64 {
        self.vectors() as u64 * ENTRY_SIZE
    }

    /// The pending-bit array's size in bytes.
    pub fn pba_len(&self) -> u64 {
        (self.vectors() as u64).div_ceil(64) * 8
    }

    /// A guest read of the table at `offset`.
    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        let s = self.lock();
        let Some(entry) = s.entries.get((offset / ENTRY_SIZE) as usize) else {
            return;
        };
        let mut raw = [0u8; 16];
        raw[..8].copy_from_slice(&entry.address.to_le_bytes());
        raw[8..12].copy_from_slice(&entry.data.to_le_bytes());
        raw[12..].copy_from_slice(&entry.control.to_le_bytes());
        let at = (offset % ENTRY_SIZE) as usize;
        if matches!(data.len(), 4 | 8) && at.is_multiple_of(data.len()) {
            data.copy_from_slice(&raw[at..at + data.len()]);
        }
    }

    /// A guest write of the table at `offset` (4- or 8-byte, aligned).
    pub fn write_table(&self, offset: u64, data: &[u8]) {
        let vector = (offset / ENTRY_SIZE) as usize;
        let at = (offset % ENTRY_SIZE) as usize;
        if !matches!(data.len(), 4 | 8) || !at.is_multiple_of(data.len()) {
            return;
        }
        let mut s = self.lock();
        let Some(entry) = s.entries.get_mut(vector) else {
            return;
        };
        let mut raw = [0u8; 16];
        raw[..8].copy_from_slice(&entry.address.to_le_bytes());
        raw[8..12].copy_from_slice(&entry.data.to_le_bytes());
        raw[12..].copy_from_slice(&entry.control.to_le_bytes());
        raw[at..at + data.len()].copy_from_slice(data);
        let was_masked = entry.control & VECTOR_MASKED != 0;
        entry.address = u64::from_le_bytes(raw[..8].try_into().unwrap_or_default());
        entry.data = u32::from_le_bytes(raw[8..12].try_into().unwrap_or_default());
        // Only the mask bit of vector control is defined.
        entry.control =
            u32::from_le_bytes(raw[12..].try_into().unwrap_or_default()) & VECTOR_MASKED;
        let entry = *entry;
        let masked = entry.control & VECTOR_MASKED != 0;
        if !masked {
            self.sink
                .set_route(vector as u16, Some((entry.address, entry.data)));
        } else if !was_masked {
            self.sink.set_route(vector as u16, None);
        }
        self.deliver_pending(&mut s);
    }

    /// A guest read of the pending-bit array at `offset`.
    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        let s = self.lock();
        for (i, b) in data.iter_mut().enumerate() {
            let byte = offset as usize + i;
            *b = s
                .pending
                .get(byte / 8)
                .map(|q| (q >> (8 * (byte % 8))) as u8)
                .unwrap_or(0);
        }
    }

    fn deliverable(s: &MsixState, vector: usize) -> bool {
        s.enabled
            && !s.function_masked
            && s.entries
                .get(vector)
                .is_some_and(|e| e.control & VECTOR_MASKED == 0)
    }

    fn deliver_pending(&self, s: &mut MsixState) {
        for vector in 0..s.entries.len() {
            let bit = 1u64 << (vector % 64);
            if s.pending[vector / 64] & bit != 0 && Self::deliverable(s, vector) {
                s.pending[vector / 64] &= !bit;
                self.sink.fire(vector as u16);
            }
        }
    }

    /// Raises `vector`: delivered now, or left pending while masked. A vector
    /// past the table is dropped (the guest chose it: it is not trusted).
    pub fn notify(&self, vector: u16) {
        let mut s = self.lock();
        let v = vector as usize;
        if v >= s.entries.len() {
            return;
        }
        if Self::deliverable(&s, v) {
            drop(s);
            self.sink.fire(vector);
        } else {
            s.pending[v / 64] |= 1 << (v % 64);
        }
    }

    /// Whether MSI-X is enabled.
    pub fn enabled(&self) -> bool {
        self.lock().enabled
    }

    /// The state as plain data.
    pub fn state(&self) -> MsixState {
        self.lock().clone()
    }

    /// Restores a saved state of a block with as many vectors: the sink gets
    /// the routes of the unmasked vectors (and loses those masked now), and a
    /// pending vector that is deliverable is delivered. Refused, changing
    /// nothing, when the vector count, the pending array's length, a pending
    /// bit past the last vector or a vector control bit other than the mask
    /// is not what this block can hold.
    pub fn restore(&self, state: &MsixState) -> Result<(), StateError> {
        let mut s = self.lock();
        let n = s.entries.len();
        check_len("MSI-X vectors", state.entries.len(), n)?;
        check_len("MSI-X pending words", state.pending.len(), n.div_ceil(64))?;
        if !n.is_multiple_of(64) {
            let last = state.pending.len() - 1;
            check_bits(
                "MSI-X pending bits",
                state.pending[last],
                (1u64 << (n % 64)) - 1,
            )?;
        }
        for e in &state.entries {
            check_bits(
                "MSI-X vector control",
                e.control.into(),
                VECTOR_MASKED.into(),
            )?;
        }
        for (v, (old, new)) in s.entries.iter().zip(&state.entries).enumerate() {
            if new.control & VECTOR_MASKED == 0 {
                self.sink.set_route(v as u16, Some((new.address, new.data)));
            } else if old.control & VECTOR_MASKED == 0 {
                self.sink.set_route(v as u16, None);
            }
        }
        *s = state.clone();
        self.deliver_pending(&mut s);
        Ok(())
    }

    /// Back to power-on state (every vector masked, MSI-X off).
    pub fn reset(&self) {
        let mut s = self.lock();
        let n = s.entries.len();
        for v in 0..n {
            if s.entries[v].control & VECTOR_MASKED == 0 {
                self.sink.set_route(v as u16, None);
            }
        }
        s.entries.fill(MsixEntry {
            control: VECTOR_MASKED,
            ..Default::default()
        });
        s.pending.fill(0);
        s.enabled = false;
        s.function_masked = false;
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A route change: the vector and its message (`None`: removed).
    pub type Route = (u16, Option<(u64, u32)>);

    /// Records what a device asked of its interrupt controller.
    #[derive(Default)]
    pub struct Recorder {
        pub routes: Mutex<Vec<Route>>,
        pub fired: Mutex<Vec<u16>>,
    }

    impl MsiSink for Recorder {
        fn set_route(&self, vector: u16, message: Option<(u64, u32)>) {
            self.routes.lock().unwrap().push((vector, message));
        }
        fn fire(&self, vector: u16) {
            self.fired.lock().unwrap().push(vector);
        }
    }

    fn program(m: &Msix, v: u64, address: u64, data: u32) {
        m.write_table(v * 16, &(address as u32).to_le_bytes());
        m.write_table(v * 16 + 4, &((address >> 32) as u32).to_le_bytes());
        m.write_table(v * 16 + 8, &data.to_le_bytes());
        m.write_table(v * 16 + 12, &0u32.to_le_bytes());
    }

    #[test]
    fn masked_vectors_pend_and_deliver_on_unmask() {
        let rec = Arc::new(Recorder::default());
        let m = Msix::new(3, rec.clone());
        m.notify(1);
        assert!(rec.fired.lock().unwrap().is_empty(), "MSI-X off: pending");
        let mut pba = [0u8; 8];
        m.read_pba(0, &mut pba);
        assert_eq!(pba[0], 0b10);
        m.set_control(CONTROL_ENABLE);
        program(&m, 1, 0xfee0_0000, 0x4041);
        assert_eq!(*rec.fired.lock().unwrap(), vec![1], "delivered on unmask");
        assert_eq!(
            rec.routes.lock().unwrap().last(),
            Some(&(1, Some((0xfee0_0000, 0x4041))))
        );
        m.read_pba(0, &mut pba);
        assert_eq!(pba[0], 0);
        m.set_control(CONTROL_ENABLE | CONTROL_FUNCTION_MASK);
        m.notify(1);
        assert_eq!(rec.fired.lock().unwrap().len(), 1, "function masked");
        m.set_control(CONTROL_ENABLE);
        assert_eq!(*rec.fired.lock().unwrap(), vec![1, 1]);
    }

    #[test]
    fn the_table_reads_back_and_bad_accesses_are_ignored() {
        let rec = Arc::new(Recorder::default());
        let m = Msix::new(2, rec.clone());
        program(&m, 0, 0xfee0_1000, 0x30);
        let mut d = [0u8; 8];
        m.read_table(0, &mut d);
        assert_eq!(u64::from_le_bytes(d), 0xfee0_1000);
        let mut w = [0u8; 4];
        m.read_table(12, &mut w);
        assert_eq!(u32::from_le_bytes(w), 0);
        // Past the table, odd sizes, misaligned: ignored, reads all-ones.
        m.write_table(2 * 16, &[0; 4]);
        m.write_table(1, &[0; 4]);
        m.write_table(0, &[0; 2]);
        m.read_table(5 * 16, &mut w);
        assert_eq!(w, [0xff; 4]);
        m.notify(7);
        assert!(rec.fired.lock().unwrap().is_empty());
        let (body, mask) = m.capability(0, 0x4000, 0x5000);
        assert_eq!(body, [1, 0, 0, 0x40, 0, 0, 0, 0x50, 0, 0]);
        assert_eq!(mask, [0, 0xc0]);
        m.reset();
        assert_eq!(m.state().entries[0].control, VECTOR_MASKED);
        assert_eq!(rec.routes.lock().unwrap().last(), Some(&(0, None)));
    }

    #[test]
    fn a_restored_block_routes_reads_and_delivers_like_the_saved_one() {
        let rec = Arc::new(Recorder::default());
        let m = Msix::new(3, rec.clone());
        m.set_control(CONTROL_ENABLE);
        program(&m, 0, 0xfee0_0000, 0x41);
        program(&m, 2, 0xfee0_1000, 0x42);
        m.write_table(2 * 16 + 12, &1u32.to_le_bytes()); // masked again
        m.notify(2); // pends
        let json = serde_json::to_string(&m.state()).unwrap();
        let state: MsixState = serde_json::from_str(&json).unwrap();
        let rec2 = Arc::new(Recorder::default());
        let back = Msix::new(3, rec2.clone());
        back.restore(&state).unwrap();
        assert_eq!(back.state(), m.state());
        assert_eq!(
            *rec2.routes.lock().unwrap(),
            vec![(0, Some((0xfee0_0000, 0x41)))],
            "only unmasked vectors are routed"
        );
        for offset in (0..48).step_by(4) {
            let (mut a, mut b) = ([0u8; 4], [0u8; 4]);
            m.read_table(offset, &mut a);
            back.read_table(offset, &mut b);
            assert_eq!(a, b, "table offset {offset}");
        }
        let (mut a, mut b) = ([0u8; 8], [0u8; 8]);
        m.read_pba(0, &mut a);
        back.read_pba(0, &mut b);
        assert_eq!((a[0], b[0]), (0b100, 0b100));
        // Unmasking the pending vector delivers it on the restored block.
        back.write_table(2 * 16 + 12, &0u32.to_le_bytes());
        assert_eq!(*rec2.fired.lock().unwrap(), vec![2]);
        back.notify(0);
        assert_eq!(*rec2.fired.lock().unwrap(), vec![2, 0]);
    }

    #[test]
    fn hostile_msix_states_are_refused() {
        let rec = Arc::new(Recorder::default());
        let m = Msix::new(3, rec.clone());
        let good = m.state();
        let spoilers: Vec<fn(&mut MsixState)> = vec![
            |s| s.entries.push(MsixEntry::default()),
            |s| s.entries.truncate(1),
            |s| s.pending.push(0),
            |s| s.pending.clear(),
            |s| s.pending[0] = 1 << 3, // past the last vector
            |s| s.entries[1].control = 0x8000_0001,
        ];
        for (i, spoil) in spoilers.iter().enumerate() {
            let mut bad = good.clone();
            spoil(&mut bad);
            assert!(m.restore(&bad).is_err(), "case {i}");
            assert_eq!(m.state(), good, "case {i}");
        }
        assert!(rec.routes.lock().unwrap().is_empty());
    }
}
