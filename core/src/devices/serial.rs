//! COM1: a 16550A UART (the `vm-superio` model) whose transmitter feeds a
//! [`ConsoleSink`], which keeps a bounded copy of the output for the host API and
//! optionally streams it to a host file descriptor (the CLI's stdout).

use std::io::{self, Write};
use std::os::fd::{BorrowedFd, RawFd};
use std::sync::{Arc, Mutex};

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};

use super::bus::{DeviceAction, PioDevice};

/// Base port and size of COM1.
pub const COM1_PORT: u16 = 0x3f8;
/// Number of ports a 16550 occupies.
pub const COM_PORT_LEN: u16 = 8;
/// The most console output kept in memory; older bytes are dropped first.
pub const CONSOLE_CAPACITY: usize = 1 << 20;

/// The shared output of the console: a bounded buffer plus an optional host fd.
#[derive(Default)]
pub struct ConsoleOutput {
    buffer: Vec<u8>,
    dropped: u64,
    stream_fd: Option<RawFd>,
}

impl ConsoleOutput {
    /// Takes (and clears) the buffered output; returns it with the count of bytes
    /// that were dropped because the buffer was full.
    pub fn take(&mut self) -> (Vec<u8>, u64) {
        let dropped = std::mem::take(&mut self.dropped);
        (std::mem::take(&mut self.buffer), dropped)
    }

    /// Moves up to `dst.len()` of the oldest buffered bytes into `dst`; returns how
    /// many.
    pub fn take_into(&mut self, dst: &mut [u8]) -> usize {
        let n = self.buffer.len().min(dst.len());
        dst[..n].copy_from_slice(&self.buffer[..n]);
        self.buffer.drain(..n);
        n
    }

    /// Streams future output to `fd` as well (`None` stops streaming). The caller
    /// keeps `fd` open for as long as it is set.
    pub fn set_stream_fd(&mut self, fd: Option<RawFd>) {
        self.stream_fd = fd;
    }

    fn push(&mut self, data: &[u8]) {
        if let Some(fd) = self.stream_fd {
            // SAFETY: the caller of `set_stream_fd` promised the fd stays open while set.
            let fd = unsafe { BorrowedFd::borrow_raw(fd) };
            // Console streaming is best effort: a closed pipe must not stop the guest.
            let _ = write_all_fd(fd, data);
        }
        self.buffer.extend_from_slice(data);
        if self.buffer.len() > CONSOLE_CAPACITY {
            let excess = self.buffer.len() - CONSOLE_CAPACITY;
            self.buffer.drain(..excess);
            self.dropped += excess as u64;
        }
    }
}

fn write_all_fd(fd: BorrowedFd<'_>, mut data: &[u8]) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    while !data.is_empty() {
        // SAFETY: `data` is a valid slice for its length; fd is borrowed and open.
        let n = unsafe { libc::write(fd.as_raw_fd(), data.as_ptr().cast(), data.len()) };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        data = &data[n as usize..];
    }
    Ok(())
}

/// The `Write` end the UART transmits into.
#[derive(Clone, Default)]
pub struct ConsoleSink(pub Arc<Mutex<ConsoleOutput>>);

impl Write for ConsoleSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).push(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The UART's interrupt line. Interrupt delivery (irqfd into the in-kernel irqchip)
/// arrives with interrupt virtualization; until then raising the line is a no-op,
/// which is what a guest polling the line-status register expects.
#[derive(Default)]
pub struct SerialIrq;

impl Trigger for SerialIrq {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        Ok(())
    }
}

/// COM1 as a bus device.
pub struct SerialConsole {
    uart: Serial<SerialIrq, NoEvents, ConsoleSink>,
}

impl SerialConsole {
    /// A UART that transmits into `sink`.
    pub fn new(sink: ConsoleSink) -> SerialConsole {
        SerialConsole {
            uart: Serial::new(SerialIrq, sink),
        }
    }
}

impl PioDevice for SerialConsole {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        // The UART's registers are 1 byte wide; a wider access reads the first
        // register and leaves the rest as an open bus.
        data.fill(0xff);
        if let Some(first) = data.first_mut() {
            *first = self.uart.read(offset as u8);
        }
    }

    fn write(&mut self, offset: u16, data: &[u8]) -> DeviceAction {
        if let Some(&value) = data.first() {
            // The only error is a failed interrupt trigger, which cannot happen here.
            let _ = self.uart.write(offset as u8, value);
        }
        DeviceAction::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transmitted_bytes_reach_the_buffer() {
        let sink = ConsoleSink::default();
        let mut com1 = SerialConsole::new(sink.clone());
        for b in b"hi\n" {
            com1.write(0, &[*b]);
        }
        let (out, dropped) = sink.0.lock().unwrap().take();
        assert_eq!(out, b"hi\n");
        assert_eq!(dropped, 0);
    }

    #[test]
    fn line_status_reports_transmitter_empty() {
        let mut com1 = SerialConsole::new(ConsoleSink::default());
        let mut lsr = [0u8; 1];
        com1.read(5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0, "THR empty bit must be set");
    }

    #[test]
    fn buffer_is_bounded() {
        let mut out = ConsoleOutput::default();
        out.push(&vec![b'a'; CONSOLE_CAPACITY]);
        out.push(b"bc");
        let (buf, dropped) = out.take();
        assert_eq!(buf.len(), CONSOLE_CAPACITY);
        assert_eq!(dropped, 2);
        assert!(buf.ends_with(b"bc"));
    }
}
