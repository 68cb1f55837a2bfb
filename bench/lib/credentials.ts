import { execFile, spawn } from 'node:child_process';
import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { promisify } from 'node:util';

/**
 * Password logins for the bench devices (BENCH_AUTH, on by default): every system checks a
 * password at CONNECT, as a site runs it. Device i is `bench-d{i}` (client id and username).
 */
export interface DeviceAuth {
  readonly password: string;
  /** scrypt hash for the gateway's broker.devices[].passwordHash */
  readonly gatewayHash: string;
}

export const BENCH_PASSWORD = 'bench-device-secret';
export const benchDeviceId = (i: number) => `bench-d${i}`;

/** Hashes the bench password with the gateway's own `hash-password` command. */
export async function createDeviceAuth(cliPath: string): Promise<DeviceAuth> {
  const gatewayHash = await new Promise<string>((resolve, reject) => {
    const child = spawn(process.execPath, [cliPath, 'hash-password'], { stdio: ['pipe', 'pipe', 'inherit'] });
    let out = '';
    child.stdout.on('data', (d: Buffer) => (out += d.toString()));
    child.on('error', reject);
    child.on('exit', (code) =>
      code === 0 ? resolve(out.trim()) : reject(new Error(`hash-password exited ${code}`)),
    );
    child.stdin.end(`${BENCH_PASSWORD}\n`);
  });
  return { password: BENCH_PASSWORD, gatewayHash };
}

/** A Mosquitto password_file for `count` bench devices (mosquitto_passwd -U hashes it in place). */
export async function writeMosquittoPasswords(dir: string, count: number): Promise<string> {
  const path = join(dir, 'passwords');
  const lines = Array.from({ length: count }, (_, i) => `${benchDeviceId(i)}:${BENCH_PASSWORD}`);
  await writeFile(path, `${lines.join('\n')}\n`, { mode: 0o600 });
  await promisify(execFile)('mosquitto_passwd', ['-U', path]);
  return path;
}
