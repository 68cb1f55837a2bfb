import { createInterface } from 'node:readline';
import { hashPassword } from '../gateway/broker/password-hash.js';
import { EXIT_OK, usageError, type CommandIo } from './common.js';

/** `iot-gateway hash-password`: reads a password from stdin (piped) or a hidden prompt. */
export async function hashPasswordCommand(
  io: CommandIo,
  stdin: NodeJS.ReadStream = process.stdin,
): Promise<number> {
  const password = stdin.isTTY ? await promptHidden(stdin) : await firstLine(stdin);
  if (password.length === 0)
    throw usageError(
      'no password given; pipe one in (echo -n secret | iot-gateway hash-password) or type it at the prompt',
    );
  io.out(await hashPassword(password));
  return EXIT_OK;
}

async function firstLine(stdin: NodeJS.ReadableStream): Promise<string> {
  const chunks: Buffer[] = [];
  let size = 0;
  for await (const chunk of stdin) {
    const buf = Buffer.isBuffer(chunk) ? chunk : Buffer.from(String(chunk));
    chunks.push(buf);
    size += buf.length;
    if (size > 64 * 1024) break; // a password, not a file
  }
  return Buffer.concat(chunks).toString('utf8').split(/\r?\n/)[0] ?? '';
}

function promptHidden(stdin: NodeJS.ReadStream): Promise<string> {
  return new Promise((resolve) => {
    process.stderr.write('Password: ');
    const rl = createInterface({ input: stdin, terminal: true });
    // Mute echo: readline writes typed characters through _writeToOutput.
    (rl as unknown as { _writeToOutput: (s: string) => void })._writeToOutput = () => {};
    rl.question('', (answer) => {
      rl.close();
      process.stderr.write('\n');
      resolve(answer);
    });
  });
}
