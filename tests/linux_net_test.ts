/**
 * virtio-net with Debian's kernel: the test makes its own network namespace,
 * denovisor creates a TAP inside it (`netns`), the guest takes an address,
 * pings the host side and moves a few MiB over TCP each way (busybox `nc` in
 * the guest, a Deno peer in the namespace), both sides comparing SHA-256. A
 * second NIC attaches an existing TAP by name (`tap`). Everything stays in
 * the test's namespace (the `tap` TAP has no address and no route), and the
 * namespace and TAP are removed even when the test fails. Bad host input (a
 * TAP or a namespace that does not exist) is a one-line error before the VM
 * runs. Runs as root where `/dev/net/tun` is (kvmbox: Debian's `tun` module
 * is inserted first).
 */

import assert from "node:assert/strict";

import { DenovisorError, Vm } from "../mod.ts";
import { cli, kvmTest, linuxTest } from "./_helpers.ts";
import { bootLinuxShell } from "./_linux_shell.ts";
import { createNetns, ensureTun, runChecked as run, startNetPeer } from "./_netns.ts";

async function peer(ns: string, mode: "sink" | "source", port: number, bytes: number) {
  const p = await startNetPeer(ns, mode, "10.77.0.1", port, bytes);
  return {
    done: p.done.then((r) => {
      console.error(`note: ${mode}: ${r.bytes} bytes in ${r.ms} ms`);
      return r;
    }),
  };
}

linuxTest("Linux on virtio-net pings the host side and moves data over TCP both ways", async () => {
  await ensureTun();
  const ns = `dvnet${Deno.pid}`;
  const tap = `dvtap${Deno.pid % 10000}`;
  {
    await using _netns = await createNetns(ns);
    try {
      // An existing TAP for the second NIC (tap=NAME): in our namespace,
      // without an address or route, so nothing it carries goes anywhere.
      await run("ip", "tuntap", "add", "dev", tap, "mode", "tap");
      await run("ip", "link", "set", tap, "up");
      await using guest = await bootLinuxShell({
        devices: [
          {
            kind: "net",
            netns: ns,
            tapName: "dv0",
            hostAddress: "10.77.0.1/24",
            mac: "52:54:00:77:00:02",
          },
          { kind: "net", tap, mac: "52:54:00:77:00:03" },
        ],
        memoryMiB: 256,
      });
      const { sh, vm } = guest;
      assert.match(await sh("cat /sys/class/net/eth0/address"), /52:54:00:77:00:02/);
      assert.match(await sh("cat /sys/class/net/eth1/address"), /52:54:00:77:00:03/);
      await sh("ip link set lo up && ip link set eth0 up && ip addr add 10.77.0.2/24 dev eth0");
      assert.match(await sh("ping -c 3 -W 5 10.77.0.1"), /3 packets received/);
      // Guest -> host: 4 MiB through nc, checked on both sides.
      const size = 4 << 20;
      await sh(`mkdir -p /tmp && dd if=/dev/urandom of=/tmp/out bs=65536 count=${size >> 16} 2>&1`);
      const sink = await peer(ns, "sink", 5001, size);
      await sh("nc 10.77.0.1 5001 < /tmp/out", 300_000);
      const received = await sink.done;
      const sent = (await sh("sha256sum /tmp/out")).trim().split(/\s+/)[0];
      assert.equal(received.bytes, size);
      assert.equal(received.sha256, sent.slice(-64));
      // Host -> guest: 4 MiB the other way.
      const source = await peer(ns, "source", 5002, size);
      await sh("nc 10.77.0.1 5002 < /dev/null > /tmp/in && nc 10.77.0.1 5003 < /dev/null", 300_000);
      const served = await source.done;
      assert.equal((await sh("wc -c < /tmp/in")).trim().split(/\s+/).pop(), `${size}`);
      const got = (await sh("sha256sum /tmp/in")).trim().split(/\s+/)[0];
      assert.equal(got.slice(-64), served.sha256);
      // The second NIC carries frames to the TAP it attached by name.
      await sh("ip link set eth1 up && ip addr add 10.78.0.2/24 dev eth1");
      await guest.exec("ping -c 2 -W 1 10.78.0.9");
      const tapRx = Number(await Deno.readTextFile(`/sys/class/net/${tap}/statistics/rx_packets`));
      assert.ok(tapRx > 0, "the existing TAP received the guest's frames");
      // The host sees both devices and their counters.
      const listing = vm.devices().pci;
      const net0 = listing.find((f) => f.name === "net0")?.details as {
        device: { txBytes: number; rxBytes: number; tap: string; ackedFeatures: number };
      };
      // 4 MiB each way (in far fewer frames than 1500-byte packets: TSO/GSO).
      assert.ok(net0.device.txBytes > size && net0.device.rxBytes > size, JSON.stringify(net0));
      assert.equal(net0.device.tap, "dv0");
      const net1 = listing.find((f) => f.name === "net1")?.details as { device: { tap: string } };
      assert.equal(net1.device.tap, tap);
      await guest.powerOff();
    } finally {
      await run("ip", "tuntap", "del", "dev", tap, "mode", "tap").catch(() => {});
    }
  }
  // Gone: the namespace, and with the VM the TAP denovisor created in it.
  assert.ok(!(await run("ip", "netns", "list")).includes(ns));
});

/** The throttled test's rate, each way: 64 KiB per second, a 64 KiB bucket (far
 * below even an emulated guest's TCP: kvmbox's moves ~300 KiB/s unthrottled). */
const THROTTLE = { size: 64 << 10, refillTimeMs: 1000 };

linuxTest(
  "a net device's RX and TX rate limiters hold a Linux guest's TCP to their rate and lose nothing",
  async () => {
    await ensureTun();
    const ns = `dvthr${Deno.pid}`;
    await using _netns = await createNetns(ns);
    await using guest = await bootLinuxShell({
      devices: [{
        kind: "net",
        netns: ns,
        tapName: "dv0",
        hostAddress: "10.77.0.1/24",
        rxRateLimiter: { bandwidth: THROTTLE },
        txRateLimiter: { bandwidth: THROTTLE },
      }],
      memoryMiB: 256,
    });
    const { sh, vm } = guest;
    await sh("ip link set lo up && ip link set eth0 up && ip addr add 10.77.0.2/24 dev eth0");
    const size = 512 << 10;
    await sh(`mkdir -p /tmp && dd if=/dev/urandom of=/tmp/out bs=65536 count=${size >> 16} 2>&1`);
    // Guest -> host through the TX limiter.
    const sink = await peer(ns, "sink", 5001, size);
    await sh("nc 10.77.0.1 5001 < /tmp/out", 300_000);
    const received = await sink.done;
    assert.equal(received.bytes, size);
    assert.equal(received.sha256, (await sh("sha256sum /tmp/out")).trim().split(/\s+/)[0]);
    // Host -> guest through the RX limiter.
    const source = await peer(ns, "source", 5002, size);
    await sh("nc 10.77.0.1 5002 < /dev/null > /tmp/in && nc 10.77.0.1 5003 < /dev/null", 300_000);
    const served = await source.done;
    assert.equal((await sh("sha256sum /tmp/in")).trim().split(/\s+/)[0], served.sha256);
    const net0 = vm.devices().pci.find((f) => f.name === "net0")?.details as {
      device: { rxThrottled: number; txThrottled: number };
    };
    // Frames waited for their buckets in both directions...
    assert.ok(net0.device.txThrottled > 0 && net0.device.rxThrottled > 0, JSON.stringify(net0));
    // ...and a bucket can never have let through more than it held plus its
    // refill over the time taken, plus one frame in flight (a GSO frame of
    // 64 KiB and its headers may overdraw the bucket once); the sink's clock
    // starts at the first frame, so one frame more there. This bounds the
    // limiter, not the machine's speed: a slower machine only takes longer.
    const frame = 66 << 10;
    const allowed = (ms: number) => THROTTLE.size + (THROTTLE.size * ms) / 1000 + frame;
    assert.ok(
      size <= allowed(received.ms) + frame,
      `TX: ${size} bytes in ${received.ms} ms`,
    );
    assert.ok(size <= allowed(served.ms), `RX: ${size} bytes in ${served.ms} ms`);
    await guest.powerOff();
  },
);

kvmTest(
  "a TAP or a network namespace that does not exist is an error when the device is added",
  async () => {
    for (
      const [device, message] of [
        [{ kind: "net", tap: "dvnothere0" }, /TAP device dvnothere0 does not exist/],
        [{ kind: "net", netns: "dv-no-such-ns" }, /network namespace dv-no-such-ns does not exist/],
      ] as const
    ) {
      await assert.rejects(
        Vm.create({ interrupts: true, devices: [device] }),
        (e) => e instanceof DenovisorError && message.test(e.message),
      );
    }
  },
);

Deno.test("run --net with a TAP or namespace that does not exist: one line, status 2, before /dev/kvm", async () => {
  for (
    const [flag, message] of [
      [
        "tap=dvnothere0",
        "TAP device dvnothere0 does not exist (create it with `ip tuntap add dev dvnothere0 mode tap`)",
      ],
      [
        "netns=dv-no-such-ns,host=10.0.0.1/24",
        "network namespace dv-no-such-ns does not exist (no /run/netns/dv-no-such-ns; create it with `ip netns add dv-no-such-ns`)",
      ],
      [
        "tap=x,bogus=1",
        "--net tap=x,bogus=1: unknown key bogus (tap, netns, host, mac, offload, mrg, name)",
      ],
      [
        "tap=x,host=10.0.0.1/24",
        "--net tap=x,host=10.0.0.1/24: tapName and hostAddress go with netns (denovisor creates that TAP), not with tap",
      ],
      [
        "mac=52:54:00:00:00:01",
        "--net mac=52:54:00:00:00:01: a net device needs exactly one of tap (an existing TAP) or netns (a namespace)",
      ],
    ]
  ) {
    const { code, stdout, stderr } = await cli("run", "--kernel", "/nonexistent", "--net", flag);
    assert.equal(code, 2, stderr);
    assert.equal(stdout, "");
    assert.equal(stderr, `denovisor: ${message}\n`);
  }
});
