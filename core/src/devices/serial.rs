//! COM1: a 16550A UART (the `vm-superio` model) whose transmitter feeds a
//! [`ConsoleSink`], which keeps a bounded copy of the output for the host API and
//! optionally streams it to a host file descriptor (the CLI's stdout) without
//! ever blocking the vCPU (see [`super::console`]).
//!
//! Host input goes the other way through the UART's 64-byte receive FIFO: the
//! host queues any amount with [`SerialConsole::enqueue_input`], the FIFO is kept
//! topped up from that queue as the guest reads the receive buffer, and every
//! refill raises the received-data interrupt (IRQ 4, through an irqfd when the VM
//! has an irqchip) if the guest enabled it in the IER.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::Serial;

use super::bus::BusDevice;
pub use super::console::ConsoleSink;
use crate::error::{Error, Result};
use crate::irq::IrqLine;
use crate::state::{check_bits, check_max, StateError};

/// Base port and size of COM1.
pub const COM1_PORT: u16 = 0x3f8;
/// Number of ports a 16550 occupies.
pub const COM_PORT_LEN: u16 = 8;
/// The most host input queued for the guest beyond the UART's FIFO.
pub const INPUT_CAPACITY: usize = 1 << 20;
/// The UART's receive FIFO size (vm-superio's, a 16550A's).
const FIFO_SIZE: usize = 64;
/// The receive buffer register's offset (with DLAB clear).
const RBR_OFFSET: u16 = 0;
/// The interrupt enable register's offset (with DLAB clear) and its
/// received-data bit.
const IER_OFFSET: u16 = 1;
const IER_RECEIVED_DATA: u8 = 0x01;
/// The line control register's offset and its divisor-latch access bit.
const LCR_OFFSET: u8 = 3;
const LCR_DLAB: u8 = 0x80;

/// The interrupt enable bits a 16550 has.
const IER_VALID: u8 = 0x0f;
/// The interrupt identification bits vm-superio keeps (none, THR empty,
/// received data); the FIFO bits are added on read.
const IIR_STORED: u8 = 0x07;
/// The line status bits vm-superio keeps, and data ready among them.
const LSR_STORED: u8 = 0x61;
const LSR_DATA_READY: u8 = 0x01;

/// The UART's registers and receive FIFO as plain data: vm-superio's
/// `SerialState`, field for field, with serde.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UartState {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    /// The receive FIFO, oldest first (at most 64 bytes).
    pub in_buffer: Vec<u8>,
}

impl From<SerialState> for UartState {
    fn from(s: SerialState) -> UartState {
        UartState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

impl UartState {
    /// vm-superio's state, after checking what it does not: register bits
    /// the UART never sets, a FIFO past its size, data ready without data.
    fn checked(&self) -> std::result::Result<SerialState, StateError> {
        check_bits("COM1 IER", self.interrupt_enable.into(), IER_VALID.into())?;
        check_bits(
            "COM1 IIR",
            self.interrupt_identification.into(),
            IIR_STORED.into(),
        )?;
        if self.interrupt_identification == 0 {
            return Err(StateError::invalid("COM1 IIR", "0 is never held"));
        }
        check_bits("COM1 LSR", self.line_status.into(), LSR_STORED.into())?;
        check_max(
            "COM1 receive FIFO",
            self.in_buffer.len() as u64,
            FIFO_SIZE as u64,
        )?;
        if (self.line_status & LSR_DATA_READY != 0) == self.in_buffer.is_empty() {
            return Err(StateError::invalid(
                "COM1 LSR",
                "data ready does not match the receive FIFO",
            ));
        }
        Ok(SerialState {
            baud_divisor_low: self.baud_divisor_low,
            baud_divisor_high: self.baud_divisor_high,
            interrupt_enable: self.interrupt_enable,
            interrupt_identification: self.interrupt_identification,
            line_control: self.line_control,
            line_status: self.line_status,
            modem_control: self.modem_control,
            modem_status: self.modem_status,
            scratch: self.scratch,
            in_buffer: self.in_buffer.clone(),
        })
    }
}

/// COM1's state as plain data (for snapshots). The console's captured output
/// and its stream are the host's, not the guest's, and are not part of it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialConsoleState {
    /// The UART.
    pub uart: UartState,
    /// Host input queued behind the FIFO (at most [`INPUT_CAPACITY`] bytes).
    pub pending: Vec<u8>,
}

/// COM1 as a bus device.
pub struct SerialConsole {
    uart: Serial<IrqLine, NoEvents, ConsoleSink>,
    /// Host input that did not fit in the UART's FIFO yet, oldest first.
    pending: VecDeque<u8>,
    /// Where the UART transmits (kept to rebuild the UART from a state).
    sink: ConsoleSink,
}

impl SerialConsole {
    /// A UART that transmits into `sink`. Its interrupt line is attached to IRQ 4
    /// only when the VM has an irqchip (see [`SerialConsole::irq_line`]).
    pub fn new(sink: ConsoleSink) -> Result<SerialConsole> {
        Ok(SerialConsole {
            uart: Serial::new(IrqLine::new()?, sink.clone()),
            pending: VecDeque::new(),
            sink,
        })
    }

    /// COM1's state.
    pub fn state(&self) -> SerialConsoleState {
        SerialConsoleState {
            uart: self.uart.state().into(),
            pending: self.pending.iter().copied().collect(),
        }
    }

    /// Restores a saved state in place, keeping the interrupt line (and its
    /// irqfd) and the console sink; refused, changing nothing, when a register
    /// holds bits the UART never sets or the FIFO or the queue is too long.
    pub fn restore(&mut self, state: &SerialConsoleState) -> Result<()> {
        let uart = state.uart.checked()?;
        check_max(
            "COM1 pending input",
            state.pending.len() as u64,
            INPUT_CAPACITY as u64,
        )?;
        let line = self.uart.interrupt_evt().try_clone()?;
        // The only error is a failed interrupt trigger (the FIFO size is checked).
        self.uart = Serial::from_state(&uart, line, NoEvents, self.sink.clone())
            .map_err(|e| Error::arg(format!("COM1 state: {e:?}")))?;
        self.pending = state.pending.iter().copied().collect();
        Ok(())
    }

    /// The UART's interrupt line.
    pub fn irq_line(&self) -> &IrqLine {
        self.uart.interrupt_evt()
    }

    /// Queues host input for the guest. Fails without queueing anything when the
    /// queue would exceed [`INPUT_CAPACITY`] (the guest is not reading).
    pub fn enqueue_input(&mut self, input: &[u8]) -> Result<()> {
        if self.pending.len() + input.len() > INPUT_CAPACITY {
            return Err(Error::Busy(format!(
                "the guest is not reading its console: {} bytes are already waiting",
                self.pending.len()
            )));
        }
        self.pending.extend(input);
        self.refill();
        Ok(())
    }

    /// Bytes queued for the guest and not read yet (FIFO and queue).
    pub fn input_pending(&self) -> usize {
        self.pending.len() + (FIFO_SIZE - self.uart.fifo_capacity())
    }

    /// Moves queued input into the FIFO as far as it has room.
    fn refill(&mut self) {
        let room = self.uart.fifo_capacity().min(self.pending.len());
        if room == 0 {
            return;
        }
        let chunk: Vec<u8> = self.pending.drain(..room).collect();
        // Errors are a full FIFO (excluded by `room`) or a failed interrupt write,
        // after which the bytes are in the FIFO anyway: the guest can still poll.
        // In loopback mode the UART takes nothing; the bytes wait for its end.
        match self.uart.enqueue_raw_bytes(&chunk) {
            Ok(n) if n < chunk.len() => {
                for &b in chunk[n..].iter().rev() {
                    self.pending.push_front(b);
                }
            }
            _ => {}
        }
    }

    /// A 16550 raises its received-data interrupt when the driver enables it
    /// while data waits; vm-superio raises it only as bytes arrive. Taking the
    /// FIFO's bytes out and putting them back raises it the way arrival does.
    fn raise_pending_input(&mut self) {
        let waiting = FIFO_SIZE - self.uart.fifo_capacity();
        if waiting == 0 {
            return;
        }
        let bytes: Vec<u8> = (0..waiting).map(|_| self.uart.read(0)).collect();
        // The FIFO was just emptied: it has room for every byte taken.
        let _ = self.uart.enqueue_raw_bytes(&bytes);
    }

    fn dlab(&mut self) -> bool {
        self.uart.read(LCR_OFFSET) & LCR_DLAB != 0
    }
}

impl BusDevice for SerialConsole {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // Its registers span a few ports: the offset fits.
        let offset = offset as u16;
        // The UART's registers are 1 byte wide; a wider access reads the first
        // register and leaves the rest as an open bus.
        data.fill(0xff);
        if let Some(first) = data.first_mut() {
            let rbr = offset == RBR_OFFSET && !self.dlab();
            *first = self.uart.read(offset as u8);
            // Refill once the guest has emptied the FIFO: one interrupt per 64
            // bytes, as a real 16550 with its receive trigger level at 64 raises.
            if rbr && self.uart.fifo_capacity() == FIFO_SIZE && !self.pending.is_empty() {
                self.refill();
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let offset = offset as u16;
        if let Some(&value) = data.first() {
            let enables_rda = offset == IER_OFFSET
                && !self.dlab()
                && value & IER_RECEIVED_DATA != 0
                && self.uart.read(IER_OFFSET as u8) & IER_RECEIVED_DATA == 0;
            // The only error is a failed interrupt trigger, which cannot happen here.
            let _ = self.uart.write(offset as u8, value);
            if enables_rda {
                self.raise_pending_input();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transmitted_bytes_reach_the_buffer() {
        let sink = ConsoleSink::default();
        let mut com1 = SerialConsole::new(sink.clone()).unwrap();
        for b in b"hi\n" {
            com1.write(0, &[*b]);
        }
        assert_eq!(sink.0.lock().unwrap().take(), b"hi\n");
    }

    #[test]
    fn line_status_reports_transmitter_empty() {
        let mut com1 = SerialConsole::new(ConsoleSink::default()).unwrap();
        let mut lsr = [0u8; 1];
        com1.read(5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0, "THR empty bit must be set");
    }

    fn read_reg(com1: &mut SerialConsole, offset: u16) -> u8 {
        let mut b = [0u8; 1];
        com1.read(u64::from(offset), &mut b);
        b[0]
    }

    #[test]
    fn input_beyond_the_fifo_arrives_in_order_with_an_interrupt_per_fifo_load() {
        let mut com1 = SerialConsole::new(ConsoleSink::default()).unwrap();
        com1.write(1, &[0x01]); // IER: received-data interrupt
        let input: Vec<u8> = (0..200u32).map(|i| i as u8).collect();
        com1.enqueue_input(&input).unwrap();
        assert_eq!(com1.input_pending(), 200);
        assert_eq!(com1.irq_line().raised(), 1);
        let mut got = Vec::new();
        while read_reg(&mut com1, 5) & 0x01 != 0 {
            got.push(read_reg(&mut com1, 0));
        }
        assert_eq!(got, input);
        assert_eq!(com1.input_pending(), 0);
        // One interrupt per FIFO load: 64 + 64 + 64 + 8 bytes.
        assert_eq!(com1.irq_line().raised(), 4);
    }

    #[test]
    fn enabling_the_interrupt_with_input_waiting_raises_it() {
        let mut com1 = SerialConsole::new(ConsoleSink::default()).unwrap();
        com1.enqueue_input(b"early").unwrap();
        assert_eq!(com1.irq_line().raised(), 0);
        com1.write(1, &[0x01]);
        assert_eq!(com1.irq_line().raised(), 1);
        assert_eq!(read_reg(&mut com1, 2) & 0x0f, 0x04, "IIR: received data");
        let got: Vec<u8> = (0..5).map(|_| read_reg(&mut com1, 0)).collect();
        assert_eq!(got, b"early");
        com1.write(1, &[0x01]); // already enabled: nothing new
        assert_eq!(com1.irq_line().raised(), 1);
    }

    #[test]
    fn input_is_bounded_and_polling_works_without_interrupts() {
        let mut com1 = SerialConsole::new(ConsoleSink::default()).unwrap();
        com1.enqueue_input(b"ok").unwrap();
        assert_eq!(com1.irq_line().raised(), 0, "IER is 0: no interrupt");
        assert_eq!(read_reg(&mut com1, 5) & 0x01, 1, "LSR data ready");
        assert_eq!(read_reg(&mut com1, 0), b'o');
        assert_eq!(read_reg(&mut com1, 0), b'k');
        assert_eq!(read_reg(&mut com1, 5) & 0x01, 0);
        assert!(com1.enqueue_input(&vec![0; INPUT_CAPACITY + 1]).is_err());
        assert_eq!(com1.input_pending(), 0);
    }

    #[test]
    fn state_round_trips_with_input_in_the_fifo_and_the_queue() {
        let sink = ConsoleSink::default();
        let mut com1 = SerialConsole::new(sink.clone()).unwrap();
        com1.write(3, &[0x83]); // DLAB: divisor 1
        com1.write(0, &[0x01]);
        com1.write(1, &[0x00]);
        com1.write(3, &[0x03]);
        com1.write(7, &[0x5a]); // scratch
        com1.write(1, &[0x01]); // IER: received data
        let input: Vec<u8> = (0..100u8).collect();
        com1.enqueue_input(&input).unwrap();
        assert_eq!(read_reg(&mut com1, 0), 0);
        let json = serde_json::to_string(&com1.state()).unwrap();
        let state: SerialConsoleState = serde_json::from_str(&json).unwrap();
        assert_eq!(state.uart.in_buffer.len(), 63);
        assert_eq!(state.pending.len(), 36);
        let back_sink = ConsoleSink::default();
        let mut back = SerialConsole::new(back_sink.clone()).unwrap();
        back.restore(&state).unwrap();
        assert_eq!(back.state(), com1.state());
        assert_eq!(back.input_pending(), 99);
        for reg in [1, 2, 3, 4, 5, 6, 7] {
            assert_eq!(
                read_reg(&mut back, reg),
                read_reg(&mut com1, reg),
                "register {reg}"
            );
        }
        // The rest of the input arrives in order, refilled from the queue.
        let mut got = Vec::new();
        while read_reg(&mut back, 5) & 0x01 != 0 {
            got.push(read_reg(&mut back, 0));
        }
        assert_eq!(got, input[1..]);
        // The restored UART transmits into its own sink.
        back.write(0, b"x");
        assert_eq!(back_sink.0.lock().unwrap().take(), b"x");
        assert!(sink.0.lock().unwrap().take().is_empty());
    }

    #[test]
    fn hostile_serial_states_are_refused_and_change_nothing() {
        let mut com1 = SerialConsole::new(ConsoleSink::default()).unwrap();
        com1.enqueue_input(b"ab").unwrap();
        let good = com1.state();
        let hostile: [fn(&mut SerialConsoleState); 7] = [
            |s| s.uart.in_buffer = vec![0; FIFO_SIZE + 1],
            |s| s.uart.in_buffer.clear(), // data ready, no data
            |s| s.uart.interrupt_enable = 0xf0,
            |s| s.uart.interrupt_identification = 0,
            |s| s.uart.interrupt_identification = 0x08,
            |s| s.uart.line_status |= 0x80,
            |s| s.pending = vec![0; INPUT_CAPACITY + 1],
        ];
        for (i, spoil) in hostile.iter().enumerate() {
            let mut bad = good.clone();
            spoil(&mut bad);
            assert!(
                matches!(com1.restore(&bad), Err(Error::State(_))),
                "case {i}"
            );
            assert_eq!(com1.state(), good, "case {i} changed the device");
        }
    }
}
