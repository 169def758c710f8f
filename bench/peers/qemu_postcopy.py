#!/usr/bin/env python3
"""QEMU's own post-copy, as a peer for Faultline: two QEMU processes on loopback, driven by QMP.

The source boots bench/peers/guest.S (a multiboot kernel that does what Faultline's dirtier
does: it rewrites every page of N MiB at guest-physical 0x10000000, pass after pass); the
destination waits with `-incoming defer`. Both get the capabilities `postcopy-ram`, `events`
(MIGRATION status events with timestamps) and, if this QEMU has it, `postcopy-preempt`; the
destination also `postcopy-blocktime`. The source's `max-bandwidth` is lifted (QEMU's default
caps pre-copy at 32 MiB/s; Faultline's pre-copy has no cap) and its `downtime-limit` set to
1 ms, so that pre-copy does not end in a stop-and-copy of its own (Faultline runs with
`--postcopy always`). Then `migrate`, and
`migrate-start-postcopy` either right away (--precopy-seconds 0) or after that many seconds of
pre-copy. One JSON line per run (--json) or a few human lines.

Timing, all on one host clock (CLOCK_REALTIME: time.time() here, QMP event timestamps there):
  total_seconds     from just before `migrate` is sent to the later of the two sides'
                    `completed` MIGRATION events (the source's comes after the destination
                    has loaded every page, as its return path closes)
  qemu_total_ms     QEMU's own `total-time` (source, ms resolution)
  downtime_ms       QEMU's own `downtime` (source: the vCPUs stop until the post-copy "run"
                    command is sent to the destination)
  stop_to_resume_ms source STOP event to destination RESUME event (the guest runs nowhere)
  precopy_seconds   `migrate` sent to the source's `postcopy-active` event
  postcopy_phase_seconds  destination RESUME event to the later `completed` event

The guest is checked to dirty memory: its tag (pass number, in the first word of the region's
first and last page) is read with `xp` before the migration (it must advance), during
pre-copy QEMU's `dirty-pages-rate` and `dirty-sync-count` are sampled, and after the migration
the destination's tag must be ahead of the source's last one and keep advancing.

Standard library only.
"""

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

REGION_BASE = 0x10000000


class QMP:
    """A minimal QMP client over a Unix socket: commands in order, events kept with timestamps."""

    def __init__(self, path, timeout=30.0):
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.connect(path)
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no QMP socket at {path}")
                time.sleep(0.02)
        self.sock.settimeout(timeout)
        self.buf = b""
        self.events = []
        greeting = self._read()
        self.version = greeting["QMP"]["version"]["qemu"]
        self.execute("qmp_capabilities")

    def _read(self):
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise RuntimeError("QMP connection closed")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def execute(self, command, **arguments):
        msg = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            reply = self._read()
            if "event" in reply:
                ts = reply.get("timestamp", {})
                reply["t"] = ts.get("seconds", 0) + ts.get("microseconds", 0) / 1e6
                self.events.append(reply)
            elif "error" in reply:
                raise RuntimeError(f"{command}: {reply['error'].get('desc')}")
            else:
                return reply.get("return")

    def poll_events(self):
        """Reads the events already sent (a cheap no-op command flushes them in)."""
        self.execute("query-status")

    def event_time(self, name, status=None):
        for e in self.events:
            if e["event"] == name and (status is None or e.get("data", {}).get("status") == status):
                return e["t"]
        return None

    def hmp(self, line):
        return self.execute("human-monitor-command", **{"command-line": line})

    def read_word(self, address):
        out = self.hmp(f"xp /1wx {address:#x}")
        m = re.search(r":\s*(0x[0-9a-fA-F]+)", out)
        if not m:
            raise RuntimeError(f"unexpected xp output: {out!r}")
        return int(m.group(1), 16)

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_qemu(args, qmp_path, extra, log_path):
    cmd = [args.qemu, "-accel", "kvm", "-m", args.memory, "-smp", str(args.vcpus),
           "-kernel", args.guest, "-append", f"mib={args.dirty_mib}",
           "-nographic", "-no-user-config", "-nodefaults",
           "-qmp", f"unix:{qmp_path},server=on,wait=off"] + extra
    log = open(log_path, "wb")
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    return proc


def sample_pages(dirty_mib):
    """Eight pages spread over the region, its first and last included."""
    pages = dirty_mib * 256
    return [REGION_BASE + (i * (pages - 1) // 7) * 4096 for i in range(8)]


def tags(qmp, pages):
    return [qmp.read_word(p) for p in pages]


def wait_advancing(qmp, pages, seconds):
    """Reads the tags of `pages` `seconds` apart; returns both reads."""
    a = tags(qmp, pages)
    time.sleep(seconds)
    return a, tags(qmp, pages)


def advanced(a, b):
    """Every sampled page holds a tag at least as new, and some page a newer one."""
    return all(y >= x for x, y in zip(a, b)) and any(y > x for x, y in zip(a, b))


def one_run(args):
    work = tempfile.mkdtemp(prefix="faultline-qemu-peer-")
    src_sock, dst_sock = os.path.join(work, "src.qmp"), os.path.join(work, "dst.qmp")
    port = args.port or free_port()
    uri = f"tcp:127.0.0.1:{port}"
    pages = sample_pages(args.dirty_mib)
    result = {"peer": "qemu", "memory": args.memory, "vcpus": args.vcpus, "dirty_mib": args.dirty_mib,
              "precopy_seconds_requested": args.precopy_seconds}
    procs = []
    src = dst = None
    try:
        procs.append(start_qemu(args, src_sock, [], os.path.join(work, "src.log")))
        procs.append(start_qemu(args, dst_sock, ["-incoming", "defer"], os.path.join(work, "dst.log")))
        src, dst = QMP(src_sock), QMP(dst_sock)
        v = src.version
        result["qemu_version"] = f"{v['major']}.{v['minor']}.{v['micro']}"

        # Capabilities: what this QEMU has decides about preempt and blocktime.
        have = {c["capability"] for c in src.execute("query-migrate-capabilities")}
        caps = ["postcopy-ram", "events"]
        if "postcopy-preempt" in have and not args.no_preempt:
            caps.append("postcopy-preempt")
        dst_caps = caps + (["postcopy-blocktime"] if "postcopy-blocktime" in have else [])
        src.execute("migrate-set-capabilities", capabilities=[{"capability": c, "state": True} for c in caps])
        dst.execute("migrate-set-capabilities", capabilities=[{"capability": c, "state": True} for c in dst_caps])
        result["capabilities_source"], result["capabilities_destination"] = caps, dst_caps
        result["postcopy_preempt"] = "postcopy-preempt" in caps
        src.execute("migrate-set-parameters", **{"max-bandwidth": args.max_bandwidth,
                                                 "downtime-limit": args.downtime_limit_ms})
        dst.execute("migrate-incoming", uri=uri)

        # The firmware first (SeaBIOS takes seconds under nested KVM), until the guest's first
        # store; then the guest runs as long as Faultline's `--migrate-after`, and must be dirtying.
        boot_deadline = time.monotonic() + args.timeout
        t_boot = time.monotonic()
        while src.read_word(REGION_BASE) == 0:
            if time.monotonic() > boot_deadline:
                raise RuntimeError("the guest never wrote its region (did it boot?)")
            time.sleep(0.02)
        result["boot_seconds"] = round(time.monotonic() - t_boot, 3)
        time.sleep(max(0.0, args.migrate_after - 0.3))
        before, before2 = wait_advancing(src, pages, 0.3)
        result["source_tags_before"] = [before, before2]
        if not advanced(before, before2):
            raise RuntimeError(f"the guest is not dirtying on the source: tags {before} then {before2}")
        result["guest_passes_before"] = before2[0]

        # The migration.
        t0 = time.time()
        src.execute("migrate", uri=uri)
        samples = []
        if args.precopy_seconds > 0:
            while time.time() - t0 < args.precopy_seconds:
                info = src.execute("query-migrate")
                ram = info.get("ram", {})
                samples.append({"t": round(time.time() - t0, 3), "status": info.get("status"),
                                "dirty_pages_rate": ram.get("dirty-pages-rate"),
                                "dirty_sync_count": ram.get("dirty-sync-count"),
                                "remaining": ram.get("remaining")})
                if info.get("status") in ("completed", "failed"):
                    break
                time.sleep(min(0.1, max(0.0, args.precopy_seconds - (time.time() - t0))))
        t_postcopy_cmd = time.time()
        src.execute("migrate-start-postcopy")
        deadline = time.monotonic() + args.timeout
        while True:
            info = src.execute("query-migrate")
            if info.get("status") in ("completed", "failed", "cancelled"):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"no completion in {args.timeout} s: {info.get('status')}")
            time.sleep(0.01)
        if info["status"] != "completed":
            raise RuntimeError(f"migration {info['status']}: {info.get('error-desc', '')}")
        while True:
            dinfo = dst.execute("query-migrate")
            if dinfo.get("status") in ("completed", "failed"):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"destination did not complete: {dinfo.get('status')}")
            time.sleep(0.01)
        src.poll_events()
        dst.poll_events()

        # Timing.
        src_done = src.event_time("MIGRATION", "completed")
        dst_done = dst.event_time("MIGRATION", "completed")
        stop, resume = src.event_time("STOP"), dst.event_time("RESUME")
        active = src.event_time("MIGRATION", "postcopy-active")
        result["statuses_source"] = [e["data"]["status"] for e in src.events if e["event"] == "MIGRATION"]
        result["mode"] = "postcopy" if active is not None else "precopy"
        ends = [t for t in (src_done, dst_done) if t is not None]
        result["total_seconds"] = round(max(ends) - t0, 6) if ends else None
        result["source_completed_seconds"] = round(src_done - t0, 6) if src_done else None
        result["destination_completed_seconds"] = round(dst_done - t0, 6) if dst_done else None
        result["qemu_total_ms"] = info.get("total-time")
        result["downtime_ms"] = info.get("downtime")
        result["setup_ms"] = info.get("setup-time")
        result["stop_to_resume_ms"] = round((resume - stop) * 1000, 3) if stop and resume else None
        result["precopy_seconds"] = round(active - t0, 6) if active else None
        result["postcopy_phase_seconds"] = round(max(ends) - resume, 6) if ends and resume else None
        result["postcopy_command_seconds"] = round(t_postcopy_cmd - t0, 6)
        ram = info.get("ram", {})
        for key in ("transferred", "duplicate", "normal", "precopy-bytes", "downtime-bytes", "postcopy-bytes",
                    "postcopy-requests", "dirty-sync-count", "mbps"):
            if key in ram:
                result["ram_" + key.replace("-", "_")] = ram[key]
        for key in ("postcopy-blocktime", "postcopy-vcpu-blocktime"):
            if key in dinfo:
                result[key.replace("-", "_") + "_ms"] = dinfo[key]
        result["precopy_samples"] = samples
        rates = [s["dirty_pages_rate"] for s in samples if s.get("dirty_pages_rate")]
        result["max_dirty_pages_rate"] = max(rates) if rates else None

        # The guest on the destination: ahead of where it was, and still dirtying.
        after, after2 = wait_advancing(dst, pages, 0.3)
        result["destination_tags_after"] = [after, after2]
        result["destination_guest_running"] = advanced(after, after2)
        result["destination_ahead_of_source"] = all(y >= x for x, y in zip(before2, after))
        result["ok"] = (result["mode"] == "postcopy" and result["destination_guest_running"]
                        and result["destination_ahead_of_source"])
        return result
    finally:
        for q in (src, dst):
            if q is not None:
                try:
                    q.execute("quit")
                except Exception:
                    pass
                q.close()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.send_signal(signal.SIGKILL)
                p.wait()
        if args.keep:
            print(f"logs in {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--qemu", default=shutil.which("qemu-system-x86_64") or "qemu-system-x86_64")
    ap.add_argument("--guest", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "build", "guest.elf"))
    ap.add_argument("--memory", default="1G")
    ap.add_argument("--vcpus", type=int, default=1)
    ap.add_argument("--dirty-mib", type=int, default=512, help="MiB the guest rewrites, from 0x10000000")
    ap.add_argument("--precopy-seconds", type=float, default=0.0, help="pre-copy before migrate-start-postcopy")
    ap.add_argument("--migrate-after", type=float, default=1.0,
                    help="seconds the guest runs (from its first store) before the migration")
    ap.add_argument("--max-bandwidth", type=int, default=1 << 40, help="bytes/s for pre-copy (QEMU's default is 32 MiB/s)")
    ap.add_argument("--downtime-limit-ms", type=int, default=1,
                    help="pre-copy stops on its own only if the rest fits this (1: it waits for "
                         "migrate-start-postcopy, as Faultline's --postcopy always)")
    ap.add_argument("--no-preempt", action="store_true", help="leave postcopy-preempt off even if QEMU has it")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=120.0)
    ap.add_argument("--keep", action="store_true", help="keep the QEMU logs")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.vcpus != 1:
        sys.exit("qemu_postcopy: the guest dirties from one vCPU; --vcpus must be 1")
    try:
        r = one_run(args)
    except Exception as e:  # one JSON line even for a failed run
        r = {"peer": "qemu", "ok": False, "error": str(e), "precopy_seconds_requested": args.precopy_seconds}
    if args.json:
        print(json.dumps(r))
    elif r.get("error"):
        print(f"qemu post-copy: FAILED: {r['error']}")
    else:
        print(f"qemu {r['qemu_version']} post-copy (preempt {'on' if r['postcopy_preempt'] else 'off'}), "
              f"pre-copy {r['precopy_seconds'] or 0:.3f} s: total {r['total_seconds']:.3f} s "
              f"(QEMU's total-time {r['qemu_total_ms']} ms), downtime {r['downtime_ms']} ms, "
              f"STOP->RESUME {r['stop_to_resume_ms']} ms, blocktime {r.get('postcopy_blocktime_ms')} ms, "
              f"postcopy requests {r.get('ram_postcopy_requests')}, ok {r['ok']}")
    sys.exit(0 if r.get("ok") else 1)


if __name__ == "__main__":
    main()
