//! A VM: the KVM VM fd, guest RAM, the device bus and the VM's vCPUs.
//!
//! [`VmShared`] is what the vCPU threads need (RAM, devices, policy); [`Vm`] adds
//! what only the host uses (the VM fd, the list of vCPUs, the run protocol).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_enable_cap, kvm_msr_filter, kvm_userspace_memory_region,
    KVM_CAP_X86_USER_SPACE_MSR, KVM_MAX_CPUID_ENTRIES, KVM_MSR_EXIT_REASON_FILTER,
};
use vmm_sys_util::ioctl::ioctl_with_ref;
use vmm_sys_util::{ioctl_ioc_nr, ioctl_iow_nr};

use crate::cpuid::{self, CpuidPolicy};
use crate::msr_filter::MsrFilter;
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{GuestMemory as _, GuestMemoryRegion as _};

use crate::devices::acpi_pm::{AcpiPm, ACPI_PM_BASE, ACPI_PM_LEN};
use crate::devices::bus::{Bus, Space, VmEvents};
use crate::devices::console::STREAM_STALL;
use crate::devices::debug_exit::{DebugExit, DEBUG_EXIT_PORT};
use crate::devices::i8042::{I8042, I8042_PORT, I8042_PORT_LEN};
use crate::devices::platform::{DeviceStates, PlatformDevices};
use crate::devices::power_off::{PowerOff, POWER_OFF_PORT, POWER_OFF_PORT_LEN};
use crate::devices::rtc::{Rtc, RTC_PORT, RTC_PORT_LEN};
use crate::devices::serial::{ConsoleSink, SerialConsole, COM1_PORT, COM_PORT_LEN};
use crate::dirty::{DirtyBitmap, DirtyError};
use crate::error::{Error, Result};
use crate::hypercall::{HypercallPort, Hypercalls, HYPERCALL_PORT};
use crate::irq::{self, IrqState, IrqStatsSnapshot, SERIAL_GSI};
use crate::memory::GuestRam;
use crate::metrics::VcpuMetricsSnapshot;
use crate::msi::{GsiRoutes, KvmMsiSink};
use crate::pci::root::{PciRoot, PCI_CONFIG_PORT, PCI_CONFIG_PORT_LEN};
use crate::snapshot::file::DiffBase;
use crate::vcpu::exit::UnhandledAccess;
use crate::vcpu::{wait_all, Control, RunResult, StopRequest, Vcpu};
use crate::virtio::devices::DeviceConfig;
use crate::virtio::pci::{VirtioPci, BAR_SIZE};
use crate::virtio::VirtioError;
use thiserror::Error;

// KVM_X86_SET_MSR_FILTER = _IOW(KVMIO, 0xc6, struct kvm_msr_filter): kvm-ioctls
// 0.19 has no wrapper for it.
ioctl_iow_nr!(KVM_X86_SET_MSR_FILTER, 0xAE, 0xc6, kvm_msr_filter);

/// What can go wrong with a VM itself (its parts have their own errors:
/// [`crate::memory::MemoryError`], [`crate::vcpu::VcpuError`],
/// [`crate::irq::IrqError`], the devices'...).
#[derive(Debug, Error)]
pub enum VmError {
    /// /dev/kvm cannot be opened
    #[error("cannot open /dev/kvm: {source}{}", open_hint(.source))]
    Open {
        /// The host's error.
        source: kvm_ioctls::Error,
    },
    /// /dev/kvm speaks another API
    #[error("cannot open /dev/kvm: KVM API version {0} is not the stable version 12")]
    ApiVersion(i32),
    /// A KVM ioctl failed
    #[error("{op} failed: {source}")]
    Kvm {
        /// The ioctl.
        op: &'static str,
        /// KVM's error.
        source: kvm_ioctls::Error,
    },
    /// The irqchip asked for after a vCPU exists
    #[error("the irqchip must be created before the VM's first vCPU")]
    IrqchipAfterVcpu,
    /// Interrupts asked for on a VM without the irqchip
    #[error("{0} needs the in-kernel irqchip: create the VM with interrupts enabled")]
    NoIrqchip(&'static str),
    /// More vCPUs than the host allows
    #[error("a VM on this host has at most {0} vCPUs")]
    VcpuLimit(u32),
    /// A run of a VM without vCPUs
    #[error("the VM has no vCPUs; create one first")]
    NoVcpus,
    /// A run of a VM that is already running (as a whole or one of its vCPUs)
    #[error("the VM is already running; wait for its run to return or stop it first")]
    AlreadyRunning,
    /// A vCPU did not park in time
    #[error("vCPU {id} did not pause within {ms} ms")]
    PauseTimeout {
        /// Which vCPU.
        id: u32,
        /// How long it was given.
        ms: u128,
    },
    /// A device name that is empty, too long or taken
    #[error("device name {0:?} is empty, too long or already taken")]
    DeviceName(String),
    /// No device of that name
    #[error("the VM has no device named {0:?}")]
    NoSuchDevice(String),
    /// A device's worker did not go idle in time for a pause
    #[error("device {name:?} did not quiesce within {ms} ms: {source}")]
    DeviceQuiesce {
        /// The device.
        name: String,
        /// How long it was given.
        ms: u128,
        /// Its error.
        source: VirtioError,
    },
    /// Dirty-page tracking failed or is off
    #[error(transparent)]
    Dirty(#[from] DirtyError),
    /// A device's host resources could not be handed over or taken over
    #[error("device {name:?}: {source}")]
    HandOver {
        /// The device.
        name: String,
        /// Its error.
        source: VirtioError,
    },
}

fn open_hint(e: &kvm_ioctls::Error) -> &'static str {
    match e.errno() {
        libc::ENOENT => " (no such device: is the kvm module loaded?)",
        libc::EACCES | libc::EPERM => {
            " (permission denied: run as root or add the user to the kvm group)"
        }
        _ => "",
    }
}

fn kvm_op(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { op, source }
}

/// The largest vCPU count per VM accepted here (KVM's own limit may be lower; it
/// is checked when the vCPU is created).
pub const MAX_VCPUS: u32 = 254;

/// Address of the TSS page Intel VMX needs for real mode (below the 4 GiB top, in
/// the MMIO hole, like QEMU and Firecracker).
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;

/// The state every vCPU thread of a VM shares.
pub struct VmShared {
    /// Guest RAM.
    pub ram: GuestRam,
    /// Port-I/O devices.
    pub pio: Arc<Bus>,
    /// MMIO devices.
    pub mmio: Arc<Bus>,
    /// PCI bus 0 (its config ports are on `pio`, its BARs on `mmio`).
    pub pci: Arc<Mutex<PciRoot>>,
    /// Where devices raise the events that end the VM.
    pub events: VmEvents,
    /// What to do with I/O and MMIO no device claims.
    pub unhandled: UnhandledAccess,
    /// The serial console's output.
    pub console: ConsoleSink,
    /// Hypercall state (the run's report).
    pub hypercalls: Arc<Hypercalls>,
    /// COM1, also reached from the host (console input).
    pub serial: Arc<Mutex<SerialConsole>>,
    /// The devices every VM has, for their states.
    pub platform: PlatformDevices,
    /// Every vCPU's stop handle, for stopping siblings.
    controls: Mutex<Vec<(u32, Arc<Control>)>>,
    /// The first stop of the current run that ends the VM (debug exit, crash...).
    vm_stop: Mutex<Option<RunResult>>,
}

fn relock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The data behind these locks is a plain value replaced whole, so a poisoned lock
    // still holds a consistent value.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl VmShared {
    /// The shared state of a VM with `ram`: COM1, the debug-exit port and the
    /// hypercall interface. Needs no KVM (the exit loop's unit tests use it).
    pub fn new(ram: GuestRam, unhandled: UnhandledAccess) -> Result<VmShared> {
        let console = ConsoleSink::default();
        let events = VmEvents::default();
        let pio = Arc::new(Bus::new(Space::Pio));
        let serial = Arc::new(Mutex::new(SerialConsole::new(console.clone())?));
        let hypercalls = Arc::new(Hypercalls::new(console.clone()));
        let port = |p: u16| u64::from(p);
        let len = |l: u16| u64::from(l);
        pio.insert("com1", port(COM1_PORT), len(COM_PORT_LEN), serial.clone())?;
        let platform = PlatformDevices {
            serial: serial.clone(),
            i8042: Arc::new(Mutex::new(I8042::new(events.clone()))),
            pm1a_control: Arc::new(Mutex::new(PowerOff::new(events.clone()))),
            rtc: Arc::new(Mutex::new(Rtc::default())),
            debug_exit: Arc::new(Mutex::new(DebugExit::new(events.clone()))),
            acpi_pm: OnceLock::new(),
        };
        let p = &platform;
        pio.insert("debug-exit", port(DEBUG_EXIT_PORT), 1, p.debug_exit.clone())?;
        pio.insert(
            "i8042",
            port(I8042_PORT),
            len(I8042_PORT_LEN),
            p.i8042.clone(),
        )?;
        pio.insert(
            "pm1a-control",
            port(POWER_OFF_PORT),
            len(POWER_OFF_PORT_LEN),
            p.pm1a_control.clone(),
        )?;
        // Every VM has the clock, not only Linux guests: see `devices::rtc`.
        pio.insert("rtc", port(RTC_PORT), len(RTC_PORT_LEN), p.rtc.clone())?;
        pio.insert(
            "hypercall",
            port(HYPERCALL_PORT),
            4,
            Arc::new(Mutex::new(HypercallPort::new(
                hypercalls.clone(),
                ram.clone(),
                events.clone(),
            ))),
        )?;
        let mmio = Arc::new(Bus::new(Space::Mmio));
        let pci = Arc::new(Mutex::new(PciRoot::new(mmio.clone())));
        pio.insert(
            "pci-config",
            port(PCI_CONFIG_PORT),
            len(PCI_CONFIG_PORT_LEN),
            pci.clone(),
        )?;
        Ok(VmShared {
            ram,
            pio,
            mmio,
            pci,
            events,
            unhandled,
            serial,
            platform,
            hypercalls,
            console,
            controls: Mutex::new(Vec::new()),
            vm_stop: Mutex::new(None),
        })
    }

    /// Remembers the first VM-ending stop of this run.
    pub fn record_vm_stop(&self, result: &RunResult) {
        let mut stop = relock(&self.vm_stop);
        if stop.is_none() {
            *stop = Some(result.clone());
        }
    }

    /// Every device's state as plain data (see [`DeviceStates`]).
    pub fn device_states(&self) -> DeviceStates {
        self.platform.states(&self.pci)
    }

    /// Restores every device from `states` (a VM built with the same devices).
    pub fn restore_device_states(&self, states: &DeviceStates) -> Result<()> {
        self.platform.restore(&self.pci, states)
    }

    /// Stops every vCPU but `except` (the one whose guest ended the VM).
    pub fn stop_all_except(&self, except: u32) {
        for (id, control) in relock(&self.controls).iter() {
            if *id != except {
                control.request_stop(StopRequest::Stop);
            }
        }
    }
}

pub(crate) fn kvm() -> Result<Arc<Kvm>> {
    // One /dev/kvm fd per process, opened on first use: opening it is a syscall the
    // cold-start path need not pay per VM. A failed open is not cached.
    static KVM: OnceLock<Mutex<Option<Arc<Kvm>>>> = OnceLock::new();
    let mut slot = relock(KVM.get_or_init(|| Mutex::new(None)));
    if let Some(kvm) = slot.as_ref() {
        return Ok(kvm.clone());
    }
    let kvm = Kvm::new().map_err(|source| VmError::Open { source })?;
    raise_fd_limit();
    let version = kvm.get_api_version();
    if version != 12 {
        return Err(VmError::ApiVersion(version).into());
    }
    let kvm = Arc::new(kvm);
    *slot = Some(kvm.clone());
    Ok(kvm)
}

/// Raises the process's soft limit on open files to its hard limit, once:
/// every VM holds a few fds (the VM, each vCPU, its memory file), so a
/// process with a thousand function VMs passes the usual soft limit of 1024
/// long before memory runs out. What the hard limit allows is the
/// administrator's bound, not ours. Failure leaves the limit as it was.
fn raise_fd_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into `limit`, a valid, exclusively
    // borrowed struct of that type.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return;
    }
    if limit.rlim_cur < limit.rlim_max {
        limit.rlim_cur = limit.rlim_max;
        // SAFETY: setrlimit reads one rlimit from `limit`, valid for the call.
        // Raising the soft limit up to the hard one needs no privilege.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) };
    }
}

/// Checks that /dev/kvm can be opened (for the host's diagnostics).
pub fn check_kvm() -> Result<()> {
    kvm().map(|_| ())
}

/// A VM.
pub struct Vm {
    // Field order matters: the VM fd closes before the shared state, so guest RAM
    // outlives every KVM reference to it (vCPUs hold their own `Arc<VmShared>`).
    // Devices hold the VM fd too (ioeventfds, MSI routes); they live in the
    // shared state, whose guest RAM mapping each of them also holds (a
    // `GuestRam` clone), so RAM outlives every KVM reference either way.
    fd: Arc<VmFd>,
    shared: Arc<VmShared>,
    vcpus: Mutex<Vec<Arc<Vcpu>>>,
    cpuid_policy: Mutex<CpuidPolicy>,
    irq: IrqState,
    /// The MSI routing table, made when the first device needs it.
    routes: OnceLock<Arc<GsiRoutes>>,
    /// The virtio devices, by name, for listings and runtime requests.
    virtio: Mutex<Vec<(String, Arc<Mutex<VirtioPci>>)>>,
    /// What a diff snapshot of this VM would be taken against (see
    /// [`DiffBase`]).
    diff_base: Mutex<DiffBase>,
    /// Whether the devices' exclusive host resources are given up (see
    /// [`Vm::hand_over_devices`]): devices added meanwhile are built unclaimed.
    handed_over: AtomicBool,
    /// Whether [`Vm::run`] is in progress: a second, concurrent run is
    /// refused before it touches the first one's stop reason.
    running: AtomicBool,
    /// A function VM's checkpoint (see [`crate::function`]), once taken; an
    /// invocation holds the lock for its whole run.
    function: Mutex<Option<crate::function::reset::Checkpoint>>,
}

/// KVM's supported CPUID, read once per process (it describes the host).
pub(crate) fn supported_cpuid() -> Result<Vec<kvm_cpuid_entry2>> {
    static SUPPORTED: OnceLock<Vec<kvm_cpuid_entry2>> = OnceLock::new();
    if let Some(entries) = SUPPORTED.get() {
        return Ok(entries.clone());
    }
    let entries = kvm()?
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_op("KVM_GET_SUPPORTED_CPUID"))?
        .as_slice()
        .to_vec();
    Ok(SUPPORTED.get_or_init(|| entries).clone())
}

impl Vm {
    /// Creates a VM with `mem_bytes` of RAM, COM1 and the debug-exit port.
    pub fn new(mem_bytes: u64, unhandled: UnhandledAccess) -> Result<Vm> {
        Self::with_ram(GuestRam::new(mem_bytes)?, unhandled)
    }

    /// Creates a VM around guest RAM made elsewhere (a snapshot's memory file,
    /// see [`GuestRam::from_file`]), with COM1 and the debug-exit port.
    pub fn with_ram(ram: GuestRam, unhandled: UnhandledAccess) -> Result<Vm> {
        let fd = kvm()?.create_vm().map_err(kvm_op("KVM_CREATE_VM"))?;
        fd.set_tss_address(KVM_TSS_ADDRESS)
            .map_err(kvm_op("KVM_SET_TSS_ADDR"))?;
        for (slot, region) in ram.mmap().iter().enumerate() {
            let memory_region = kvm_userspace_memory_region {
                slot: slot as u32,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
                flags: 0,
            };
            // SAFETY: the host range is a live mapping owned by `ram`, which moves
            // into `VmShared`; every holder of a KVM fd for this VM (this `Vm` and
            // each `Vcpu`) drops that fd before its `Arc<VmShared>`, so the mapping
            // outlives every KVM use of it. Slots do not overlap (distinct regions).
            unsafe { fd.set_user_memory_region(memory_region) }
                .map_err(kvm_op("KVM_SET_USER_MEMORY_REGION"))?;
        }
        Ok(Vm {
            fd: Arc::new(fd),
            routes: OnceLock::new(),
            virtio: Mutex::new(Vec::new()),
            diff_base: Mutex::new(DiffBase::None),
            handed_over: AtomicBool::new(false),
            running: AtomicBool::new(false),
            function: Mutex::new(None),
            shared: Arc::new(VmShared::new(ram, unhandled)?),
            vcpus: Mutex::new(Vec::new()),
            cpuid_policy: Mutex::new(CpuidPolicy::default()),
            irq: IrqState::default(),
        })
    }

    /// Gives the VM KVM's in-kernel irqchip (PIC, IOAPIC, local APICs) and PIT,
    /// and connects COM1 to IRQ 4 through an irqfd. Only before the first vCPU
    /// exists; see [`crate::irq`] for what changes (HLT stays in KVM).
    pub fn enable_irqchip(&self) -> Result<()> {
        // Holding the vCPU list keeps a vCPU from being created meanwhile.
        let vcpus = relock(&self.vcpus);
        if !vcpus.is_empty() {
            return Err(VmError::IrqchipAfterVcpu.into());
        }
        if self.irq.irqchip() {
            return Ok(());
        }
        irq::create_irqchip(&self.fd)?;
        relock(&self.shared.serial)
            .irq_line()
            .attach(&self.fd, SERIAL_GSI)?;
        self.irq.set_irqchip();
        Ok(())
    }

    /// Whether the VM has the in-kernel irqchip (and PIT).
    pub fn has_irqchip(&self) -> bool {
        self.irq.irqchip()
    }

    /// The function checkpoint slot (see [`crate::function`]).
    pub(crate) fn function_slot(&self) -> &Mutex<Option<crate::function::reset::Checkpoint>> {
        &self.function
    }

    /// The KVM VM fd (for the VM-wide state snapshots read and write).
    pub(crate) fn vm_fd(&self) -> &VmFd {
        &self.fd
    }

    fn require_irqchip(&self, what: &'static str) -> std::result::Result<(), VmError> {
        if self.irq.irqchip() {
            Ok(())
        } else {
            Err(VmError::NoIrqchip(what))
        }
    }

    /// Raises one edge on interrupt line `line` (GSI 0-23).
    pub fn inject_irq(&self, line: u32) -> Result<()> {
        self.require_irqchip("injecting an interrupt")?;
        irq::pulse(&self.fd, line)?;
        self.irq.count_pulse();
        Ok(())
    }

    /// Sends an MSI; returns whether a local APIC accepted it.
    pub fn send_msi(&self, address: u64, data: u32) -> Result<bool> {
        self.require_irqchip("sending an MSI")?;
        let delivered = irq::send_msi(&self.fd, address, data)?;
        self.irq.count_msi(delivered);
        Ok(delivered)
    }

    /// The host's interrupt counters.
    pub fn irq_stats(&self) -> IrqStatsSnapshot {
        let serial = relock(&self.shared.serial).irq_line().raised();
        self.irq.snapshot(serial)
    }

    /// Queues bytes for the guest on COM1's receive side.
    pub fn console_input(&self, input: &[u8]) -> Result<()> {
        relock(&self.shared.serial).enqueue_input(input)
    }

    /// The guest's interrupt counters, as published with the IRQ_COUNTERS
    /// hypercall (empty when it published none).
    pub fn guest_irq_counters(&self) -> Vec<u64> {
        self.shared.hypercalls.irq_counters(&self.shared.ram)
    }

    /// Attaches the ACPI PM device (power-off and reset through the FADT's
    /// registers) once; the Linux loader does, as its ACPI tables point at it.
    pub fn attach_acpi_pm(&self) -> Result<()> {
        let base = u64::from(ACPI_PM_BASE);
        if self.shared.pio.claims(base) {
            return Ok(());
        }
        let device = Arc::new(Mutex::new(AcpiPm::new(self.shared.events.clone())));
        match self
            .shared
            .pio
            .insert("acpi-pm", base, u64::from(ACPI_PM_LEN), device.clone())
        {
            // Another load attached it meanwhile.
            Err(_) if self.shared.pio.claims(base) => Ok(()),
            Err(e) => Err(e.into()),
            Ok(()) => {
                let _ = self.shared.platform.acpi_pm.set(device);
                Ok(())
            }
        }
    }

    /// Guest RAM.
    pub fn ram(&self) -> &GuestRam {
        &self.shared.ram
    }

    /// The serial console's output.
    pub fn console(&self) -> &ConsoleSink {
        &self.shared.console
    }

    /// Creates the next vCPU (ids are assigned in order from 0).
    pub fn create_vcpu(&self) -> Result<Arc<Vcpu>> {
        let mut vcpus = relock(&self.vcpus);
        let id = vcpus.len() as u32;
        let host_limit = kvm()?.get_max_vcpus().min(MAX_VCPUS as usize) as u32;
        if id >= host_limit {
            return Err(VmError::VcpuLimit(host_limit).into());
        }
        let fd = self
            .fd
            .create_vcpu(id as u64)
            .map_err(kvm_op("KVM_CREATE_VCPU"))?;
        let vcpu = Arc::new(Vcpu::new(id, fd, self.shared.clone()));
        let policy = relock(&self.cpuid_policy).clone();
        vcpu.set_cpuid(&cpuid::to_kvm(&cpuid::vcpu_cpuid(
            &supported_cpuid()?,
            &policy,
            id,
        ))?)?;
        relock(&self.shared.controls).push((id, vcpu.control()));
        vcpus.push(vcpu.clone());
        Ok(vcpu)
    }

    /// How many vCPUs the VM has.
    pub fn vcpu_count(&self) -> usize {
        relock(&self.vcpus).len()
    }

    /// The VM's vCPUs, in id order.
    pub(crate) fn vcpu_list(&self) -> Vec<Arc<Vcpu>> {
        relock(&self.vcpus).clone()
    }

    /// Runs every vCPU until the VM stops or `timeout` passes. The result is the
    /// first stop that ended the VM, else vCPU 0's.
    /// A run while another is in progress (or while one of the vCPUs runs
    /// alone) is [`VmError::AlreadyRunning`] and leaves that run as it is: its
    /// stop reason is not cleared.
    pub fn run(&self, timeout: Option<Duration>) -> Result<RunResult> {
        let vcpus = self.vcpu_list();
        if vcpus.is_empty() {
            return Err(VmError::NoVcpus.into());
        }
        if self
            .running
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return Err(VmError::AlreadyRunning.into());
        }
        /// Clears `running` however the run ends.
        struct Running<'a>(&'a AtomicBool);
        impl Drop for Running<'_> {
            fn drop(&mut self) {
                self.0.store(false, Ordering::Release);
            }
        }
        let _running = Running(&self.running);
        if !vcpus.iter().all(|v| v.is_idle()) {
            return Err(VmError::AlreadyRunning.into());
        }
        *relock(&self.shared.vm_stop) = None;
        self.shared.hypercalls.clear_report();
        // Once run, a restored VM is no longer its snapshot.
        {
            let mut base = relock(&self.diff_base);
            if matches!(*base, DiffBase::Restored(_)) {
                *base = DiffBase::None;
            }
        }
        // A run starts unpaused: devices a pause left gated (the VM was
        // stopped while paused) serve again.
        for (_, device) in self.virtio_list() {
            relock(&device).resume();
        }
        for (i, vcpu) in vcpus.iter().enumerate() {
            if let Err(e) = vcpu.start() {
                // Leave no half-started VM behind.
                for started in &vcpus[..i] {
                    started.control().request_stop(StopRequest::Stop);
                }
                let _ = wait_all(&vcpus[..i], None);
                return Err(e.into());
            }
        }
        let results = wait_all(&vcpus, timeout)?;
        // The run's output reaches a streamed fd before the run returns, as long
        // as the fd keeps taking it (a stalled fd costs at most STREAM_STALL).
        self.shared.console.drain_stream(STREAM_STALL);
        let ended = relock(&self.shared.vm_stop).take();
        Ok(ended.unwrap_or_else(|| results[0].clone()))
    }

    /// Replaces the CPUID policy and applies it to every vCPU (vCPUs created
    /// later get it too). KVM refuses a CPUID change after a vCPU has run.
    pub fn set_cpuid_policy(&self, policy: CpuidPolicy) -> Result<()> {
        let supported = supported_cpuid()?;
        for vcpu in self.vcpu_list() {
            vcpu.set_cpuid(&cpuid::to_kvm(&cpuid::vcpu_cpuid(
                &supported, &policy, vcpu.id,
            ))?)?;
        }
        *relock(&self.cpuid_policy) = policy;
        Ok(())
    }

    /// Installs an MSR filter; denied accesses exit to the VMM, which refuses
    /// them (#GP in the guest) and counts them.
    pub fn set_msr_filter(&self, mut filter: MsrFilter) -> Result<()> {
        let cap = kvm_enable_cap {
            cap: KVM_CAP_X86_USER_SPACE_MSR,
            args: [KVM_MSR_EXIT_REASON_FILTER as u64, 0, 0, 0],
            ..Default::default()
        };
        self.fd
            .enable_cap(&cap)
            .map_err(kvm_op("KVM_ENABLE_CAP(X86_USER_SPACE_MSR)"))?;
        let raw = filter.to_kvm();
        // SAFETY: KVM_X86_SET_MSR_FILTER reads a kvm_msr_filter whose ranges point
        // at bitmaps owned by `filter`, alive and unmoved for the whole call; the
        // ioctl number matches the struct passed.
        let ret = unsafe { ioctl_with_ref(&self.fd, KVM_X86_SET_MSR_FILTER(), &raw) };
        if ret < 0 {
            return Err(kvm_op("KVM_X86_SET_MSR_FILTER")(kvm_ioctls::Error::last()).into());
        }
        Ok(())
    }

    /// Takes every running vCPU out of KVM_RUN and parks it, without ending the
    /// run, then quiesces every virtio device (it finishes the requests it
    /// popped and pops no other; see [`VirtioPci::pause`]); returns once all
    /// are still (registers, guest memory and queues then stay as they are).
    /// If one does not stop in time, everything is resumed and the error
    /// names it.
    pub fn pause(&self) -> Result<()> {
        const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);
        const QUIESCE_TIMEOUT: Duration = Duration::from_secs(5);
        let vcpus = self.vcpu_list();
        for vcpu in &vcpus {
            vcpu.control().request_pause();
        }
        for vcpu in &vcpus {
            if !vcpu.control().wait_parked(PAUSE_TIMEOUT) {
                return Err(VmError::PauseTimeout {
                    id: vcpu.id,
                    ms: PAUSE_TIMEOUT.as_millis(),
                }
                .into());
            }
        }
        // The vCPUs are parked first, so no driver posts a request meanwhile:
        // each worker's pass ends with the rings it sees.
        for (name, device) in self.virtio_list() {
            if let Err(source) = relock(&device).pause(QUIESCE_TIMEOUT) {
                self.resume();
                return Err(VmError::DeviceQuiesce {
                    name,
                    ms: QUIESCE_TIMEOUT.as_millis(),
                    source,
                }
                .into());
            }
        }
        Ok(())
    }

    /// Lets paused devices go on (each running queue kicked once) and paused
    /// vCPUs continue their runs.
    pub fn resume(&self) {
        for (_, device) in self.virtio_list() {
            relock(&device).resume();
        }
        for vcpu in self.vcpu_list() {
            vcpu.control().resume();
        }
    }

    /// Gives up every device's exclusive host resources for another process
    /// (a live migration's other side): each disk makes what it wrote durable
    /// and releases its image's lock. The VM must be paused (a running device
    /// is refused) or not yet run; devices added afterwards are built without
    /// them. [`Vm::take_over_devices`] claims them again. On an error some
    /// devices may have handed over already: take over to undo.
    pub fn hand_over_devices(&self) -> Result<()> {
        self.handed_over.store(true, Ordering::Release);
        for (name, device) in self.virtio_list() {
            relock(&device)
                .hand_over()
                .map_err(|source| VmError::HandOver { name, source })?;
        }
        Ok(())
    }

    /// Claims every device's exclusive host resources (after
    /// [`Vm::hand_over_devices`], or on a migration target built without
    /// them); refused, naming the device, while another process holds one.
    pub fn take_over_devices(&self) -> Result<()> {
        for (name, device) in self.virtio_list() {
            relock(&device)
                .take_over()
                .map_err(|source| VmError::HandOver { name, source })?;
        }
        self.handed_over.store(false, Ordering::Release);
        Ok(())
    }

    /// The virtio transports, by name (a copy: the list's lock is not held
    /// while one is used).
    fn virtio_list(&self) -> Vec<(String, Arc<Mutex<VirtioPci>>)> {
        relock(&self.virtio).clone()
    }

    /// Re-registers every RAM slot with `flags` (KVM_MEM_LOG_DIRTY_PAGES or 0).
    fn set_slot_flags(&self, flags: u32) -> std::result::Result<(), DirtyError> {
        for (slot, region) in self.shared.ram.mmap().iter().enumerate() {
            let memory_region = kvm_userspace_memory_region {
                slot: slot as u32,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
                flags,
            };
            // SAFETY: the same slot, host range and guest range `Vm::new`
            // registered (a live mapping owned by `ram`, outliving every KVM
            // use of it, see there); only the logging flag changes.
            unsafe { self.fd.set_user_memory_region(memory_region) }.map_err(|source| {
                DirtyError::Kvm {
                    op: "KVM_SET_USER_MEMORY_REGION",
                    slot: slot as u32,
                    source,
                }
            })?;
        }
        Ok(())
    }

    /// Starts dirty-page tracking: KVM logs the guest's writes to every RAM
    /// slot (`KVM_MEM_LOG_DIRTY_PAGES`) and guest RAM records the VMM's own
    /// (devices, balloon, hypercalls; see [`crate::dirty`]). Starting it
    /// again starts a new set.
    pub fn start_dirty_log(&self) -> Result<()> {
        let dirty = self.shared.ram.dirty_pages();
        // A VM restored and not run yet is still exactly the snapshot it was
        // restored from: the new set starts there. Otherwise no snapshot
        // marks where the new set starts.
        {
            let mut base = relock(&self.diff_base);
            *base = match std::mem::take(&mut *base) {
                DiffBase::Restored(id) => DiffBase::Tracking(id),
                _ => DiffBase::None,
            };
        }
        dirty.set_tracking(true);
        if let Err(e) = self.set_slot_flags(kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES) {
            dirty.set_tracking(false);
            let _ = self.set_slot_flags(0);
            return Err(VmError::from(e).into());
        }
        // Registering afresh may keep an old log: clear it (fetch and drop).
        self.take_dirty_log()?;
        Ok(())
    }

    /// Stops dirty-page tracking (pages dirtied since the last take are
    /// dropped).
    pub fn stop_dirty_log(&self) -> Result<()> {
        *relock(&self.diff_base) = DiffBase::None;
        self.shared.ram.dirty_pages().set_tracking(false);
        self.set_slot_flags(0).map_err(VmError::from)?;
        Ok(())
    }

    /// Writes the contents of the pages in `pages` (from
    /// [`Vm::take_dirty_pages`]) to `out`, in RAM order; returns how many.
    pub fn read_pages(&self, pages: &DirtyBitmap, out: &mut dyn std::io::Write) -> Result<u64> {
        crate::snapshot::pages::read_pages(&self.shared.ram, pages, out)
    }

    /// Reads the contents of the pages in `pages` from `input` into RAM
    /// (what [`Vm::read_pages`] wrote); returns how many.
    pub fn write_pages(&self, pages: &DirtyBitmap, input: &mut dyn std::io::Read) -> Result<u64> {
        crate::snapshot::pages::write_pages(&self.shared.ram, pages, input)
    }

    /// Whether dirty-page tracking is on.
    pub fn is_dirty_logging(&self) -> bool {
        self.shared.ram.dirty_pages().is_tracking()
    }

    /// The pages written since tracking started or since the last take, by
    /// the guest (`KVM_GET_DIRTY_LOG`, which clears KVM's log) or by the VMM,
    /// and clears both: one bit per 4 KiB page in RAM order. An error if
    /// tracking is off.
    /// A take outside a snapshot: the set no longer runs from the last
    /// snapshot, so no diff can be taken against it.
    pub fn take_dirty_pages(&self) -> Result<DirtyBitmap> {
        let pages = self.take_dirty_log()?;
        *relock(&self.diff_base) = DiffBase::None;
        Ok(pages)
    }

    /// What a diff snapshot would be taken against now.
    pub fn diff_base(&self) -> DiffBase {
        relock(&self.diff_base).clone()
    }

    /// Records what the next diff snapshot is taken against (a snapshot
    /// just written while tracking, or the one this VM was restored from).
    pub fn set_diff_base(&self, base: DiffBase) {
        *relock(&self.diff_base) = base;
    }

    /// [`Vm::take_dirty_pages`] without touching the diff base (for the
    /// snapshot writer, which sets it itself).
    pub fn take_dirty_log(&self) -> Result<DirtyBitmap> {
        let ram = &self.shared.ram;
        if !ram.dirty_pages().is_tracking() {
            return Err(VmError::from(DirtyError::NotTracking).into());
        }
        // KVM's logs first: a page a device writes after its log was read is
        // in the VMM's record (marked after the write) or in the next take.
        let mut bitmap = DirtyBitmap::new(&crate::memory::ram_ranges(ram.size()));
        let mut first = 0u64;
        for (slot, region) in ram.mmap().iter().enumerate() {
            let len = region.len();
            let log = self
                .fd
                .get_dirty_log(slot as u32, len as usize)
                .map_err(|source| {
                    VmError::from(DirtyError::Kvm {
                        op: "KVM_GET_DIRTY_LOG",
                        slot: slot as u32,
                        source,
                    })
                })?;
            let pages = len / crate::dirty::PAGE_SIZE;
            bitmap.add_range_log(first, pages, &log);
            first += pages;
        }
        bitmap
            .union(&ram.dirty_pages().take())
            .map_err(VmError::from)?;
        Ok(bitmap)
    }

    /// Asks every vCPU to stop; returns at once (a pending run reports `stopped`).
    pub fn stop(&self) {
        for vcpu in self.vcpu_list() {
            vcpu.control().request_stop(StopRequest::Stop);
        }
    }

    /// The guest's last REPORT hypercall of the current or last run.
    pub fn report(&self) -> Option<Vec<u8>> {
        self.shared.hypercalls.report()
    }

    /// Per-vCPU exit metrics.
    pub fn metrics(&self) -> Vec<VcpuMetricsSnapshot> {
        self.vcpu_list().iter().map(|v| v.metrics()).collect()
    }

    /// Attaches a virtio device on PCI bus 0 (needs the irqchip: interrupts
    /// are MSI-X). Returns its name (`config`'s, or the kind and a number).
    /// Devices may be added before or between runs; the guest finds them when
    /// it scans the bus.
    pub fn add_device(&self, config: &DeviceConfig) -> Result<String> {
        let attach = |m: String| Error::from(VirtioError::Attach(m));
        if !self.irq.irqchip() {
            return Err(attach(format!(
                "a {} device needs the in-kernel irqchip (create the VM with interrupts)",
                config.kind()
            )));
        }
        let mut list = relock(&self.virtio);
        let name = match config.name() {
            Some(n) => n.to_string(),
            None => {
                let same = list
                    .iter()
                    .filter(|(n, _)| n.starts_with(config.kind()))
                    .count();
                format!("{}{same}", config.kind())
            }
        };
        if name.is_empty() || name.len() > 64 || list.iter().any(|(n, _)| *n == name) {
            return Err(VmError::DeviceName(name).into());
        }
        let device = config.build_claiming(!self.handed_over.load(Ordering::Acquire))?;
        let routes = self
            .routes
            .get_or_init(|| Arc::new(GsiRoutes::new(self.fd.clone())))
            .clone();
        let vectors = device.queue_sizes().len() as u16 + 1;
        let sink = KvmMsiSink::new(&self.fd, routes, vectors).map_err(|e| attach(e.to_string()))?;
        let mut pci = relock(&self.shared.pci);
        let bar = pci
            .allocate_bar(BAR_SIZE)
            .map_err(|e| attach(e.to_string()))?;
        let transport = Arc::new(Mutex::new(VirtioPci::new(
            device,
            self.shared.ram.clone(),
            Some(self.fd.clone()),
            Arc::new(sink),
            bar,
        )?));
        pci.add(&name, transport.clone())
            .map_err(|e| attach(e.to_string()))?;
        list.push((name.clone(), transport));
        Ok(name)
    }

    /// The VM's devices: PCI functions and what each bus range handled.
    pub fn devices(&self) -> serde_json::Value {
        let (pio, pio_unclaimed) = self.shared.pio.accesses();
        let (mmio, mmio_unclaimed) = self.shared.mmio.accesses();
        serde_json::json!({
            "pci": relock(&self.shared.pci).list(),
            "buses": {
                "pio": { "devices": pio, "unclaimed": { "reads": pio_unclaimed.0, "writes": pio_unclaimed.1 } },
                "mmio": { "devices": mmio, "unclaimed": { "reads": mmio_unclaimed.0, "writes": mmio_unclaimed.1 } },
            },
        })
    }

    /// Every device's state as JSON (see [`DeviceStates`]): the one entry
    /// point snapshots read device state from.
    pub fn device_states(&self) -> serde_json::Value {
        crate::state::to_json(&self.shared.device_states())
    }

    /// Restores every device from `states` (see [`DeviceStates`]), attaching
    /// the ACPI PM device first when the states have it and the VM not yet.
    pub fn restore_device_states(&self, states: &DeviceStates) -> Result<()> {
        if states.acpi_pm.is_some() {
            self.attach_acpi_pm()?;
        }
        self.shared.restore_device_states(states)
    }

    /// Passes a runtime request (`{"op": ...}`) to the virtio device `name`.
    pub fn device_control(
        &self,
        name: &str,
        request: &serde_json::Value,
    ) -> Result<serde_json::Value> {
        let device = relock(&self.virtio)
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, d)| d.clone())
            .ok_or_else(|| VmError::NoSuchDevice(name.to_string()))?;
        let answer = relock(&device).control(request)?;
        Ok(answer)
    }

    /// Stops and joins every vCPU thread. The VM's memory and fds are released when
    /// the last reference to it goes.
    pub fn close(&self) {
        for vcpu in self.vcpu_list() {
            vcpu.close();
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.close();
    }
}

#[cfg(test)]
mod tests {
    //! These run real guests on /dev/kvm; they skip (pass vacuously, with a note)
    //! only where /dev/kvm cannot be opened, and `tests/` fails CI in that case.
    use super::*;
    use crate::boot::layout::DEFAULT_LONG_LOAD_ADDR;
    use crate::boot::EntryMode;
    use crate::vcpu::exit::StopReason;

    /// `mov al,'A'; mov dx,0x3f8; out dx,al; mov al,5; out 0xf4,al` in 16- or 64-bit form.
    fn hello(bits64: bool) -> Vec<u8> {
        let mut code = vec![0xb0, b'A'];
        if bits64 {
            code.push(0x66);
        }
        code.extend_from_slice(&[0xba, 0xf8, 0x03, 0xee, 0xb0, 0x05, 0xe6, 0xf4]);
        code
    }

    fn run_guest(
        mode: EntryMode,
        code: &[u8],
        timeout: Option<Duration>,
    ) -> Option<(Vm, RunResult)> {
        if let Err(e) = check_kvm() {
            panic!("{e}: this test needs KVM (run it where /dev/kvm works, or in kvmbox)");
        }
        let vm = Vm::new(2 << 20, UnhandledAccess::Stop).unwrap();
        let vcpu = vm.create_vcpu().unwrap();
        let addr = if mode == EntryMode::Real {
            0x7c00
        } else {
            DEFAULT_LONG_LOAD_ADDR
        };
        vm.ram().write(addr, code).unwrap();
        vcpu.setup_entry(mode, addr, 0x1f_f000).unwrap();
        let result = vm.run(timeout).unwrap();
        Some((vm, result))
    }

    #[test]
    #[ignore = "needs /dev/kvm: the test command runs it with --ignored where KVM works"]
    fn guests_print_and_exit_in_every_mode() {
        for mode in [EntryMode::Real, EntryMode::Long, EntryMode::User] {
            let Some((vm, result)) = run_guest(mode, &hello(mode != EntryMode::Real), None) else {
                return;
            };
            assert_eq!(
                result.stop,
                StopReason::DebugExit { exit_code: 11 },
                "{mode:?}"
            );
            let out = vm.console().0.lock().unwrap().take();
            assert_eq!(out, b"A", "{mode:?}");
        }
    }

    #[test]
    #[ignore = "needs /dev/kvm: the test command runs it with --ignored where KVM works"]
    fn an_infinite_loop_times_out() {
        let Some((_, result)) = run_guest(
            EntryMode::User,
            &[0xeb, 0xfe],
            Some(Duration::from_millis(100)),
        ) else {
            return;
        };
        assert_eq!(result.stop, StopReason::TimedOut);
    }

    #[test]
    #[ignore = "needs /dev/kvm: the test command runs it with --ignored where KVM works"]
    fn a_triple_fault_is_a_crash_with_registers() {
        // ud2 with no IDT: #UD -> #DF -> triple fault.
        let Some((_, result)) = run_guest(EntryMode::Long, &[0x0f, 0x0b], None) else {
            return;
        };
        match result.stop {
            // Intel keeps the faulting state; AMD's SHUTDOWN intercept resets the
            // vCPU first, which the report must say instead of a stale RIP.
            StopReason::Shutdown { registers } if registers.reset_state => {
                assert_eq!((registers.rip, registers.cs), (0xfff0, 0xf000))
            }
            StopReason::Shutdown { registers } => assert_eq!(registers.rip, DEFAULT_LONG_LOAD_ADDR),
            other => panic!("expected a shutdown, got {other:?}"),
        }
    }

    #[test]
    #[ignore = "needs /dev/kvm: the test command runs it with --ignored where KVM works"]
    fn the_dirty_log_has_the_pages_the_guest_wrote_and_a_take_clears_it() {
        if let Err(e) = check_kvm() {
            panic!("{e}: this test needs KVM (run it where /dev/kvm works, or in kvmbox)");
        }
        let written = [0x3_0000u64, 0x4_5000, 0x1f_0000];
        let mut code = Vec::new();
        for addr in written {
            // mov byte [addr], 1
            code.extend_from_slice(&[0xc6, 0x04, 0x25]);
            code.extend_from_slice(&(addr as u32).to_le_bytes());
            code.push(1);
        }
        code.extend_from_slice(&[0xb0, 0x05, 0xe6, 0xf4]); // mov al,5; out 0xf4,al
        let vm = Vm::new(2 << 20, UnhandledAccess::Stop).unwrap();
        let vcpu = vm.create_vcpu().unwrap();
        vm.ram().write(DEFAULT_LONG_LOAD_ADDR, &code).unwrap();
        vcpu.setup_entry(EntryMode::Long, DEFAULT_LONG_LOAD_ADDR, 0x1f_f000)
            .unwrap();
        assert!(matches!(
            vm.take_dirty_pages(),
            Err(Error::Vm(VmError::Dirty(DirtyError::NotTracking)))
        ));
        vm.start_dirty_log().unwrap();
        let result = vm.run(Some(Duration::from_secs(30))).unwrap();
        assert_eq!(result.stop, StopReason::DebugExit { exit_code: 11 });
        let dirty = vm.take_dirty_pages().unwrap();
        for addr in written {
            assert!(
                dirty.is_set(dirty.index_of(addr).unwrap()),
                "{addr:#x} is not dirty"
            );
        }
        // The rest are the page tables the CPU set accessed/dirty bits in.
        assert!(
            dirty.count() <= written.len() as u64 + 8,
            "too many extras: {:x?}",
            dirty.addresses().collect::<Vec<_>>()
        );
        assert!(vm.take_dirty_pages().unwrap().is_empty(), "a take clears");
        // The VMM's own writes are in the set too.
        vm.ram().write(0x7_0000, b"host").unwrap();
        let dirty = vm.take_dirty_pages().unwrap();
        assert_eq!(dirty.addresses().collect::<Vec<_>>(), vec![0x7_0000]);
        vm.stop_dirty_log().unwrap();
        assert!(vm.take_dirty_pages().is_err(), "stopped: nothing to take");
    }
}
