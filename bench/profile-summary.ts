/**
 * `node dist-bench/bench/profile-summary.js <file.cpuprofile>`: what a CPU profile of the gateway
 * (BENCH_PROFILE=dir) spent its busy time on. First the shares issue 11 asks for, inclusive (a
 * sample counts for an area when any frame of its stack is in it, so areas overlap), then the
 * functions with the most self time. Shares are of busy time: idle samples are left out.
 */
import { readFileSync } from 'node:fs';

interface CallFrame {
  functionName: string;
  url: string;
  lineNumber: number;
}
interface ProfileNode {
  id: number;
  callFrame: CallFrame;
  children?: number[];
}
interface CpuProfile {
  nodes: ProfileNode[];
  samples: number[];
  timeDeltas: number[];
}

const AREAS: [string, (f: CallFrame) => boolean][] = [
  ['aedes (any frame)', (f) => f.url.includes('/node_modules/aedes/')],
  [
    'device lane (packet routing, parse, PUBACK writes)',
    (f) => f.url.includes('/broker/device-lane.js') || f.url.includes('/broker/packet-limit.js'),
  ],
  ['mqtt-packet parser (device and upstream packets)', (f) => f.url.includes('/mqtt-packet/parser.js')],
  ['authorizePublish (ACL, ingest, commit wait)', (f) => f.functionName === 'authorizePublish'],
  ['SQLite insert: outbox writeBatch (+ COMMIT)', (f) => isOutbox(f) && f.functionName === 'flushNow'],
  ['SQLite delete: outbox ack (+ COMMIT)', (f) => isOutbox(f) && f.functionName === 'ack'],
  ['outbox read (cache miss = SELECT)', (f) => isOutbox(f) && f.functionName === 'read'],
  [
    'upstream publish path (provider publish, mqtt-link and its wire code, mqtt.js, PUBACK handling)',
    (f) =>
      f.url.includes('/node_modules/mqtt/') ||
      f.url.includes('/providers/mqtt-link.js') ||
      f.url.includes('/providers/mqtt-wire.js') ||
      (f.url.includes('mqtt-provider') && f.functionName === 'publish'),
  ],
  ['forwarder', (f) => f.url.includes('/delivery/forwarder.js')],
  ['debug (disabled trace calls)', (f) => f.url.includes('/node_modules/debug/')],
  ['socket writes (writev)', (f) => f.functionName === 'writev' || f.functionName === 'writeBuffer'],
  ['garbage collector', (f) => f.functionName === '(garbage collector)'],
];

function isOutbox(f: CallFrame): boolean {
  return f.url.endsWith('/store/outbox.js');
}

function where(f: CallFrame): string {
  const pkg = /node_modules\/((?:@[^/]+\/)?[^/]+)/.exec(f.url);
  if (pkg) return pkg[1]!;
  const own = f.url.split('/dist/')[1];
  if (own !== undefined) return own;
  return f.url === '' ? 'native' : f.url;
}

function summarise(profile: CpuProfile): string {
  const byId = new Map(profile.nodes.map((n) => [n.id, n]));
  const parent = new Map<number, number>();
  for (const n of profile.nodes) for (const c of n.children ?? []) parent.set(c, n.id);
  const areasOf = new Map<number, Set<string>>();
  const areas = (id: number): Set<string> => {
    let hit = areasOf.get(id);
    if (hit !== undefined) return hit;
    hit = new Set();
    for (let cur: number | undefined = id; cur !== undefined; cur = parent.get(cur)) {
      const frame = byId.get(cur)!.callFrame;
      for (const [name, test] of AREAS) if (test(frame)) hit.add(name);
    }
    areasOf.set(id, hit);
    return hit;
  };
  let busy = 0;
  const inclusive = new Map<string, number>();
  const self = new Map<string, number>();
  for (let i = 0; i < profile.samples.length; i++) {
    const node = byId.get(profile.samples[i]!)!;
    const dt = profile.timeDeltas[i] ?? 0;
    if (node.callFrame.functionName === '(idle)') continue;
    busy += dt;
    for (const name of areas(node.id)) inclusive.set(name, (inclusive.get(name) ?? 0) + dt);
    const f = node.callFrame;
    const key = `${f.functionName || '(anonymous)'} ${where(f)}:${f.lineNumber + 1}`;
    self.set(key, (self.get(key) ?? 0) + dt);
  }
  const pct = (t: number) => `${((100 * t) / busy).toFixed(1)} %`;
  const lines = [`busy ${(busy / 1e6).toFixed(1)} s of CPU samples`, '', 'inclusive share of busy time:'];
  for (const [name] of AREAS) lines.push(`  ${pct(inclusive.get(name) ?? 0).padStart(7)}  ${name}`);
  lines.push('', 'top self time:');
  for (const [key, t] of [...self].sort((a, b) => b[1] - a[1]).slice(0, 20))
    lines.push(`  ${pct(t).padStart(7)}  ${key}`);
  return lines.join('\n');
}

const files = process.argv.slice(2);
if (files.length === 0) {
  console.error('usage: node dist-bench/bench/profile-summary.js <file.cpuprofile>...');
  process.exit(2);
}
for (const file of files) {
  console.log(`## ${file}\n${summarise(JSON.parse(readFileSync(file, 'utf8')) as CpuProfile)}\n`);
}
