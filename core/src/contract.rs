//! The TypeScript ↔ Rust contract, described as data by the core itself.
//!
//! Everything the TypeScript side must agree on with this crate — the ABI
//! version, every [`Status`], the flags and constants it passes or mirrors, the
//! byte layout of every `#[repr(C)]` struct that crosses the ABI, and the JSON
//! shapes the core returns — is listed here once, from the real items (the
//! constants themselves, `offset_of!`, serde), never retyped.
//!
//! The unit test `contract::tests::generated_files_are_fresh` renders this
//! description as `src/_contract.generated.ts` and writes one JSON example of
//! every shape to `tests/fixtures/contract/`; it fails when a checked-in copy is
//! stale. `deno task contract` rewrites them (it runs that test with
//! `DENOVISOR_WRITE_CONTRACT=1`). The TypeScript modules import their constants
//! and offsets from the generated module, and `tests/contract_test.ts` runs the
//! TypeScript parsers over the fixtures, on any host (no `/dev/kvm`).

use kvm_bindings::{kvm_dtable, kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use serde_json::{json, Map, Value};

use crate::abi::{
    ABI_VERSION, LOAD_FLAG_RESERVE_LOW, STATE_FPU, STATE_REGS, STATE_SREGS, VM_FLAG_DEDUP,
    VM_FLAG_IRQCHIP, VM_FLAG_STOP_ON_UNHANDLED,
};
use crate::boot::{layout, linux, zero_page};
use crate::error::Status;
use crate::snapshot::file::{RESTORE_EAGER, RESTORE_LAZY};

/// The TypeScript error code of a status: its name in SCREAMING_SNAKE_CASE
/// (`InvalidArgument` → `INVALID_ARGUMENT`).
pub fn status_code(status: Status) -> String {
    let mut code = String::new();
    for (i, c) in status.name().chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            code.push('_');
        }
        code.push(c.to_ascii_uppercase());
    }
    code
}

/// Every status: its Rust name, TypeScript code, value and summary.
pub fn statuses() -> Vec<Value> {
    Status::ALL
        .iter()
        .map(|&s| {
            json!({
                "name": s.name(),
                "code": status_code(s),
                "value": s as i32,
                "summary": s.summary(),
            })
        })
        .collect()
}

/// The flags and constants the TypeScript side passes to the core or mirrors.
pub fn constants() -> Value {
    let mut out = json!({
        // dv_vm_create flags.
        "VM_FLAG_STOP_ON_UNHANDLED": VM_FLAG_STOP_ON_UNHANDLED,
        "VM_FLAG_IRQCHIP": VM_FLAG_IRQCHIP,
        "VM_FLAG_DEDUP": VM_FLAG_DEDUP,
        // dv_vm_create_from_snapshot modes.
        "RESTORE_LAZY": RESTORE_LAZY,
        "RESTORE_EAGER": RESTORE_EAGER,
        // dv_vm_load_elf / dv_vm_load_flat flags.
        "LOAD_FLAG_RESERVE_LOW": LOAD_FLAG_RESERVE_LOW,
        // dv_vcpu_get_state / dv_vcpu_set_state kinds.
        "STATE_REGS": STATE_REGS,
        "STATE_SREGS": STATE_SREGS,
        "STATE_FPU": STATE_FPU,
        // dv_vcpu_setup_entry modes (`EntryMode::from_abi`).
        "ENTRY_MODE_REAL": 0,
        "ENTRY_MODE_LONG": 1,
        "ENTRY_MODE_USER": 2,
        // Guest-physical layout.
        "RESERVED_LOW_END": layout::RESERVED_END,
        "DEFAULT_REAL_LOAD_ADDR": layout::DEFAULT_REAL_LOAD_ADDR,
        "DEFAULT_LONG_LOAD_ADDR": layout::DEFAULT_LONG_LOAD_ADDR,
        "MMIO_GAP_START": crate::memory::MMIO_GAP_START,
        "MAX_VCPUS": crate::vm::MAX_VCPUS,
        // The Linux boot protocol.
        "E820_RAM": zero_page::E820_RAM,
        "E820_RESERVED": zero_page::E820_RESERVED,
        "BOOT_CS": linux::BOOT_CS,
        "BOOT_DS": linux::BOOT_DS,
        // Interrupts.
        "IRQ_LINES": crate::irq::IOAPIC_PINS,
        "SERIAL_IRQ_LINE": crate::irq::SERIAL_GSI,
        // Metrics.
        "LATENCY_BUCKETS": crate::metrics::LATENCY_BUCKETS,
    });
    // The function ABI (guest/fn/abi.h has the same, as DV_FN_*).
    if let Value::Object(map) = &mut out {
        for (name, value, _) in crate::function::abi::constants() {
            map.insert(format!("FN_{name}"), json!(value));
        }
        // dv_fn_invoke's statuses and its result's sizes.
        use crate::function::invoke::{self, status};
        for (name, value) in [
            ("DONE", status::DONE),
            ("TIMEOUT", status::TIMEOUT),
            ("CRASHED", status::CRASHED),
            ("STOPPED", status::STOPPED),
            ("PROTOCOL_ERROR", status::PROTOCOL_ERROR),
            ("INPUT_TOO_LARGE", status::INPUT_TOO_LARGE),
        ] {
            map.insert(format!("FN_INVOKE_{name}"), json!(value));
        }
        map.insert("FN_INVOKE_NO_OUTCOME".into(), json!(invoke::NO_OUTCOME));
        map.insert("FN_INVOKE_REASON_MAX".into(), json!(invoke::REASON_MAX));
        map.insert(
            "FN_INVOKE_ENOSYS_ENTRIES".into(),
            json!(invoke::ENOSYS_ENTRIES),
        );
    }
    out
}

/// The size in bytes of the field a projection reaches.
fn size_of_field<T, F>(_: fn(&T) -> &F) -> usize {
    std::mem::size_of::<F>()
}

/// One struct's layout: `{ size, fields: { name: { offset, size } } }`, fields
/// in declaration order (`type_` is spelled `type`, as in C).
macro_rules! layout {
    ($t:ty { $($field:ident),+ $(,)? }) => {{
        let mut fields = Map::new();
        $(
            let name = stringify!($field).trim_end_matches('_');
            fields.insert(
                name.to_string(),
                json!({
                    "offset": std::mem::offset_of!($t, $field),
                    "size": size_of_field(|s: &$t| &s.$field),
                }),
            );
        )+
        json!({ "size": std::mem::size_of::<$t>(), "fields": fields })
    }};
}

/// Every `#[repr(C)]` struct that crosses the ABI (KVM's register sets, copied
/// as raw bytes by `dv_vcpu_get_state` / `dv_vcpu_set_state`).
pub fn layouts() -> Value {
    json!({
        "kvm_regs": layout!(kvm_regs {
            rax, rbx, rcx, rdx, rsi, rdi, rsp, rbp, r8, r9, r10, r11, r12, r13, r14, r15,
            rip, rflags,
        }),
        "kvm_segment": layout!(kvm_segment {
            base, limit, selector, type_, present, dpl, db, s, l, g, avl, unusable, padding,
        }),
        "kvm_dtable": layout!(kvm_dtable { base, limit, padding }),
        "kvm_sregs": layout!(kvm_sregs {
            cs, ds, es, fs, gs, ss, tr, ldt, gdt, idt, cr0, cr2, cr3, cr4, cr8, efer,
            apic_base, interrupt_bitmap,
        }),
        "kvm_fpu": layout!(kvm_fpu {
            fpr, fcw, fsw, ftwx, pad1, last_opcode, last_ip, last_dp, xmm, mxcsr, pad2,
        }),
        "fn_invoke_result": layout!(crate::function::invoke::InvokeResult {
            status, outcome, exit_status, stdout_len, stderr_len, run_ns, reset_ns,
            reset_pages, exits, syscalls, memory_used, enosys_count, reason_len, enosys,
            reason,
        }),
    })
}

/// The whole description (what `contract.json` holds, minus the examples).
pub fn describe() -> Value {
    json!({
        "abiVersion": ABI_VERSION,
        "statuses": statuses(),
        "constants": constants(),
        "layouts": layouts(),
    })
}

/// Renders a JSON value as a TypeScript literal the way `deno fmt` leaves it:
/// objects and arrays one entry per line with trailing commas, unless every
/// entry is a scalar and the literal fits on its line.
pub fn ts_literal(value: &Value, indent: usize) -> String {
    fn key(k: &str) -> String {
        let ident = k
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if ident {
            k.to_string()
        } else {
            Value::from(k).to_string()
        }
    }
    let scalar = |v: &Value| !v.is_object() && !v.is_array();
    let pad = " ".repeat(indent + 2);
    match value {
        Value::Object(map) if map.is_empty() => "{}".into(),
        Value::Array(items) if items.is_empty() => "[]".into(),
        Value::Object(map) => {
            let entries: Vec<String> = map
                .iter()
                .map(|(k, v)| format!("{}: {}", key(k), ts_literal(v, indent + 2)))
                .collect();
            let line = format!("{{ {} }}", entries.join(", "));
            if map.values().all(scalar) && indent + line.len() <= 80 {
                return line;
            }
            let body: String = entries.iter().map(|e| format!("{pad}{e},\n")).collect();
            format!("{{\n{body}{}}}", " ".repeat(indent))
        }
        Value::Array(items) => {
            let entries: Vec<String> = items.iter().map(|v| ts_literal(v, indent + 2)).collect();
            let line = format!("[{}]", entries.join(", "));
            if items.iter().all(scalar) && indent + line.len() <= 80 {
                return line;
            }
            let body: String = entries.iter().map(|e| format!("{pad}{e},\n")).collect();
            format!("[\n{body}{}]", " ".repeat(indent))
        }
        scalar => scalar.to_string(),
    }
}

/// The generated TypeScript module: the description plus the names of the
/// stop reasons (`reasons`) and fixtures (`fixtures`) the examples hold.
pub fn typescript_module(reasons: &[String], fixtures: &[String]) -> String {
    let mut out = String::from(
        "// Generated from core/src/contract.rs by `deno task contract`: do not edit.\n\
         /**\n \
         * The TypeScript ↔ Rust contract as the core describes it: the ABI version,\n \
         * every status, the flags and constants, the byte layouts of the structs that\n \
         * cross the ABI, the stop reasons and the JSON fixtures in\n \
         * `tests/fixtures/contract/`. A test fails when this file is stale.\n \
         *\n \
         * @module\n \
         */\n",
    );
    let mut export = |name: &str, doc: &str, value: String, suffix: &str| {
        out.push_str(&format!(
            "\n/**\n * {doc}\n *\n * @example\n * ```ts\n \
             * import {{ {name} }} from \"denovisor/src/_contract.generated.ts\";\n \
             * console.log({name});\n * ```\n */\nexport const {name} = {value}{suffix};\n"
        ));
    };
    let description = describe();
    export(
        "ABI_VERSION",
        "The C ABI version (`ABI_VERSION` in `core/src/abi/mod.rs`).",
        description["abiVersion"].to_string(),
        "",
    );
    export(
        "STATUSES",
        "Every status a `dv_*` call returns (`Status` in `core/src/error.rs`).",
        ts_literal(&description["statuses"], 0),
        " as const",
    );
    export(
        "CONSTANTS",
        "The flags and constants shared with the core.",
        ts_literal(&description["constants"], 0),
        " as const",
    );
    export(
        "LAYOUTS",
        "Sizes and field offsets (bytes) of the `#[repr(C)]` structs that cross the ABI.",
        ts_literal(&description["layouts"], 0),
        " as const",
    );
    let list = |names: &[String]| ts_literal(&json!(names), 0);
    export(
        "STOP_REASONS",
        "Every `reason` of a run result (`StopReason` in `core/src/vcpu/exit.rs`).",
        list(reasons),
        " as const",
    );
    export(
        "FIXTURES",
        "The JSON examples in `tests/fixtures/contract/`, by file name without `.json`.",
        list(fixtures),
        " as const",
    );
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::{Path, PathBuf};

    use super::*;
    use crate::boot::{bzimage, elf, initrd};
    use crate::devices::console::{ConsoleStats, ConsoleTally};
    use crate::hypercall::{GuestFault, HypercallKind};
    use crate::irq::IrqState;
    use crate::metrics::{ExitKind, PortRange, VcpuMetrics};
    use crate::vcpu::exit::{CrashRegisters, Direction, StopReason};
    use crate::vcpu::RunResult;

    /// The `reason` tag of a stop. The match has no wildcard: a new
    /// `StopReason` variant is a compile error here until it has a tag, and
    /// then needs its example in [`stop_reasons`] (a test checks the two agree).
    fn tag(stop: &StopReason) -> &'static str {
        match stop {
            StopReason::DebugExit { .. } => "debug_exit",
            StopReason::GuestExit { .. } => "guest_exit",
            StopReason::Reset => "reset",
            StopReason::PowerOff => "power_off",
            StopReason::GuestFault(_) => "guest_fault",
            StopReason::BadHypercall { .. } => "bad_hypercall",
            StopReason::Hlt => "hlt",
            StopReason::Shutdown { .. } => "shutdown",
            StopReason::UnhandledIo { .. } => "unhandled_io",
            StopReason::UnhandledMmio { .. } => "unhandled_mmio",
            StopReason::InternalError { .. } => "internal_error",
            StopReason::FailEntry { .. } => "fail_entry",
            StopReason::SystemEvent { .. } => "system_event",
            StopReason::UnexpectedExit { .. } => "unexpected_exit",
            StopReason::Stopped => "stopped",
            StopReason::TimedOut => "timed_out",
            StopReason::Error { .. } => "error",
        }
    }

    /// One example of every stop reason, with values no two fields share.
    fn stop_reasons() -> Vec<StopReason> {
        vec![
            StopReason::DebugExit { exit_code: 7 },
            StopReason::GuestExit { status: 42 },
            StopReason::Reset,
            StopReason::PowerOff,
            StopReason::GuestFault(GuestFault {
                vector: 14,
                error_code: 6,
                address: 0xffff_8000_dead_b000,
                rip: 0x40_1234,
            }),
            StopReason::BadHypercall {
                message: "request block 0x12345 is outside guest RAM".into(),
            },
            StopReason::Hlt,
            StopReason::Shutdown {
                registers: CrashRegisters {
                    rip: 0xffff_ffff_8100_0010,
                    rsp: 0x8000,
                    rflags: 0x246,
                    rax: 1,
                    rbx: 2,
                    rcx: 3,
                    rdx: 4,
                    rsi: 5,
                    rdi: 6,
                    rbp: 7,
                    cr0: 0x8005_0033,
                    cr2: 0xdead_0000,
                    cr3: 0x1000,
                    cr4: 0x20,
                    efer: 0x500,
                    cs: 0x10,
                    ss: 0x18,
                    reset_state: false,
                },
            },
            StopReason::UnhandledIo {
                port: 0x2e8,
                size: 2,
                direction: Direction::Out,
                data: 0xbeef,
            },
            StopReason::UnhandledMmio {
                address: 0xfed0_0000,
                size: 4,
                direction: Direction::In,
                data: 0xffff_ffff,
            },
            StopReason::InternalError { suberror: 1 },
            StopReason::FailEntry {
                hardware_reason: 0x8000_0021,
            },
            StopReason::SystemEvent { event: 2 },
            StopReason::UnexpectedExit {
                exit: "Hyperv".into(),
            },
            StopReason::Stopped,
            StopReason::TimedOut,
            StopReason::Error {
                message: "KVM_RUN failed: Bad address (os error 14)".into(),
            },
        ]
    }

    fn to_value<T: serde::Serialize>(value: &T) -> Value {
        serde_json::to_value(value).expect("the contract's examples serialize")
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn raw_bytes<T: Copy>(value: &T) -> Vec<u8> {
        let mut out = vec![0u8; std::mem::size_of::<T>()];
        crate::abi::pod_to_bytes(value, &mut out);
        out
    }

    fn segment(i: u64) -> kvm_segment {
        kvm_segment {
            base: 0x1111_0000_0000_0000 * i + 0x100,
            limit: 0x1000_0000 + i as u32,
            selector: 0x08 * i as u16,
            type_: 0x0b,
            present: 1,
            dpl: i as u8 % 4,
            db: 1,
            s: 1,
            l: 0,
            g: 1,
            avl: 0,
            unusable: 0,
            padding: 0,
        }
    }

    fn segment_json(s: &kvm_segment) -> Value {
        json!({
            "base": format!("{:#x}", s.base), "limit": s.limit, "selector": s.selector,
            "type": s.type_, "present": s.present, "dpl": s.dpl, "db": s.db, "s": s.s,
            "l": s.l, "g": s.g, "avl": s.avl, "unusable": s.unusable,
        })
    }

    /// KVM's register sets filled with distinct values field by field (never
    /// through offsets), as raw bytes beside the values they hold.
    fn register_examples() -> Vec<(String, Value)> {
        let names = [
            "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10", "r11",
            "r12", "r13", "r14", "r15", "rip", "rflags",
        ];
        let v = |i: u64| 0x0101_0101_0101_0101 * (i + 1) + 0x8000_0000_0000_0000;
        let regs = kvm_regs {
            rax: v(0),
            rbx: v(1),
            rcx: v(2),
            rdx: v(3),
            rsi: v(4),
            rdi: v(5),
            rsp: v(6),
            rbp: v(7),
            r8: v(8),
            r9: v(9),
            r10: v(10),
            r11: v(11),
            r12: v(12),
            r13: v(13),
            r14: v(14),
            r15: v(15),
            rip: v(16),
            rflags: v(17),
        };
        let regs_values: Map<String, Value> = names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.to_string(), json!(format!("{:#x}", v(i as u64)))))
            .collect();

        let sregs = kvm_sregs {
            cs: segment(1),
            ds: segment(2),
            es: segment(3),
            fs: segment(4),
            gs: segment(5),
            ss: segment(6),
            tr: segment(7),
            ldt: segment(8),
            gdt: kvm_dtable {
                base: 0xffff_8000_0000_0500,
                limit: 0x37,
                padding: [0; 3],
            },
            idt: kvm_dtable {
                base: 0xffff_8000_0000_1000,
                limit: 0xfff,
                padding: [0; 3],
            },
            cr0: 0x8005_0033,
            cr2: 0xffff_ffff_dead_0000,
            cr3: 0x1000,
            cr4: 0x3006a0,
            cr8: 0xf,
            efer: 0xd01,
            apic_base: 0xfee0_0900,
            interrupt_bitmap: [1, 1 << 33, 1 << 63, 0x8000_0000_0000_0001],
        };
        let dtable = |d: &kvm_dtable| json!({ "base": format!("{:#x}", d.base), "limit": d.limit });
        let mut sregs_values = Map::new();
        for (name, s) in [
            ("cs", &sregs.cs),
            ("ds", &sregs.ds),
            ("es", &sregs.es),
            ("fs", &sregs.fs),
            ("gs", &sregs.gs),
            ("ss", &sregs.ss),
            ("tr", &sregs.tr),
            ("ldt", &sregs.ldt),
        ] {
            sregs_values.insert(name.into(), segment_json(s));
        }
        sregs_values.insert("gdt".into(), dtable(&sregs.gdt));
        sregs_values.insert("idt".into(), dtable(&sregs.idt));
        for (name, value) in [
            ("cr0", sregs.cr0),
            ("cr2", sregs.cr2),
            ("cr3", sregs.cr3),
            ("cr4", sregs.cr4),
            ("cr8", sregs.cr8),
            ("efer", sregs.efer),
            ("apic_base", sregs.apic_base),
        ] {
            sregs_values.insert(name.into(), json!(format!("{value:#x}")));
        }
        let bitmap: Vec<String> = sregs
            .interrupt_bitmap
            .iter()
            .map(|w| format!("{w:#x}"))
            .collect();
        sregs_values.insert("interrupt_bitmap".into(), json!(bitmap));

        let mut fpu = kvm_fpu {
            fcw: 0x037f,
            fsw: 0x3800,
            ftwx: 0xa5,
            last_opcode: 0x7ff,
            last_ip: 0xffff_8000_0012_3456,
            last_dp: 0x7fff_0000_0000_0042,
            mxcsr: 0x1fa0,
            ..Default::default()
        };
        for (i, r) in fpu.fpr.iter_mut().enumerate() {
            *r = std::array::from_fn(|j| (0x10 * i + j) as u8);
        }
        for (i, r) in fpu.xmm.iter_mut().enumerate() {
            *r = std::array::from_fn(|j| (0x80 + 0x10 * i + j) as u8);
        }
        let fpu_values = json!({
            "fpr": fpu.fpr.iter().map(|r| hex(r)).collect::<Vec<_>>(),
            "fcw": fpu.fcw, "fsw": fpu.fsw, "ftwx": fpu.ftwx, "last_opcode": fpu.last_opcode,
            "last_ip": format!("{:#x}", fpu.last_ip), "last_dp": format!("{:#x}", fpu.last_dp),
            "xmm": fpu.xmm.iter().map(|r| hex(r)).collect::<Vec<_>>(),
            "mxcsr": fpu.mxcsr,
        });

        vec![
            (
                "kvm_regs".into(),
                json!({ "bytes": hex(&raw_bytes(&regs)), "values": regs_values }),
            ),
            (
                "kvm_sregs".into(),
                json!({ "bytes": hex(&raw_bytes(&sregs)), "values": sregs_values }),
            ),
            (
                "kvm_fpu".into(),
                json!({ "bytes": hex(&raw_bytes(&fpu)), "values": fpu_values }),
            ),
        ]
    }

    /// Every JSON example, by fixture name. This is the one list: a shape the
    /// core starts to emit gets its example here.
    fn examples() -> Vec<(String, Value)> {
        let mut out: Vec<(String, Value)> = stop_reasons()
            .into_iter()
            .map(|stop| {
                let name = format!("exit_{}", tag(&stop));
                let result = RunResult {
                    vcpu: 1,
                    stop,
                    run_ns: 123_456_789,
                };
                (name, to_value(&result))
            })
            .collect();

        // A metrics snapshot with a different count in every counter it has.
        let m = VcpuMetrics::default();
        let kinds = [
            ExitKind::IoIn,
            ExitKind::IoOut,
            ExitKind::MmioRead,
            ExitKind::MmioWrite,
            ExitKind::Hlt,
            ExitKind::Shutdown,
            ExitKind::InternalError,
            ExitKind::Interrupted,
            ExitKind::MsrReadDenied,
            ExitKind::MsrWriteDenied,
            ExitKind::Other,
        ];
        for (i, kind) in kinds.into_iter().enumerate() {
            (0..=i).for_each(|_| m.count(kind));
        }
        let ranges = [
            PortRange::Serial,
            PortRange::DebugExit,
            PortRange::Hypercall,
            PortRange::Other,
        ];
        for (i, range) in ranges.into_iter().enumerate() {
            (0..i + 1).for_each(|_| m.count_port(false, range));
            (0..i + 5).for_each(|_| m.count_port(true, range));
        }
        let calls = [
            HypercallKind::Write,
            HypercallKind::Exit,
            HypercallKind::Clock,
            HypercallKind::Report,
            HypercallKind::Fault,
            HypercallKind::Nop,
            HypercallKind::Invalid,
            HypercallKind::IrqCounters,
        ];
        for (i, kind) in calls.into_iter().enumerate() {
            (0..i + 20).for_each(|_| m.count_hypercall(kind));
        }
        m.add_kvm_run_ns(5_000_000);
        m.record_handling(1500);
        m.record_handling(3);
        m.add_console(ConsoleTally {
            bytes: 300,
            capture_dropped: 30,
            stream_dropped: 3,
        });
        out.push(("metrics".into(), to_value(&vec![m.snapshot()])));

        let irq = IrqState::default();
        irq.set_irqchip();
        irq.count_pulse();
        (0..2).for_each(|_| irq.count_msi(true));
        (0..3).for_each(|_| irq.count_msi(false));
        out.push(("irq_stats".into(), to_value(&irq.snapshot(4))));

        let console = ConsoleStats {
            tally: ConsoleTally {
                bytes: 1000,
                capture_dropped: 100,
                stream_dropped: 10,
            },
            stream_pending: 1,
            rate_dropped: 0,
        };
        out.push(("console_stats".into(), to_value(&console)));

        let kernel = bzimage::tests::tiny_bzimage(&[0xf4; 0x400]);
        let cpio = initrd::tests::tiny_cpio();
        let (_, layout) = linux::check(&kernel, 64 << 20, &cpio, b"console=ttyS0")
            .expect("the tiny bzImage loads");
        out.push(("linux_layout".into(), to_value(&layout)));
        out.push(("inspect_bzimage".into(), to_value(&linux::inspect(&kernel))));
        let vmlinux = elf::tests::tiny_elf(0x100_0000, &[0xf4; 16]);
        out.push(("inspect_elf".into(), to_value(&linux::inspect(&vmlinux))));
        out.push(("inspect_unknown".into(), to_value(&linux::inspect(b"junk"))));

        out.extend(register_examples());
        out
    }

    fn repo_root() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
    }

    /// What the generator writes: path (from the repository root) → contents.
    fn generated_files() -> BTreeMap<PathBuf, String> {
        let examples = examples();
        let reasons: Vec<String> = stop_reasons().iter().map(|s| tag(s).to_string()).collect();
        let mut names: Vec<String> = examples.iter().map(|(n, _)| n.clone()).collect();
        names.push("contract".into());
        names.sort();
        let dir = Path::new("tests/fixtures/contract");
        let mut files = BTreeMap::new();
        let pretty =
            |v: &Value| serde_json::to_string_pretty(v).expect("JSON values serialize") + "\n";
        let mut contract = describe();
        contract["stopReasons"] = json!(reasons);
        contract["fixtures"] = json!(names);
        files.insert(dir.join("contract.json"), pretty(&contract));
        for (name, value) in &examples {
            files.insert(dir.join(format!("{name}.json")), pretty(value));
        }
        files.insert(
            PathBuf::from("guest/fn/abi.h"),
            crate::function::abi::c_header(),
        );
        files.insert(
            PathBuf::from("src/_contract.generated.ts"),
            typescript_module(&reasons, &names),
        );
        files
    }

    #[test]
    fn generated_files_are_fresh() {
        let root = repo_root();
        let files = generated_files();
        let write = std::env::var_os("DENOVISOR_WRITE_CONTRACT").is_some();
        let dir = root.join("tests/fixtures/contract");
        if write {
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
        }
        let mut stale = Vec::new();
        for (path, text) in &files {
            let full = root.join(path);
            if write {
                std::fs::write(&full, text).unwrap();
            } else if std::fs::read_to_string(&full).ok().as_deref() != Some(text.as_str()) {
                stale.push(path.display().to_string());
            }
        }
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = Path::new("tests/fixtures/contract").join(entry.file_name());
            if !files.contains_key(&path) {
                stale.push(format!("{} (not generated any more)", path.display()));
            }
        }
        assert!(
            stale.is_empty(),
            "the contract's generated files are stale: {stale:?}; run `deno task contract` and commit them"
        );
    }

    #[test]
    fn every_stop_reason_has_one_example_under_its_serialized_tag() {
        let mut seen = std::collections::BTreeSet::new();
        for stop in stop_reasons() {
            assert_eq!(to_value(&stop)["reason"], tag(&stop), "{stop:?}");
            assert!(seen.insert(tag(&stop)), "two examples of {}", tag(&stop));
        }
    }

    #[test]
    fn statuses_are_distinct_and_codes_are_screaming_snake() {
        let mut values = std::collections::BTreeSet::new();
        for &s in Status::ALL {
            assert!(values.insert(s as i32), "{s:?}");
            assert!(!s.summary().is_empty(), "{s:?}");
        }
        assert_eq!(status_code(Status::InvalidArgument), "INVALID_ARGUMENT");
        assert_eq!(status_code(Status::Ok), "OK");
        // Contiguous from 0 down: a new status takes the next free value.
        let n = Status::ALL.len() as i32;
        assert_eq!(values, (1 - n..=0).collect());
    }

    #[test]
    fn entry_mode_constants_are_what_the_abi_accepts() {
        use crate::boot::EntryMode;
        let c = constants();
        for (name, mode) in [
            ("ENTRY_MODE_REAL", EntryMode::Real),
            ("ENTRY_MODE_LONG", EntryMode::Long),
            ("ENTRY_MODE_USER", EntryMode::User),
        ] {
            let value = c[name].as_u64().unwrap() as u32;
            assert_eq!(EntryMode::from_abi(value).unwrap(), mode, "{name}");
        }
    }

    #[test]
    fn layouts_match_kvm_sizes() {
        let l = layouts();
        assert_eq!(l["kvm_regs"]["size"], 144);
        assert_eq!(l["kvm_sregs"]["size"], 312);
        assert_eq!(l["kvm_fpu"]["size"], 416);
        assert_eq!(l["kvm_sregs"]["fields"]["apic_base"]["offset"], 272);
        assert_eq!(l["kvm_segment"]["fields"]["type"]["offset"], 14);
    }

    #[test]
    fn typescript_literals_follow_deno_fmt() {
        let v = json!({ "a": 1, "b-c": [1, 2], "d": { "e": "x" } });
        assert_eq!(
            ts_literal(&v, 0),
            "{\n  a: 1,\n  \"b-c\": [1, 2],\n  d: { e: \"x\" },\n}"
        );
    }
}
