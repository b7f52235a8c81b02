/**
 * A pool of warm VMs for one function. The first VM boots the function to
 * READY and is snapshotted into a private temporary directory; every pool VM
 * is restored from that snapshot (lazily: guest memory shared copy-on-write
 * between them) and checkpointed, so a request costs a reset, not a boot.
 *
 * {@link FunctionPool.invoke} takes an idle VM (the most recently used: the
 * others stay idle long enough to be trimmed or retired), or waits in a
 * bounded FIFO queue; a full queue, or a wait longer than the queue timeout,
 * is an `OVERLOADED` error (the service answers 503). A VM whose invocation
 * threw, or that reported itself `stopped`, is closed and replaced. The size
 * follows {@link planPool} (`policy.ts`), re-planned at every arrival and on
 * a timer; never more than `max` VMs.
 *
 * @module
 */

import { join } from "node:path";
import { DenovisorError } from "../errors.ts";
import type { FunctionBackend, FunctionReady, FunctionVm, InvokeResult } from "./backend.ts";
import type { LoadedFunction } from "./function.ts";
import type { PoolGauges } from "./metrics.ts";
import {
  initialLoad,
  type LoadEstimate,
  planPool,
  type PoolMember,
  type PoolPolicy,
  poolPolicy,
  recordArrival,
  recordService,
} from "./policy.ts";

/** How a pool runs. */
export interface PoolOptions {
  /** Sizing (see `policy.ts`; each knob defaults to `DEFAULT_POOL_POLICY`'s). */
  policy?: Partial<PoolPolicy>;
  /** Requests that may wait for a VM (default {@link DEFAULT_QUEUE_MAX}). */
  queueMax?: number;
  /** How long a request may wait for a VM, in ms (default {@link DEFAULT_QUEUE_TIMEOUT_MS}). */
  queueTimeoutMs?: number;
  /** How often the pool re-plans without arrivals, in ms (default 250). */
  tickMs?: number;
  /** The clock, in ms (default `performance.now`). */
  now?: () => number;
}

/** Requests that may wait for a VM by default. */
export const DEFAULT_QUEUE_MAX = 256;
/** How long a request may wait for a VM by default, in ms. */
export const DEFAULT_QUEUE_TIMEOUT_MS = 30_000;

interface Member extends PoolMember {
  vm: FunctionVm;
}

interface Waiter {
  resolve(member: Member): void;
  reject(error: unknown): void;
  timer: ReturnType<typeof setTimeout>;
}

/** What {@link FunctionPool.invoke} answers: the invocation, and the time the VM was held. */
export interface PoolInvocation {
  /** What the VM reported. */
  result: InvokeResult;
  /** Time from taking the VM to giving it back, in ms (host-measured). */
  heldMs: number;
  /** Time spent waiting for a VM, in ms. */
  waitedMs: number;
}

/**
 * The warm VMs of one function.
 *
 * @example
 * ```ts ignore
 * import { FunctionPool } from "denovisor/src/serverless/pool.ts";
 * import { loadFunction } from "denovisor/src/serverless/function.ts";
 * import { KVM_BACKEND } from "denovisor/src/serverless/backend.ts";
 * const fn = await loadFunction({ name: "echo", program: "/bin/busybox", argv: ["busybox", "echo", "hi"] });
 * await using pool = await FunctionPool.start(fn, KVM_BACKEND, { policy: { min: 2, max: 8 } });
 * const { result } = await pool.invoke(new Uint8Array());
 * console.log(new TextDecoder().decode(result.stdout)); // "hi\n"
 * ```
 */
export class FunctionPool implements AsyncDisposable {
  readonly #fn: LoadedFunction;
  readonly #backend: FunctionBackend;
  readonly #policy: PoolPolicy;
  readonly #queueMax: number;
  readonly #queueTimeoutMs: number;
  readonly #now: () => number;
  readonly #snapshotDir: string;
  readonly #ready: FunctionReady;
  readonly #members = new Map<number, Member>();
  readonly #waiters: Waiter[] = [];
  readonly #startsInFlight = new Set<Promise<void>>();
  #load: LoadEstimate;
  #nextId = 1;
  #starting = 0;
  #target = 0;
  #started = 0;
  #retired = 0;
  #replaced = 0;
  #startFailures = 0;
  #lastStartError: unknown;
  #timer: ReturnType<typeof setInterval> | undefined;
  #closing: Promise<void> | undefined;
  /** Called once the last VM is closed while the pool closes. */
  #drained: (() => void) | undefined;

  private constructor(
    fn: LoadedFunction,
    backend: FunctionBackend,
    policy: PoolPolicy,
    options: PoolOptions,
    snapshotDir: string,
    ready: FunctionReady,
  ) {
    this.#fn = fn;
    this.#backend = backend;
    this.#policy = policy;
    this.#queueMax = options.queueMax ?? DEFAULT_QUEUE_MAX;
    this.#queueTimeoutMs = options.queueTimeoutMs ?? DEFAULT_QUEUE_TIMEOUT_MS;
    this.#now = options.now ?? (() => performance.now());
    this.#snapshotDir = snapshotDir;
    this.#ready = ready;
    this.#load = initialLoad(this.#now());
  }

  /**
   * Boots the function to READY, snapshots it, and restores the pool's first
   * `min` VMs from the snapshot (at least one, so a broken restore fails here
   * and not at the first request).
   *
   * @param fn The function.
   * @param backend Where VMs come from.
   * @param options Sizing, queue and clock.
   * @returns The pool, warm.
   * @throws {DenovisorError} The backend's error when the function does not
   *   initialize (the guest's reason), `INVALID_ARGUMENT` for bad options.
   */
  static async start(
    fn: LoadedFunction,
    backend: FunctionBackend,
    options: PoolOptions = {},
  ): Promise<FunctionPool> {
    const policy = poolPolicy(options.policy);
    const queueMax = options.queueMax ?? DEFAULT_QUEUE_MAX;
    if (!Number.isSafeInteger(queueMax) || queueMax < 0 || queueMax > 1_000_000) {
      throw new DenovisorError(
        "INVALID_ARGUMENT",
        `queueMax must be from 0 to 1000000, got ${queueMax}`,
      );
    }
    const queueTimeoutMs = options.queueTimeoutMs ?? DEFAULT_QUEUE_TIMEOUT_MS;
    if (!(queueTimeoutMs > 0 && Number.isFinite(queueTimeoutMs))) {
      throw new DenovisorError(
        "INVALID_ARGUMENT",
        `queueTimeoutMs must be positive, got ${queueTimeoutMs}`,
      );
    }
    const dir = await Deno.makeTempDir({ prefix: `denovisor-fn-${fn.name}-` });
    const snapshotDir = join(dir, "snapshot");
    let pool: FunctionPool | undefined;
    try {
      const first = await backend.start({
        program: fn.program,
        argv: fn.argv,
        env: fn.env,
        files: fn.files,
        memoryMiB: fn.memoryMiB,
      });
      try {
        first.snapshot(snapshotDir, { resume: false });
      } finally {
        first.close();
      }
      const vm = await backend.restore(snapshotDir);
      let ready: FunctionReady;
      try {
        vm.checkpoint();
        ready = vm.functionReady();
      } catch (e) {
        vm.close();
        throw e;
      }
      pool = new FunctionPool(fn, backend, policy, options, snapshotDir, ready);
      pool.#add(vm);
      pool.#plan();
      const tick = options.tickMs ?? 250;
      pool.#timer = setInterval(() => pool!.#plan(), tick);
      Deno.unrefTimer(pool.#timer);
      return pool;
    } catch (e) {
      if (pool) await pool.close();
      else await Deno.remove(dir, { recursive: true }).catch(() => {});
      throw e;
    }
  }

  /** The function served. */
  get function(): LoadedFunction {
    return this.#fn;
  }

  /** The runtime's buffers (the largest input and outputs a request can have). */
  get ready(): FunctionReady {
    return this.#ready;
  }

  /** The sizing policy, complete. */
  get policy(): Readonly<PoolPolicy> {
    return this.#policy;
  }

  /** What the pool's VMs are (`kvm`, `native`). */
  get backendKind(): string {
    return this.#backend.kind;
  }

  #add(vm: FunctionVm): Member {
    const member: Member = {
      id: this.#nextId++,
      vm,
      busy: false,
      idleSince: this.#now(),
      trimmed: false,
    };
    this.#members.set(member.id, member);
    this.#started++;
    return member;
  }

  #close(member: Member): void {
    this.#members.delete(member.id);
    try {
      member.vm.close();
    } catch {
      // A VM that cannot even close is gone as far as the pool is concerned.
    }
    if (this.#members.size === 0) this.#drained?.();
  }

  /** Starts one VM from the snapshot; it serves the first waiter or joins the idle ones. */
  #startOne(): void {
    this.#starting++;
    const start = (async () => {
      let vm: FunctionVm | undefined;
      try {
        vm = await this.#backend.restore(this.#snapshotDir);
        vm.checkpoint();
      } catch (e) {
        vm?.close();
        this.#startFailures++;
        this.#lastStartError = e;
        return;
      } finally {
        this.#starting--;
      }
      if (this.#closing) {
        vm.close();
        return;
      }
      this.#handOver(this.#add(vm));
    })().finally(() => {
      this.#startsInFlight.delete(start);
      // Requests waiting while nothing runs or starts would wait for nothing.
      if (this.#members.size === 0 && this.#starting === 0) {
        this.#failWaiters(this.#lastStartError);
      }
    });
    this.#startsInFlight.add(start);
  }

  #failWaiters(cause: unknown): void {
    for (const w of this.#waiters.splice(0)) {
      clearTimeout(w.timer);
      w.reject(
        new DenovisorError(
          "OVERLOADED",
          `function ${this.#fn.name}: no VM could be started: ${
            cause instanceof Error ? cause.message : cause
          }`,
          { cause },
        ),
      );
    }
  }

  /** Gives an idle member to the first waiter, or leaves it idle. */
  #handOver(member: Member): void {
    const waiter = this.#waiters.shift();
    if (waiter) {
      clearTimeout(waiter.timer);
      member.busy = true;
      member.trimmed = false;
      waiter.resolve(member);
    } else {
      member.busy = false;
      member.idleSince = this.#now();
    }
  }

  /** Applies the policy's plan: start, retire, trim. */
  #plan(): void {
    if (this.#closing) return;
    const members = [...this.#members.values()];
    const plan = planPool(
      members,
      this.#starting,
      this.#waiters.length,
      this.#load,
      this.#now(),
      this.#policy,
    );
    this.#target = plan.target;
    // Restarting without end after failures would spin: one start at a time then.
    const starts = this.#startFailures > 0 && this.#members.size > 0
      ? Math.min(plan.start, 1)
      : plan.start;
    for (let i = 0; i < starts; i++) this.#startOne();
    for (const id of plan.retire) {
      const m = this.#members.get(id);
      if (m && !m.busy) {
        this.#close(m);
        this.#retired++;
      }
    }
    for (const id of plan.trim) {
      const m = this.#members.get(id);
      if (!m || m.busy) continue;
      try {
        m.vm.trim();
        m.trimmed = true;
      } catch {
        this.#close(m);
        this.#replaced++;
      }
    }
  }

  /** Takes an idle VM, or waits for one. */
  #acquire(): Promise<Member> {
    if (this.#closing) {
      return Promise.reject(
        new DenovisorError("CLOSED", `function ${this.#fn.name} is shutting down`),
      );
    }
    this.#load = recordArrival(this.#load, this.#now(), this.#policy);
    let best: Member | undefined;
    for (const m of this.#members.values()) {
      if (!m.busy && (best === undefined || m.idleSince > best.idleSince)) best = m;
    }
    if (best) {
      best.busy = true;
      best.trimmed = false;
      this.#plan();
      return Promise.resolve(best);
    }
    if (this.#waiters.length >= this.#queueMax) {
      this.#plan();
      return Promise.reject(
        new DenovisorError(
          "OVERLOADED",
          `function ${this.#fn.name}: all ${this.#members.size} VMs are busy and ` +
            `${this.#waiters.length} requests wait already (the queue's limit)`,
        ),
      );
    }
    const promise = new Promise<Member>((resolve, reject) => {
      const waiter: Waiter = {
        resolve,
        reject,
        timer: setTimeout(() => {
          const i = this.#waiters.indexOf(waiter);
          if (i >= 0) this.#waiters.splice(i, 1);
          reject(
            new DenovisorError(
              "OVERLOADED",
              `function ${this.#fn.name}: no VM became free within ${this.#queueTimeoutMs} ms`,
            ),
          );
        }, this.#queueTimeoutMs),
      };
      this.#waiters.push(waiter);
    });
    this.#plan();
    if (this.#members.size === 0 && this.#starting === 0) this.#failWaiters(this.#lastStartError);
    return promise;
  }

  /** Gives a VM back: healthy ones serve again, the others are closed and replaced. */
  #release(member: Member, healthy: boolean, heldMs: number): void {
    this.#load = recordService(this.#load, heldMs, this.#policy);
    if (this.#closing || !healthy) {
      this.#close(member);
      if (!healthy) this.#replaced++;
      this.#plan();
      return;
    }
    this.#handOver(member);
  }

  /**
   * Runs one request on a warm VM: waits for one if all are busy, invokes,
   * and gives the VM back (reset by the invocation itself). A VM whose
   * invocation threw is closed and replaced, and the error is thrown.
   *
   * @param input The request's stdin.
   * @returns What the VM reported, and the time it was held.
   * @throws {DenovisorError} `OVERLOADED` when the queue is full or the wait
   *   too long, `CLOSED` while the pool shuts down, or what the VM threw.
   */
  async invoke(input: Uint8Array): Promise<PoolInvocation> {
    const asked = this.#now();
    const member = await this.#acquire();
    const took = this.#now();
    let healthy = false;
    try {
      const limits = this.#fn.limits;
      const result = await member.vm.invokeAsync(input, {
        timeoutMs: limits.timeoutMs,
        memoryLimit: limits.memoryBytes,
        outputLimit: limits.outputBytes,
      });
      // A stopped VM (closed under it, or kicked for good) does not serve again.
      healthy = result.status !== "stopped";
      return { result, heldMs: this.#now() - took, waitedMs: took - asked };
    } finally {
      this.#release(member, healthy, this.#now() - took);
    }
  }

  /**
   * The pool's gauges and counters now.
   *
   * @returns Size, busy, starting, queued, trimmed, target and the counters.
   */
  stats(): PoolGauges {
    let busy = 0;
    let trimmed = 0;
    for (const m of this.#members.values()) {
      if (m.busy) busy++;
      else if (m.trimmed) trimmed++;
    }
    return {
      size: this.#members.size,
      busy,
      starting: this.#starting,
      queued: this.#waiters.length,
      trimmed,
      target: this.#target,
      started: this.#started,
      retired: this.#retired,
      replaced: this.#replaced,
      startFailures: this.#startFailures,
    };
  }

  /**
   * Stops the pool: waiting requests fail with `CLOSED`, idle VMs close now,
   * busy ones when their request ends (each is bounded by the time limit),
   * then the snapshot directory is removed. Idempotent.
   *
   * @returns Once every VM is closed and the snapshot gone.
   */
  close(): Promise<void> {
    this.#closing ??= (async () => {
      clearInterval(this.#timer);
      for (const w of this.#waiters.splice(0)) {
        clearTimeout(w.timer);
        w.reject(new DenovisorError("CLOSED", `function ${this.#fn.name} is shutting down`));
      }
      await Promise.allSettled([...this.#startsInFlight]);
      const drained = new Promise<void>((resolve) => (this.#drained = resolve));
      for (const m of [...this.#members.values()]) if (!m.busy) this.#close(m);
      // Busy VMs close as their requests end (each bounded by the time limit).
      if (this.#members.size > 0) await drained;
      await Deno.remove(join(this.#snapshotDir, ".."), { recursive: true }).catch(() => {});
    })();
    return this.#closing;
  }

  /** Same as {@link FunctionPool.close}, for `await using`. */
  [Symbol.asyncDispose](): Promise<void> {
    return this.close();
  }
}
