/**
 * `main.ts run --jail DIR [--uid N] [--gid N] [--cgroup KEY=VALUE]...`: the
 * same `run` command line, rewritten so the VM's files carry their jail paths,
 * run by Deno inside a jail (see `run_jailed.ts`).
 *
 * @module
 */

import { UsageError } from "../cli/usage_error.ts";
import { checkApiSocketOption } from "../cli/api_commands.ts";
import { DeviceFlagError, deviceJsonFlag, vsockFlag } from "../cli/device_flags.ts";
import type { DeviceConfig } from "../devices.ts";
import { absolutePath, exists } from "../build/fs_util.ts";
import { CGROUP_KEYS, type CgroupKey, JAIL_PATHS, type JailFile, MAX_ID } from "./policy.ts";
import { runJailed } from "./run_jailed.ts";

/** The `run` options of the jail. */
export const JAIL_FLAG_OPTIONS = {
  jail: { type: "string" },
  uid: { type: "string" },
  gid: { type: "string" },
  cgroup: { type: "string", multiple: true },
} as const;

/** Their lines in `run --help`. */
export const JAIL_FLAGS_HELP = `Jail (root only; README "Jailer"):
  --jail DIR         run the VMM in a jail at DIR (absent, empty, or a previous
                     jail's): new mount, PID, IPC, UTS and network namespaces
                     (the host's network only with --net tap=...), only Deno,
                     denovisor and the VM's files visible, no capabilities,
                     rlimits, no new privileges
  --uid N, --gid N   the user and group the jailed VMM runs as (default 0)
  --cgroup KEY=VALUE a cgroup v2 limit (repeatable): ${CGROUP_KEYS.join(", ")}
  With --vsock cid=N,path=PATH, PATH's folder is shared with the jail (it
  must hold only sockets and be writable by --uid); --device JSON's paths are
  put in the jail the same way; --metrics FILE is written once the jail has
  ended; --incoming is not available with --jail.
`;

/** One token of `parseArgs({ tokens: true })`. */
export type ArgToken =
  | {
    kind: "option";
    name: string;
    rawName: string;
    index: number;
    value?: string;
    inlineValue?: boolean;
  }
  | { kind: "positional"; index: number; value: string }
  | { kind: "option-terminator"; index: number };

/** The parsed jail flags. */
export interface JailFlagValues {
  jail?: string;
  uid?: string;
  gid?: string;
  cgroup?: string[];
}

/** Options that name host things a jail cannot hold (yet). */
const NOT_JAILED: Record<string, string> = {
  incoming: "an incoming migration",
};

/** Runs a device flag's parser; its errors are usage errors (status 2). */
function usage<T>(parse: () => T): T {
  try {
    return parse();
  } catch (e) {
    if (e instanceof DeviceFlagError) throw new UsageError(e.message);
    throw e;
  }
}

function parseId(value: string | undefined, what: string): number | undefined {
  if (value === undefined) return undefined;
  const n = /^[0-9]+$/.test(value) ? Number(value) : NaN;
  if (!Number.isSafeInteger(n) || n > MAX_ID) {
    throw new UsageError(`${what} must be an integer from 0 to ${MAX_ID}, got "${value}"`);
  }
  return n;
}

/**
 * Checks that --uid, --gid and --cgroup come only with --jail.
 *
 * @param values The parsed flags.
 * @throws {UsageError} when one is given without --jail.
 * @example
 * ```ts
 * import { checkJailFlags } from "denovisor/src/jail/cli.ts";
 * checkJailFlags({ jail: "/srv/jail", uid: "1000" });
 * ```
 */
export function checkJailFlags(values: JailFlagValues): void {
  if (values.jail !== undefined) return;
  for (const flag of ["uid", "gid", "cgroup"] as const) {
    if (values[flag] !== undefined) throw new UsageError(`--${flag} needs --jail DIR`);
  }
}

/**
 * Runs a `run` command line in a jail: each file option's value becomes its
 * path in the jail (`/vm/image`, `/vm/kernel`, `/vm/initrd`, `/vm/diskN`),
 * the control API's socket a link to the jail's run folder, and the jail's
 * own flags are dropped.
 *
 * @param tokens The command line's tokens (from `parseArgs`).
 * @param values The jail flags.
 * @param seccompFlags `--seccomp=...` / `--seccomp-deny=...` for the jailed VMM
 *   (the outer CLI took them off the command line).
 * @returns The jailed VMM's exit status.
 * @throws {UsageError} for a bad jail flag or an option a jail cannot hold.
 * @example
 * ```ts ignore
 * import { parseArgs } from "node:util";
 * import { jailedRunCommand } from "denovisor/src/jail/cli.ts";
 * const { tokens, values } = parseArgs({ args: Deno.args, tokens: true, allowPositionals: true,
 *   options: { jail: { type: "string" } } });
 * Deno.exit(await jailedRunCommand(tokens, values));
 * ```
 */
export async function jailedRunCommand(
  tokens: readonly ArgToken[],
  values: JailFlagValues,
  seccompFlags: readonly string[] = [],
): Promise<number> {
  const cgroups: Partial<Record<CgroupKey, string>> = {};
  for (const setting of values.cgroup ?? []) {
    const at = setting.indexOf("=");
    const key = setting.slice(0, at);
    if (at < 0 || !(CGROUP_KEYS as readonly string[]).includes(key)) {
      throw new UsageError(
        `--cgroup must be KEY=VALUE with KEY one of ${CGROUP_KEYS.join(", ")}, got "${setting}"`,
      );
    }
    cgroups[key as CgroupKey] = setting.slice(at + 1);
  }
  const files: JailFile[] = [];
  const links: { host: string; name: string }[] = [];
  const outputs: { host: string; name: string }[] = [];
  const args: string[] = [];
  let tap = false;
  let disks = 0;
  let socketDir: string | undefined;
  const file = (host: string, name: string, writable = false) => {
    const jail = `${JAIL_PATHS.vm}/${name}`;
    files.push({ host: absolutePath(host), jail, writable });
    return jail;
  };
  // A vsock socket's folder is shared with the jail (at /sockets): the host
  // connects to PATH, and listens at PATH_PORT for the guest's connections.
  const vsockPath = (hostPath: string): string => {
    const path = absolutePath(hostPath);
    const slash = path.lastIndexOf("/");
    const folder = slash === 0 ? "/" : path.slice(0, slash);
    const base = path.slice(slash + 1);
    if (!/^[A-Za-z0-9._-]{1,64}$/.test(base)) {
      throw new UsageError(
        `vsock path ${path}: with --jail, the socket's name must be 1-64 of A-Z a-z 0-9 . _ -`,
      );
    }
    if (exists(path)) {
      throw new UsageError(`vsock path ${path} already exists (remove a stale socket first)`);
    }
    if (socketDir !== undefined && socketDir !== folder) {
      throw new UsageError(`with --jail, every vsock socket must be in one folder: ${socketDir}`);
    }
    socketDir = folder;
    return `${JAIL_PATHS.sockets}/${base}`;
  };
  const netDevice = (netns: boolean) => {
    if (netns) {
      throw new UsageError(
        "a net device with netns is not available with --jail (the jailed VMM cannot create " +
          "TAPs): use --net tap=NAME with a TAP the jail's user owns",
      );
    }
    tap = true;
  };
  // `--device JSON`: its host paths become jail paths, as for the flags.
  const jailDevice = (device: DeviceConfig): DeviceConfig => {
    switch (device.kind) {
      case "block":
        return { ...device, path: file(device.path, `disk${disks++}`, device.readonly !== true) };
      case "vsock":
        return { ...device, path: vsockPath(device.path) };
      case "net":
        netDevice(device.netns !== undefined);
        return device;
      default:
        return device;
    }
  };
  for (const token of tokens) {
    if (token.kind === "option-terminator") {
      args.push("--");
      continue;
    }
    if (token.kind === "positional") {
      if (files.some((f) => f.jail === `${JAIL_PATHS.vm}/image`)) {
        throw new UsageError(`expected one IMAGE, got another: "${token.value}"`);
      }
      args.push(file(token.value, "image"));
      continue;
    }
    const { name, value } = token;
    if (name in NOT_JAILED) {
      throw new UsageError(`--${name} is not available with --jail`);
    }
    if (name === "jail" || name === "uid" || name === "gid" || name === "cgroup") continue;
    if (value === undefined) {
      args.push(token.rawName);
      continue;
    }
    let jailValue = value;
    if (name === "kernel" || name === "initrd") jailValue = file(value, name);
    else if (name === "disk") {
      const [path, ...rest] = value.split(",");
      jailValue = [file(path, `disk${disks++}`, !rest.includes("readonly")), ...rest].join(",");
    } else if (name === "api-socket") {
      await checkApiSocketOption(value);
      links.push({ host: value, name: "api.sock" });
      jailValue = `${JAIL_PATHS.run}/api.sock`;
    } else if (name === "vsock") {
      const device = usage(() => vsockFlag(value));
      jailValue = value.replace(/(^|,)path=[^,]*/, `$1path=${vsockPath(device.path)}`);
    } else if (name === "device") {
      jailValue = JSON.stringify(jailDevice(usage(() => deviceJsonFlag(value))));
    } else if (name === "metrics" && value !== "-") {
      // Written in the run folder, copied out once the jail has ended.
      outputs.push({ host: absolutePath(value), name: "metrics" });
      jailValue = `${JAIL_PATHS.run}/metrics`;
    } else if (name === "net") {
      netDevice(/(^|,)netns=/.test(value));
    }
    args.push(`${token.rawName}=${jailValue}`);
  }
  const noColor = Deno.env.get("NO_COLOR");
  const { code } = await runJailed({
    dir: values.jail!,
    ...(values.uid === undefined ? {} : { uid: parseId(values.uid, "--uid") }),
    ...(values.gid === undefined ? {} : { gid: parseId(values.gid, "--gid") }),
    cgroups,
    vm: {
      args: ["run", ...seccompFlags, ...args],
      files,
      tap,
      env: noColor === undefined ? {} : { NO_COLOR: noColor },
    },
    links,
    outputs,
    ...(socketDir === undefined ? {} : { socketDir }),
  });
  return code;
}
