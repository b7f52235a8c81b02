//! A CMOS real-time clock (MC146818-compatible) at ports 0x70/0x71, so a guest
//! can read the wall-clock time: Linux sets its clock from it at boot
//! (`mach_get_cmos_time`) and binds `rtc_cmos` to it (`/dev/rtc0`).
//!
//! Port 0x70 selects one of 128 registers (bit 7, the NMI mask on a PC, is
//! ignored); port 0x71 reads or writes the selected one. The time registers are
//! computed from the host's UTC clock at each read, plus an offset the guest sets
//! by writing them (the host's clock is never changed): seconds 0x00, minutes
//! 0x02, hours 0x04, weekday 0x06 (1 = Sunday), day 0x07, month 0x08, year 0x09
//! and century 0x32 (the FADT's `CENTURY` points there), in BCD or binary and in
//! 24- or 12-hour mode as status register B says. The alarm registers (0x01,
//! 0x03, 0x05) are stored. Status A's update-in-progress bit always reads 0:
//! every read is consistent on its own, so the guest never has to wait for an
//! update to end. Status C reads 0 (no interrupt is ever pending) and D reads
//! 0x80 (the battery is good, RAM and time are valid). The other bytes (0x0e-0x7f
//! but the century) are plain CMOS RAM.
//!
//! Status B's SET bit works as on the chip: while it is set, the time registers
//! hold what the guest writes (that is how Linux sets the clock, field by field);
//! clearing it sets the offset from all of them at once. A time register written
//! with SET clear changes that one field at once.
//!
//! No interrupts: there are no periodic, alarm or update-ended interrupts (IRQ 8
//! is never raised), which is why the DSDT's `PNP0B00` device lists no IRQ (see
//! [`crate::boot::acpi`]) and Linux's `rtc_cmos` runs without alarms.
//!
//! It sits on every VM's bus, not only Linux's: reading the clock is useful to
//! any guest, and a PC has it at these ports. Its state ([`RtcState`]) is plain
//! data that serializes for snapshots.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::bus::BusDevice;
use crate::state::{check_len, check_max, StateError};

/// The index port (0x70) and the data port (0x71).
pub const RTC_PORT: u16 = 0x70;
/// Two ports.
pub const RTC_PORT_LEN: u16 = 2;

/// CMOS size: 14 clock registers and 114 bytes of RAM.
pub const CMOS_LEN: usize = 128;

const OFS_INDEX: u16 = 0;
const OFS_DATA: u16 = 1;

/// Port 0x70's bit 7 gates NMIs on a PC; the index is the low 7 bits.
const INDEX_MASK: u8 = 0x7f;

const REG_SECONDS: u8 = 0x00;
const REG_MINUTES: u8 = 0x02;
const REG_HOURS: u8 = 0x04;
const REG_WEEKDAY: u8 = 0x06;
const REG_DAY: u8 = 0x07;
const REG_MONTH: u8 = 0x08;
const REG_YEAR: u8 = 0x09;
const REG_A: u8 = 0x0a;
const REG_B: u8 = 0x0b;
const REG_C: u8 = 0x0c;
const REG_D: u8 = 0x0d;
/// The century register: IBM's choice, which ACPI's FADT `CENTURY` names.
pub const REG_CENTURY: u8 = 0x32;

/// The registers computed from the clock, in the order of [`DateTime::fields`].
const TIME_REGS: [u8; 8] = [
    REG_SECONDS,
    REG_MINUTES,
    REG_HOURS,
    REG_WEEKDAY,
    REG_DAY,
    REG_MONTH,
    REG_YEAR,
    REG_CENTURY,
];

/// Status A: update in progress (always reads 0 here).
const A_UIP: u8 = 0x80;
/// Status A at power-on: 32.768 kHz time base, 1024 Hz rate.
const A_DEFAULT: u8 = 0x26;
/// Status B: updates stopped while the guest sets the time.
const B_SET: u8 = 0x80;
/// Status B: binary (not BCD) data mode.
const B_DM_BINARY: u8 = 0x04;
/// Status B: 24-hour mode.
const B_24H: u8 = 0x02;
/// Status B at power-on: 24-hour mode, BCD.
const B_DEFAULT: u8 = B_24H;
/// Status D: valid RAM and time (the battery is good).
const D_VRT: u8 = 0x80;
/// The hour register's PM bit in 12-hour mode.
const HOUR_PM: u8 = 0x80;

const SECONDS_PER_DAY: i64 = 86_400;
/// The largest guest-minus-host offset a restored state may carry: beyond
/// any the guest can set (its years run 0-9999) and far from overflowing.
const MAX_OFFSET_SECS: i64 = 1 << 40;

/// The state of the RTC, all plain data (for snapshots).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RtcState {
    /// The register port 0x71 reaches (0-127).
    pub index: u8,
    /// Guest time minus host time, in seconds.
    pub offset_secs: i64,
    /// The 128 CMOS bytes. The clock registers' entries hold what the guest
    /// wrote while status B's SET bit was on; status C and D are computed.
    pub cmos: Vec<u8>,
}

impl Default for RtcState {
    fn default() -> Self {
        let mut cmos = vec![0u8; CMOS_LEN];
        cmos[REG_A as usize] = A_DEFAULT;
        cmos[REG_B as usize] = B_DEFAULT;
        RtcState {
            index: 0,
            offset_secs: 0,
            cmos,
        }
    }
}

/// The CMOS RTC.
pub struct Rtc {
    state: RtcState,
    /// The host's clock; tests inject a fixed one.
    now: fn() -> SystemTime,
}

impl Default for Rtc {
    fn default() -> Self {
        Rtc::new(SystemTime::now)
    }
}

/// A UTC calendar time, one field per clock register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct DateTime {
    second: i64,
    minute: i64,
    hour: i64,
    /// 1 = Sunday.
    weekday: i64,
    day: i64,
    month: i64,
    /// The full year (century * 100 + year of the century).
    year: i64,
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's
/// `days_from_civil`); a day past the month's end rolls into the next month.
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = (month + 9) % 12; // March = 0
    let doy = (153 * m + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date of a day count since 1970-01-01 (`civil_from_days`).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

impl DateTime {
    fn from_unix(secs: i64) -> DateTime {
        let days = secs.div_euclid(SECONDS_PER_DAY);
        let rem = secs.rem_euclid(SECONDS_PER_DAY);
        let (year, month, day) = civil_from_days(days);
        DateTime {
            second: rem % 60,
            minute: rem / 60 % 60,
            hour: rem / 3600,
            // 1970-01-01 was a Thursday (weekday 5 with Sunday = 1).
            weekday: (days + 4).rem_euclid(7) + 1,
            day,
            month,
            year,
        }
    }

    fn to_unix(self) -> i64 {
        days_from_civil(self.year, self.month, self.day) * SECONDS_PER_DAY
            + self.hour * 3600
            + self.minute * 60
            + self.second
    }

    /// The values of [`TIME_REGS`], before encoding.
    fn fields(self) -> [i64; 8] {
        [
            self.second,
            self.minute,
            self.hour,
            self.weekday,
            self.day,
            self.month,
            self.year.rem_euclid(100),
            self.year.div_euclid(100).rem_euclid(100),
        ]
    }

    /// A time from register values, each clamped to its range (a guest may
    /// write anything). The weekday is not an input: it follows from the date.
    fn from_fields(f: [i64; 8]) -> DateTime {
        DateTime {
            second: f[0].clamp(0, 59),
            minute: f[1].clamp(0, 59),
            hour: f[2].clamp(0, 23),
            weekday: 1,
            day: f[4].clamp(1, 31),
            month: f[5].clamp(1, 12),
            year: f[7].clamp(0, 99) * 100 + f[6].clamp(0, 99),
        }
    }
}

fn to_bcd(v: u8) -> u8 {
    ((v / 10) << 4) | (v % 10)
}

fn from_bcd(v: u8) -> u8 {
    // Invalid nibbles (A-F) are taken at face value; the caller clamps.
    (v >> 4) * 10 + (v & 0xf)
}

impl Rtc {
    /// An RTC at power-on whose host clock is `now`.
    pub fn new(now: fn() -> SystemTime) -> Rtc {
        Rtc {
            state: RtcState::default(),
            now,
        }
    }

    /// An RTC with a saved `state` (see [`Rtc::restore`]).
    pub fn from_state(state: RtcState, now: fn() -> SystemTime) -> Result<Rtc, StateError> {
        let mut rtc = Rtc::new(now);
        rtc.restore(&state)?;
        Ok(rtc)
    }

    /// Restores a saved state; refused when the CMOS is not 128 bytes, the
    /// index is past it, status A has its update-in-progress bit (never
    /// stored) or the offset is beyond any a guest can set.
    pub fn restore(&mut self, state: &RtcState) -> Result<(), StateError> {
        check_len("RTC CMOS", state.cmos.len(), CMOS_LEN)?;
        check_max("RTC index", state.index.into(), INDEX_MASK.into())?;
        if state.cmos[REG_A as usize] & A_UIP != 0 {
            return Err(StateError::invalid(
                "RTC status A",
                "the update-in-progress bit is never stored",
            ));
        }
        check_max(
            "RTC offset",
            state.offset_secs.unsigned_abs(),
            MAX_OFFSET_SECS as u64,
        )?;
        self.state = state.clone();
        Ok(())
    }

    /// The device's state, for a snapshot.
    pub fn state(&self) -> &RtcState {
        &self.state
    }

    fn status_b(&self) -> u8 {
        self.state.cmos[REG_B as usize]
    }

    fn host_secs(&self) -> i64 {
        match (self.now)().duration_since(UNIX_EPOCH) {
            Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
            Err(e) => i64::try_from(e.duration().as_secs()).map_or(i64::MIN, |s| -s),
        }
    }

    fn guest_now(&self) -> DateTime {
        DateTime::from_unix(self.host_secs().saturating_add(self.state.offset_secs))
    }

    /// A field value as the guest reads it in the current mode.
    fn encode(&self, reg: u8, value: i64) -> u8 {
        let b = self.status_b();
        // Every field is 0-99 by construction.
        let mut v = value.clamp(0, 99) as u8;
        let mut pm = 0;
        if reg == REG_HOURS && b & B_24H == 0 {
            pm = if v >= 12 { HOUR_PM } else { 0 };
            v = match v % 12 {
                0 => 12,
                h => h,
            };
        }
        if b & B_DM_BINARY == 0 {
            v = to_bcd(v);
        }
        v | pm
    }

    /// A register value the guest wrote, as a field value.
    fn decode(&self, reg: u8, raw: u8) -> i64 {
        let b = self.status_b();
        let (value, pm) = if reg == REG_HOURS && b & B_24H == 0 {
            (raw & !HOUR_PM, raw & HOUR_PM != 0)
        } else {
            (raw, false)
        };
        let mut v = i64::from(if b & B_DM_BINARY == 0 {
            from_bcd(value)
        } else {
            value
        });
        if reg == REG_HOURS && b & B_24H == 0 {
            // 12 AM is hour 0, 12 PM is hour 12.
            v = v % 12 + if pm { 12 } else { 0 };
        }
        v
    }

    /// The clock registers as the guest would read them now.
    fn latch_time(&mut self) {
        let fields = self.guest_now().fields();
        for (reg, value) in TIME_REGS.into_iter().zip(fields) {
            self.state.cmos[reg as usize] = self.encode(reg, value);
        }
    }

    /// Sets the offset so that the guest's time is what its clock registers hold.
    fn commit_time(&mut self) {
        let fields = TIME_REGS.map(|reg| self.decode(reg, self.state.cmos[reg as usize]));
        let target = DateTime::from_fields(fields).to_unix();
        self.state.offset_secs = target.saturating_sub(self.host_secs());
    }

    fn read_register(&mut self, reg: u8) -> u8 {
        let setting = self.status_b() & B_SET != 0;
        match reg {
            REG_A => self.state.cmos[REG_A as usize] & !A_UIP,
            REG_C => 0,
            REG_D => D_VRT,
            r if TIME_REGS.contains(&r) && !setting => {
                let fields = self.guest_now().fields();
                let at = TIME_REGS.iter().position(|&t| t == r).unwrap_or(0);
                self.encode(r, fields[at])
            }
            r => self.state.cmos[r as usize],
        }
    }

    fn write_register(&mut self, reg: u8, value: u8) {
        let setting = self.status_b() & B_SET != 0;
        match reg {
            REG_A => self.state.cmos[REG_A as usize] = value & !A_UIP,
            REG_B => {
                if value & B_SET != 0 && !setting {
                    // Freeze the time as it is, in the mode it was read in.
                    self.latch_time();
                }
                self.state.cmos[REG_B as usize] = value;
                if value & B_SET == 0 && setting {
                    self.commit_time();
                }
            }
            REG_C | REG_D => {}
            r if TIME_REGS.contains(&r) => {
                if !setting {
                    self.latch_time();
                }
                self.state.cmos[r as usize] = value;
                if !setting {
                    self.commit_time();
                }
            }
            r => self.state.cmos[r as usize] = value,
        }
    }
}

impl BusDevice for Rtc {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // Its registers span a few ports: the offset fits.
        let offset = offset as u16;
        data.fill(0xff);
        let Some(first) = data.first_mut() else {
            return;
        };
        match offset {
            // The index port is write-only on a PC; it reads as an open bus.
            OFS_INDEX => {}
            OFS_DATA => *first = self.read_register(self.state.index),
            _ => {}
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let offset = offset as u16;
        let Some(&value) = data.first() else {
            return;
        };
        match offset {
            OFS_INDEX => self.state.index = value & INDEX_MASK,
            OFS_DATA => self.write_register(self.state.index, value),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// 2024-02-29 13:45:07 UTC, a Thursday.
    const FIXED: u64 = 1_709_214_307;

    fn fixed_now() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(FIXED)
    }

    fn rtc() -> Rtc {
        Rtc::new(fixed_now)
    }

    fn read(rtc: &mut Rtc, reg: u8) -> u8 {
        rtc.write(u64::from(OFS_INDEX), &[reg]);
        let mut b = [0u8];
        rtc.read(u64::from(OFS_DATA), &mut b);
        b[0]
    }

    fn write(rtc: &mut Rtc, reg: u8, value: u8) {
        rtc.write(u64::from(OFS_INDEX), &[reg]);
        rtc.write(u64::from(OFS_DATA), &[value]);
    }

    fn time_regs(rtc: &mut Rtc) -> [u8; 8] {
        TIME_REGS.map(|r| read(rtc, r))
    }

    #[test]
    fn reads_the_host_clock_in_bcd_24h_by_default() {
        let mut r = rtc();
        // sec, min, hour, weekday (Thursday = 5), day, month, year, century
        assert_eq!(
            time_regs(&mut r),
            [0x07, 0x45, 0x13, 0x05, 0x29, 0x02, 0x24, 0x20]
        );
        assert_eq!(read(&mut r, REG_B), 0x02);
        assert_eq!(read(&mut r, REG_C), 0);
        assert_eq!(read(&mut r, REG_D), 0x80);
        assert_eq!(read(&mut r, REG_A) & A_UIP, 0);
    }

    #[test]
    fn binary_mode_and_12_hour_mode_follow_status_b() {
        let mut r = rtc();
        write(&mut r, REG_B, B_24H | B_DM_BINARY);
        assert_eq!(time_regs(&mut r), [7, 45, 13, 5, 29, 2, 24, 20]);
        write(&mut r, REG_B, B_DM_BINARY);
        assert_eq!(read(&mut r, REG_HOURS), 0x80 | 1, "1 PM, binary");
        write(&mut r, REG_B, 0);
        assert_eq!(read(&mut r, REG_HOURS), 0x80 | 0x01, "1 PM, BCD");
        // Midnight and noon are 12 AM and 12 PM.
        fn midnight() -> SystemTime {
            UNIX_EPOCH + Duration::from_secs(FIXED - 13 * 3600 - 45 * 60)
        }
        let mut m = Rtc::new(midnight);
        write(&mut m, REG_B, 0);
        assert_eq!(read(&mut m, REG_HOURS), 0x12);
        assert_eq!(read(&mut m, REG_MINUTES), 0x00);
        fn afternoon() -> SystemTime {
            UNIX_EPOCH + Duration::from_secs(FIXED + 9 * 3600)
        }
        let mut a = Rtc::new(afternoon);
        write(&mut a, REG_B, 0);
        assert_eq!(read(&mut a, REG_HOURS), 0x80 | 0x10, "10 PM, BCD");
    }

    #[test]
    fn the_index_ignores_the_nmi_bit_and_the_index_port_reads_open_bus() {
        let mut r = rtc();
        write(&mut r, 0x40, 0xab);
        assert_eq!(read(&mut r, 0x80 | 0x40), 0xab);
        assert_eq!(read(&mut r, 0x80 | REG_D), 0x80);
        let mut b = [0u8];
        r.read(u64::from(OFS_INDEX), &mut b);
        assert_eq!(b[0], 0xff);
        assert_eq!(r.state().index, 0x0d);
    }

    #[test]
    fn cmos_ram_and_alarms_round_trip_and_c_d_are_read_only() {
        let mut r = rtc();
        let ram: Vec<u8> = (0x0e..0x80u8)
            .filter(|&i| i != REG_CENTURY)
            .chain([0x01, 0x03, 0x05])
            .collect();
        assert_eq!(ram.len(), 113 + 3);
        for &i in &ram {
            write(&mut r, i, i ^ 0x5a);
        }
        for &i in &ram {
            assert_eq!(read(&mut r, i), i ^ 0x5a, "register {i:#x}");
        }
        write(&mut r, REG_C, 0xff);
        write(&mut r, REG_D, 0x00);
        assert_eq!((read(&mut r, REG_C), read(&mut r, REG_D)), (0, 0x80));
        write(&mut r, REG_A, 0xa6);
        assert_eq!(read(&mut r, REG_A), 0x26, "UIP cannot be set");
        // Wide and empty accesses are harmless.
        r.write(u64::from(OFS_DATA), &[]);
        let mut wide = [0u8; 4];
        r.read(u64::from(OFS_DATA), &mut wide);
        assert_eq!(&wide[1..], &[0xff; 3]);
    }

    #[test]
    fn setting_the_time_with_set_stores_an_offset_not_the_host_clock() {
        let mut r = rtc();
        // As Linux does: SET, then every field (BCD, 24h), then clear SET.
        write(&mut r, REG_B, B_SET | B_24H);
        for (reg, v) in [
            (REG_SECONDS, 0x30),
            (REG_MINUTES, 0x15),
            (REG_HOURS, 0x08),
            (REG_DAY, 0x01),
            (REG_MONTH, 0x01),
            (REG_YEAR, 0x99),
            (REG_CENTURY, 0x19),
        ] {
            write(&mut r, reg, v);
        }
        // While SET is on, reads return what was written.
        assert_eq!(read(&mut r, REG_YEAR), 0x99);
        write(&mut r, REG_B, B_24H);
        // 1999-01-01 08:15:30 UTC, a Friday.
        assert_eq!(r.state().offset_secs, 915_178_530 - FIXED as i64);
        assert_eq!(
            time_regs(&mut r),
            [0x30, 0x15, 0x08, 0x06, 0x01, 0x01, 0x99, 0x19]
        );
        assert_eq!(fixed_now(), UNIX_EPOCH + Duration::from_secs(FIXED));
    }

    #[test]
    fn a_single_field_write_moves_only_that_field() {
        let mut r = rtc();
        write(&mut r, REG_B, B_DM_BINARY);
        write(&mut r, REG_HOURS, 0x80 | 3); // 3 PM in 12-hour binary
        assert_eq!(r.state().offset_secs, 2 * 3600);
        write(&mut r, REG_B, B_24H | B_DM_BINARY);
        assert_eq!(time_regs(&mut r), [7, 45, 15, 5, 29, 2, 24, 20]);
    }

    #[test]
    fn hostile_values_are_clamped() {
        let mut r = rtc();
        write(&mut r, REG_B, B_SET | B_24H);
        for reg in TIME_REGS {
            write(&mut r, reg, 0xff);
        }
        write(&mut r, REG_B, B_24H);
        // 9999-12-31 23:59:59 at most.
        let max = DateTime {
            second: 59,
            minute: 59,
            hour: 23,
            weekday: 1,
            day: 31,
            month: 12,
            year: 9999,
        };
        assert_eq!(r.state().offset_secs, max.to_unix() - FIXED as i64);
        assert_eq!(
            time_regs(&mut r),
            [0x59, 0x59, 0x23, 0x06, 0x31, 0x12, 0x99, 0x99]
        );
    }

    #[test]
    fn calendar_conversion_round_trips() {
        for secs in [
            0,
            -1,
            951_782_400, // 2000-02-29
            FIXED as i64,
            4_102_444_800, // 2100-01-01
            -62_167_219_200,
        ] {
            let t = DateTime::from_unix(secs);
            assert_eq!(t.to_unix(), secs, "{t:?}");
        }
        assert_eq!(
            DateTime::from_unix(0),
            DateTime {
                second: 0,
                minute: 0,
                hour: 0,
                weekday: 5,
                day: 1,
                month: 1,
                year: 1970
            }
        );
        assert_eq!(DateTime::from_unix(-62_167_219_200).year, 0);
    }

    #[test]
    fn state_serializes_and_restores() {
        let mut r = rtc();
        write(&mut r, 0x20, 0x42);
        write(&mut r, REG_MINUTES, 0x50);
        r.write(u64::from(OFS_INDEX), &[0x20]);
        let json = serde_json::to_string(r.state()).unwrap();
        let state: RtcState = serde_json::from_str(&json).unwrap();
        let mut back = Rtc::from_state(state.clone(), fixed_now).unwrap();
        assert_eq!(back.state(), r.state());
        assert_eq!(read(&mut back, REG_MINUTES), 0x50);
        let mut bad = state.clone();
        bad.cmos.pop();
        assert!(matches!(
            Rtc::from_state(bad, fixed_now),
            Err(StateError::Length { .. })
        ));
        for hostile in [
            RtcState {
                index: 0x80,
                ..state.clone()
            },
            RtcState {
                offset_secs: i64::MIN,
                ..state.clone()
            },
        ] {
            assert!(Rtc::from_state(hostile, fixed_now).is_err());
        }
        let before = back.state().clone();
        let mut uip = state.clone();
        uip.cmos[REG_A as usize] |= A_UIP;
        assert!(matches!(
            back.restore(&uip),
            Err(StateError::Invalid { .. })
        ));
        assert_eq!(back.state(), &before, "a refused state changes nothing");
    }

    #[test]
    fn a_restored_clock_keeps_the_time_the_guest_set_and_its_mode() {
        let mut r = rtc();
        // Binary mode, 12-hour, and the clock set forward by hand.
        write(&mut r, REG_B, B_SET | B_DM_BINARY);
        write(&mut r, REG_HOURS, 0x80 | 3); // 3 PM
        write(&mut r, REG_YEAR, 30);
        write(&mut r, REG_B, B_DM_BINARY);
        let json = serde_json::to_string(r.state()).unwrap();
        let mut back = Rtc::from_state(serde_json::from_str(&json).unwrap(), fixed_now).unwrap();
        for reg in [
            REG_SECONDS,
            REG_MINUTES,
            REG_HOURS,
            REG_DAY,
            REG_MONTH,
            REG_YEAR,
            REG_CENTURY,
            REG_A,
            REG_B,
            REG_C,
            REG_D,
            0x20,
        ] {
            assert_eq!(read(&mut back, reg), read(&mut r, reg), "register {reg:#x}");
        }
        assert_eq!(read(&mut back, REG_HOURS), 0x80 | 3);
        assert_eq!(read(&mut back, REG_YEAR), 30);
    }
}
