/**
 * Child process for the baselines: `bare PORT` is aedes with a TCP server and nothing else
 * (the RSS reference); `relay PORT UPSTREAM_PORT` adds an mqtt.js client that forwards every
 * device message QoS 1 to the upstream, with no durability (baseline (a)). Prints "ready".
 */
import { createServer } from 'node:net';
import { Aedes } from 'aedes';
import mqtt from 'mqtt';

async function main(): Promise<void> {
  const [mode, portArg, upstreamArg] = process.argv.slice(2);
  const port = Number(portArg);
  if ((mode !== 'bare' && mode !== 'relay') || !Number.isInteger(port)) {
    throw new Error('usage: relay-child bare|relay PORT [UPSTREAM_PORT]');
  }
  const broker = await Aedes.createBroker();
  const server = createServer({ noDelay: true }, broker.handle);
  let upstream: mqtt.MqttClient | undefined;
  if (mode === 'relay') {
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
