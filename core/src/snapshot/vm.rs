//! A paused VM's KVM state: the in-kernel interrupt controllers, the PIT, the
//! KVM clock and every vCPU; and its restore into a fresh VM of the same shape.

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_state2, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};

use super::cpu::VcpuState;
use super::{Raw, SnapshotError};
use crate::memory::{ram_ranges, GuestRam};
use crate::vm::Vm;

/// The in-kernel interrupt controllers' state.
#[derive(Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IrqchipState {
    /// The master 8259 PIC.
    pub pic_master: Raw<kvm_irqchip>,
    /// The slave 8259 PIC.
    pub pic_slave: Raw<kvm_irqchip>,
    /// The IOAPIC (its 24 redirection entries and pending bits).
    pub ioapic: Raw<kvm_irqchip>,
}

/// Everything KVM holds for a VM, vCPUs included (guest memory and the VMM's
/// devices travel apart).
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VmState {
    /// The guest RAM size the state belongs with.
    pub memory_bytes: u64,
    /// The PICs and the IOAPIC, when the VM has the in-kernel irqchip.
    pub irqchip: Option<IrqchipState>,
    /// The PIT, when the VM has one (it comes with the irqchip).
    pub pit: Option<Raw<kvm_pit_state2>>,
    /// The KVM clock (kvmclock's time base), so guest time continues from it.
    pub clock: Raw<kvm_clock_data>,
    /// Every vCPU, in id order.
    pub vcpus: Vec<VcpuState>,
}

fn get_chip(fd: &VmFd, chip_id: u32, name: &str) -> Result<Raw<kvm_irqchip>, SnapshotError> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    fd.get_irqchip(&mut chip)
        .map_err(SnapshotError::kvm(format!("vm {name}"), "KVM_GET_IRQCHIP"))?;
    Ok(Raw(chip))
}

fn set_chip(fd: &VmFd, chip: &Raw<kvm_irqchip>, id: u32, name: &str) -> Result<(), SnapshotError> {
    let section = format!("vm {name}");
    if chip.0.chip_id != id {
        return Err(SnapshotError::refused(
            section,
            format!("holds chip {} where chip {id} belongs", chip.0.chip_id),
        ));
    }
    fd.set_irqchip(&chip.0)
        .map_err(SnapshotError::kvm(section, "KVM_SET_IRQCHIP"))
}

impl VmState {
    /// Captures a paused VM (see [`Vm::pause`]): refused with
    /// [`SnapshotError::NotPaused`] while any vCPU is in a run that is not
    /// parked. Every vCPU's fd stays locked for the whole capture, so no vCPU
    /// re-enters the guest meanwhile (a resume waits for it).
    pub fn capture(vm: &Vm) -> Result<VmState, SnapshotError> {
        let vcpus = vm.vcpu_list();
        let mut fds = Vec::with_capacity(vcpus.len());
        for vcpu in &vcpus {
            if !vcpu.pause_requested() {
                return Err(SnapshotError::NotPaused(format!(
                    "vcpu {} has no pause request: pause the VM first",
                    vcpu.id
                )));
            }
            let fd = vcpu.fd().map_err(|_| {
                SnapshotError::NotPaused(format!("vcpu {} has not parked yet", vcpu.id))
            })?;
            fds.push(fd);
        }
        let fd = vm.vm_fd();
        let irq = vm.has_irqchip();
        let mut clock = fd
            .get_clock()
            .map_err(SnapshotError::kvm("vm clock", "KVM_GET_CLOCK"))?;
        // Only the clock value is restored: the flags describe this host's
        // clock at capture time (and KVM_CLOCK_REALTIME would make the restore
        // add the wall time since, where guest time should continue).
        clock.flags = 0;
        clock.realtime = 0;
        clock.host_tsc = 0;
        let (irqchip, pit) = if irq {
            let chips = IrqchipState {
                pic_master: get_chip(fd, KVM_IRQCHIP_PIC_MASTER, "pic master")?,
                pic_slave: get_chip(fd, KVM_IRQCHIP_PIC_SLAVE, "pic slave")?,
                ioapic: get_chip(fd, KVM_IRQCHIP_IOAPIC, "ioapic")?,
            };
            let pit = fd
                .get_pit2()
                .map_err(SnapshotError::kvm("vm pit", "KVM_GET_PIT2"))?;
            (Some(chips), Some(Raw(pit)))
        } else {
            (None, None)
        };
        let vcpus = vcpus
            .iter()
            .zip(&fds)
            .map(|(vcpu, fd)| VcpuState::capture(vcpu.id, fd, irq))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(VmState {
            memory_bytes: vm.ram().size(),
            irqchip,
            pit,
            clock: Raw(clock),
            vcpus,
        })
    }

    /// Restores this state into `vm`: a fresh VM with the same RAM size, the
    /// same vCPU count, the irqchip if the state has one, vCPUs that have not
    /// run, and guest memory already in place ([`copy_memory`]). Its next
    /// [`Vm::run`] continues where the captured VM was paused. Every check is
    /// made before anything is written.
    pub fn restore(&self, vm: &Vm) -> Result<(), SnapshotError> {
        let shape = |m: String| SnapshotError::refused("vm", m);
        if vm.ram().size() != self.memory_bytes {
            return Err(shape(format!(
                "the state is for {} bytes of RAM, the VM has {}",
                self.memory_bytes,
                vm.ram().size()
            )));
        }
        let vcpus = vm.vcpu_list();
        if vcpus.len() != self.vcpus.len() {
            return Err(shape(format!(
                "the state has {} vCPUs, the VM {}",
                self.vcpus.len(),
                vcpus.len()
            )));
        }
        if vm.has_irqchip() != self.irqchip.is_some() {
            return Err(shape(format!(
                "the state was captured {} the in-kernel irqchip, the VM has {}",
                if self.irqchip.is_some() {
                    "with"
                } else {
                    "without"
                },
                if vm.has_irqchip() { "one" } else { "none" },
            )));
        }
        if self.pit.is_some() && self.irqchip.is_none() {
            return Err(shape("a PIT without the irqchip it comes with".into()));
        }
        let mut fds = Vec::with_capacity(vcpus.len());
        for (vcpu, state) in vcpus.iter().zip(&self.vcpus) {
            let section = format!("vcpu {}", vcpu.id);
            if state.id != vcpu.id {
                return Err(SnapshotError::refused(
                    section,
                    format!("holds the state of vcpu {}", state.id),
                ));
            }
            if state.lapic.is_some() != self.irqchip.is_some() {
                return Err(SnapshotError::refused(
                    section,
                    "a local APIC state goes with the irqchip",
                ));
            }
            fds.push(
                vcpu.fd()
                    .map_err(|e| SnapshotError::refused(section, e.to_string()))?,
            );
        }
        let fd = vm.vm_fd();
        fd.set_clock(&self.clock.0)
            .map_err(SnapshotError::kvm("vm clock", "KVM_SET_CLOCK"))?;
        for (state, fd) in self.vcpus.iter().zip(&fds) {
            state.restore(fd)?;
        }
        // The interrupt controllers after the local APICs: restoring the IOAPIC
        // delivers its pending lines to them again, and a LAPIC written after
        // that would drop them.
        if let Some(pit) = &self.pit {
            fd.set_pit2(&pit.0)
                .map_err(SnapshotError::kvm("vm pit", "KVM_SET_PIT2"))?;
        }
        if let Some(chips) = &self.irqchip {
            set_chip(fd, &chips.pic_master, KVM_IRQCHIP_PIC_MASTER, "pic master")?;
            set_chip(fd, &chips.pic_slave, KVM_IRQCHIP_PIC_SLAVE, "pic slave")?;
            set_chip(fd, &chips.ioapic, KVM_IRQCHIP_IOAPIC, "ioapic")?;
        }
        Ok(())
    }

    /// The state as JSON text.
    pub fn to_json(&self) -> String {
        // Plain data with string keys: serializing cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Parses a state written by [`VmState::to_json`]; a missing, truncated or
    /// malformed section is refused, naming it where serde can.
    pub fn from_json(text: &str) -> Result<VmState, SnapshotError> {
        serde_json::from_str(text).map_err(|e| SnapshotError::refused("state", e.to_string()))
    }
}

/// Copies guest RAM byte for byte from `from` into `to` (of the same size).
pub fn copy_memory(from: &GuestRam, to: &GuestRam) -> Result<(), SnapshotError> {
    const CHUNK: u64 = 1 << 20;
    let section = "memory";
    if from.size() != to.size() {
        return Err(SnapshotError::refused(
            section,
            format!("{} bytes cannot go into {}", from.size(), to.size()),
        ));
    }
    let mut buf = vec![0u8; CHUNK as usize];
    for (start, len) in ram_ranges(from.size()) {
        let mut at = start;
        while at < start + len {
            let n = (start + len - at).min(CHUNK) as usize;
            let io = |e: crate::memory::MemoryError| SnapshotError::refused(section, e.to_string());
            from.read(at, &mut buf[..n]).map_err(io)?;
            to.write(at, &buf[..n]).map_err(io)?;
            at += n as u64;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    //! The KVM tests run real guests (assembled from `test_guests/` with
    //! binutils' `as` and `objcopy`) on /dev/kvm; `tests/run_all.ts` runs them
    //! inside kvmbox where the host has no KVM.
    use std::sync::Arc;
    use std::thread::{self, JoinHandle};
    use std::time::{Duration, Instant};

    use super::*;
    use crate::boot::layout::DEFAULT_LONG_LOAD_ADDR;
    use crate::boot::EntryMode;
    use crate::vcpu::exit::{StopReason, UnhandledAccess};
    use crate::vcpu::RunResult;
    use crate::vm::check_kvm;

    const MEM: u64 = 4 << 20;
    const RUN_LIMIT: Duration = Duration::from_secs(300);
    /// `out 5 -> 0xf4`, the guests' way to end.
    const GUEST_DONE: StopReason = StopReason::DebugExit { exit_code: 11 };

    /// Assembles `test_guests/{name}.s` into a flat binary.
    fn assemble(name: &str) -> Vec<u8> {
        let source = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("src/snapshot/test_guests")
            .join(format!("{name}.s"));
        let dir = std::env::temp_dir().join(format!("dv-snapshot-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (object, flat) = (dir.join("guest.o"), dir.join("guest.bin"));
        let run = |cmd: &mut std::process::Command| {
            let status = cmd.status().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
            assert!(status.success(), "{cmd:?}: {status}");
        };
        run(std::process::Command::new("as")
            .arg("--64")
            .arg("-o")
            .arg(&object)
            .arg(&source));
        run(std::process::Command::new("objcopy")
            .args(["-O", "binary", "-j", ".text"])
            .arg(&object)
            .arg(&flat));
        let code = std::fs::read(&flat).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        code
    }

    fn new_vm(vcpus: u32, irqchip: bool) -> Vm {
        if let Err(e) = check_kvm() {
            panic!("{e}: this test needs KVM (run it where /dev/kvm works, or in kvmbox)");
        }
        let vm = Vm::new(MEM, UnhandledAccess::Stop).unwrap();
        if irqchip {
            vm.enable_irqchip().unwrap();
        }
        for _ in 0..vcpus {
            vm.create_vcpu().unwrap();
        }
        vm
    }

    /// A VM with `code` loaded and every vCPU at its entry (each with its own
    /// stack), APs runnable.
    fn loaded_vm(code: &[u8], vcpus: u32, irqchip: bool) -> Vm {
        let vm = new_vm(vcpus, irqchip);
        vm.ram().write(DEFAULT_LONG_LOAD_ADDR, code).unwrap();
        for vcpu in vm.vcpu_list() {
            let stack = 0x3f_f000 - u64::from(vcpu.id) * 0x1_0000;
            vcpu.setup_entry(EntryMode::Long, DEFAULT_LONG_LOAD_ADDR, stack)
                .unwrap();
            // With the in-kernel LAPIC, KVM makes APs wait for INIT/SIPI.
            let runnable = kvm_bindings::kvm_mp_state {
                mp_state: kvm_bindings::KVM_MP_STATE_RUNNABLE,
            };
            vcpu.fd().unwrap().set_mp_state(runnable).unwrap();
        }
        vm
    }

    fn console(vm: &Vm) -> Vec<u8> {
        vm.console().0.lock().unwrap().take()
    }

    fn run_in_background(vm: &Arc<Vm>) -> JoinHandle<RunResult> {
        let vm = vm.clone();
        thread::spawn(move || vm.run(Some(RUN_LIMIT)).unwrap())
    }

    fn read_u64(vm: &Vm, offset: u64) -> u64 {
        let mut bytes = [0u8; 8];
        vm.ram()
            .read(DEFAULT_LONG_LOAD_ADDR + offset, &mut bytes)
            .unwrap();
        u64::from_le_bytes(bytes)
    }

    /// Waits until `ready` holds for what `probe` reads from the running VM,
    /// or panics with the last reading.
    fn wait_for<T: std::fmt::Debug>(
        vm: &Vm,
        what: &str,
        probe: impl Fn(&Vm) -> T,
        ready: impl Fn(&T) -> bool,
    ) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let seen = probe(vm);
            if ready(&seen) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the guest never got to {what}: {seen:?}"
            );
            thread::sleep(Duration::from_millis(1));
        }
    }

    /// Pauses `source` once `ready`, captures it (through JSON, as a file
    /// will carry it), stops it, and restores the state and a copy of its
    /// memory into a fresh VM of the same shape.
    fn pause_capture_restore(
        source: &Arc<Vm>,
        runner: JoinHandle<RunResult>,
        irqchip: bool,
        check: impl FnOnce(&VmState),
    ) -> Vm {
        source.pause().unwrap();
        let state = VmState::capture(source).unwrap();
        check(&state);
        let state = VmState::from_json(&state.to_json()).unwrap();
        let target = new_vm(state.vcpus.len() as u32, irqchip);
        copy_memory(source.ram(), target.ram()).unwrap();
        source.stop();
        assert_eq!(runner.join().unwrap().stop, StopReason::Stopped);
        state.restore(&target).unwrap();
        target
    }

    #[test]
    #[ignore = "needs /dev/kvm: the test command runs it with --ignored where KVM works"]
    fn snapshot_a_computation_paused_mid_loop_finishes_with_the_uninterrupted_result() {
        const ITERATIONS: u64 = 1 << 24;
        const PROGRESS: u64 = 8;
        let code = assemble("compute");
        let reference = {
            let vm = loaded_vm(&code, 1, false);
            assert_eq!(vm.run(Some(RUN_LIMIT)).unwrap().stop, GUEST_DONE);
            console(&vm)
        };
        assert_eq!(
            reference.len(),
            17,
            "{:?}",
            String::from_utf8_lossy(&reference)
        );

        let source = Arc::new(loaded_vm(&code, 1, false));
        let runner = run_in_background(&source);
        wait_for(
            &source,
            "its loop",
            |vm| read_u64(vm, PROGRESS),
            |&left| left < ITERATIONS,
        );
        let target = pause_capture_restore(&source, runner, false, |state| {
            let regs = state.vcpus[0].regs.0;
            assert!(
                regs.rcx > 0 && regs.rcx < ITERATIONS,
                "paused mid-loop, not with {} rounds left",
                regs.rcx
            );
            // MXCSR is the 7th dword of the XSAVE area: round toward zero.
            assert_eq!(state.vcpus[0].xsave.0.region[6] & 0x6000, 0x6000);
            assert!(
                console(&source).is_empty(),
                "the source printed before the pause"
            );
        });
        let result = target.run(Some(RUN_LIMIT)).unwrap();
        assert_eq!(result.stop, GUEST_DONE);
        assert_eq!(
            String::from_utf8_lossy(&console(&target)),
            String::from_utf8_lossy(&reference)
        );
    }

    #[test]
    #[ignore = "needs /dev/kvm: the test command runs it with --ignored where KVM works"]
    fn snapshot_a_guest_paused_between_port_writes_neither_repeats_nor_loses_one() {
        const COUNT: usize = 4000;
        let expected: Vec<u8> = (0..COUNT).map(|i| b'0' + (i % 64) as u8).collect();
        let code = assemble("io_count");
        let source = Arc::new(loaded_vm(&code, 1, false));
        let runner = run_in_background(&source);
        wait_for(
            &source,
            "its 500th character",
            |vm| vm.console().stats().tally.bytes,
            |&printed| printed >= 500,
        );
        let mut printed = Vec::new();
        let target = pause_capture_restore(&source, runner, false, |_| {
            printed = console(&source);
        });
        assert!(printed.len() < COUNT, "paused before the end");
        assert_eq!(target.run(Some(RUN_LIMIT)).unwrap().stop, GUEST_DONE);
        printed.extend(console(&target));
        let first_difference = printed.iter().zip(&expected).position(|(a, b)| a != b);
        assert_eq!(
            (printed.len(), first_difference),
            (COUNT, None),
            "printed around the pause: {:?}",
            String::from_utf8_lossy(&printed[first_difference.unwrap_or(0).saturating_sub(8)..])
                .chars()
                .take(24)
                .collect::<String>()
        );
    }

    #[test]
    #[ignore = "needs /dev/kvm: the test command runs it with --ignored where KVM works"]
    fn snapshot_lapic_timers_of_two_vcpus_keep_ticking_and_the_irqchip_and_pit_move_with_a_restore()
    {
        const TARGET: u64 = 400;
        let ticks = |vm: &Vm| (read_u64(vm, 8), read_u64(vm, 16));
        let code = assemble("lapic_timer");
        let source = Arc::new(loaded_vm(&code, 2, true));
        let runner = run_in_background(&source);
        wait_for(&source, "50 ticks on each vCPU", ticks, |&(a, b)| {
            a >= 50 && b >= 50
        });
        let mut captured = None;
        let target = pause_capture_restore(&source, runner, true, |state| {
            assert!(state.vcpus.iter().all(|v| v.lapic.is_some()));
            let (a, b) = ticks(&source);
            assert!(a < TARGET && b < TARGET, "captured before the end: {a} {b}");
            captured = Some(chips(state));
        });
        // What the guest programmed is in the restored VM's irqchip and PIT.
        let (ioapic, pit, pics) = captured.unwrap();
        // SAFETY: chip 2 is the IOAPIC, so the union holds its state.
        let pin2 = unsafe { ioapic.chip.ioapic.redirtbl[2].bits };
        assert_eq!(pin2 & 0x1_00ff, 0x1_0041, "IOAPIC pin 2: {pin2:#x}");
        assert_eq!((pit.channels[0].count, pit.channels[0].mode), (1193, 2));
        target.pause().unwrap();
        let restored = chips(&VmState::capture(&target).unwrap());
        let bytes = |c: &kvm_irqchip| serde_json::to_value(Raw(*c)).unwrap();
        assert_eq!(bytes(&restored.0), bytes(&ioapic), "the IOAPIC");
        assert_eq!(bytes(&restored.2 .0), bytes(&pics.0), "the master PIC");
        assert_eq!(bytes(&restored.2 .1), bytes(&pics.1), "the slave PIC");
        let counting = |p: &kvm_pit_state2| p.channels.map(|c| (c.count, c.mode, c.gate));
        assert_eq!(counting(&restored.1), counting(&pit), "the PIT");
        target.resume();

        let at_restore = ticks(&target);
        let result = target.run(Some(Duration::from_secs(120))).unwrap();
        assert_eq!(
            result.stop,
            GUEST_DONE,
            "ticks at the restore {at_restore:?}, at the end {:?}",
            ticks(&target)
        );
        assert_eq!(console(&target), b"ok\n");
        let (a, b) = ticks(&target);
        assert!(a >= TARGET && b >= TARGET, "{a} {b}");
    }

    /// The IOAPIC, the PIT and the two PICs of a state with the irqchip.
    fn chips(state: &VmState) -> (kvm_irqchip, kvm_pit_state2, (kvm_irqchip, kvm_irqchip)) {
        let chips = state.irqchip.as_ref().expect("the irqchip's state");
        let pit = state.pit.as_ref().expect("the PIT's state");
        (
            chips.ioapic.0,
            pit.0,
            (chips.pic_master.0, chips.pic_slave.0),
        )
    }

    #[test]
    #[ignore = "needs /dev/kvm: the test command runs it with --ignored where KVM works"]
    fn snapshot_capture_refuses_a_running_vm_and_restore_a_vm_of_another_shape() {
        let code = assemble("compute");
        let source = Arc::new(loaded_vm(&code, 1, false));
        let runner = run_in_background(&source);
        wait_for(
            &source,
            "its loop",
            |vm| read_u64(vm, 8),
            |&left| left < 1 << 24,
        );
        match VmState::capture(&source) {
            Err(SnapshotError::NotPaused(m)) => assert!(m.contains("vcpu 0"), "{m}"),
            Err(e) => panic!("expected NotPaused, got {e}"),
            Ok(_) => panic!("a running VM was captured"),
        }
        source.pause().unwrap();
        let state = VmState::capture(&source).unwrap();
        source.stop();
        runner.join().unwrap();
        for (vcpus, irqchip, what) in [(2, false, "vCPUs"), (1, true, "irqchip")] {
            let other = new_vm(vcpus, irqchip);
            match state.restore(&other) {
                Err(e @ SnapshotError::Refused { .. }) => {
                    assert!(e.to_string().starts_with("vm: "), "{e}");
                    assert!(e.to_string().contains(what), "{e}");
                }
                Err(e) => panic!("expected a refusal, got {e}"),
                Ok(()) => panic!("restored into a VM with {what}"),
            }
        }
    }
}
