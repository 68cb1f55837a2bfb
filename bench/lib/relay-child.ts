/**
 * Child process for the baselines: `bare PORT` is aedes with a TCP server and nothing else
 * (the RSS reference); `relay PORT UPSTREAM_PORT` adds an mqtt.js client that forwards every
 * device message QoS 1 to the upstream, with no durability (baseline (a)); `durable PORT
 * UPSTREAM_PORT DIR` is that relay with the least a broker must do before a PUBACK that
 * survives power loss: every message inserted into SQLite, one synchronous=FULL commit per turn
 * of the event loop for all that arrived, the PUBACK after it (the durability floor: no queue
 * limits, no deletes, no redelivery). Prints "ready".
 */
import { timingSafeEqual } from 'node:crypto';
import { createServer } from 'node:net';
import { join } from 'node:path';
import { Aedes, type AuthorizePublishHandler } from 'aedes';
import Database from 'better-sqlite3';
import mqtt from 'mqtt';

/** authorizePublish that makes each QoS > 0 message durable before aedes may PUBACK it. */
function durableHook(dir: string): AuthorizePublishHandler {
  const db = new Database(join(dir, 'floor.db'));
  db.pragma('journal_mode = WAL');
  db.pragma('synchronous = FULL');
  db.exec(
    'CREATE TABLE IF NOT EXISTS messages (id INTEGER PRIMARY KEY, topic TEXT NOT NULL, payload BLOB NOT NULL)',
  );
  const insert = db.prepare('INSERT INTO messages (topic, payload) VALUES (?, ?)');
  let staged: { topic: string; payload: Buffer; done: (err?: Error | null) => void }[] = [];
  const commit = db.transaction((batch: typeof staged) => {
    for (const m of batch) insert.run(m.topic, m.payload);
  });
  const flush = () => {
    const batch = staged;
    staged = [];
    try {
      commit(batch);
    } catch (err) {
      for (const m of batch) m.done(err as Error);
      return;
    }
    for (const m of batch) m.done(null);
  };
  return (_client, packet, done) => {
    if (packet.qos === 0) return done(null);
    if (staged.length === 0) setImmediate(flush);
    staged.push({ topic: packet.topic, payload: packet.payload as Buffer, done });
  };
}

async function main(): Promise<void> {
  const argv = process.argv.slice(2);
  // --password=P: a client that presents credentials must present this password (anonymous
  // clients still connect), as the gateway and Mosquitto check theirs in the bench.
  const password = argv.find((a) => a.startsWith('--password='))?.slice('--password='.length);
  const [mode, portArg, upstreamArg, dir] = argv.filter((a) => !a.startsWith('--password='));
  const port = Number(portArg);
  if (
    (mode !== 'bare' && mode !== 'relay' && mode !== 'durable') ||
    !Number.isInteger(port) ||
    (mode === 'durable' && dir === undefined)
  ) {
    throw new Error('usage: relay-child bare|relay|durable PORT [UPSTREAM_PORT] [DIR]');
  }
  const broker = await Aedes.createBroker({
    ...(mode === 'durable' ? { authorizePublish: durableHook(dir!) } : {}),
    ...(password === undefined
      ? {}
      : {
          authenticate: (_client, username, given, done) => {
            const ok =
              username === undefined || (given !== undefined && timingSafeEqualText(given, password));
            done(null, ok);
          },
        }),
  });
  const server = createServer({ noDelay: true }, broker.handle);
  let upstream: mqtt.MqttClient | undefined;
  if (mode === 'relay' || mode === 'durable') {
    upstream = await mqtt.connectAsync(`mqtt://127.0.0.1:${Number(upstreamArg)}`, {
      clientId: `bench-relay-${process.pid}`,
      clean: true,
      reconnectPeriod: 1_000,
    });
    const client = upstream;
    broker.on('publish', (packet, from) => {
      if (from === null) return;
      client.publish(packet.topic, packet.payload as Buffer, { qos: 1 }, () => {});
    });
  }
  await new Promise<void>((resolve) => server.listen(port, '127.0.0.1', resolve));
  process.stdout.write('ready\n');
  const stop = () => {
    server.close();
    broker.close(() => {
      if (upstream) upstream.end(false, () => process.exit(0));
      else process.exit(0);
    });
    setTimeout(() => process.exit(0), 3_000).unref();
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
}

main().catch((err: unknown) => {
  process.stderr.write(`${(err as Error).stack ?? String(err)}\n`);
  process.exit(1);
});

function timingSafeEqualText(given: Buffer, expected: string): boolean {
  const want = Buffer.from(expected);
  return given.length === want.length && timingSafeEqual(given, want);
}
