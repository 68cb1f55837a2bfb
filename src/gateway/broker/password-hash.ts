import { createHash, randomBytes, scrypt, timingSafeEqual, type ScryptOptions } from 'node:crypto';

/**
 * Device password hashes for `broker.devices[].passwordHash`:
 * `$scrypt$N=16384,r=8,p=1$<salt base64>$<key base64>`. Node 20 has no argon2, and scrypt is
 * memory-hard, so it is the slow hash of choice here (S3).
 */

const DEFAULT_PARAMS = { N: 16384, r: 8, p: 1 } as const;
const SALT_BYTES = 16;
const KEY_BYTES = 32;
const PREFIX = '$scrypt$';

interface ParsedHash {
  N: number;
  r: number;
  p: number;
  salt: Buffer;
  key: Buffer;
}

function scryptAsync(
  password: Buffer,
  salt: Buffer,
  keyLength: number,
  options: ScryptOptions,
): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    scrypt(password, salt, keyLength, options, (err, key) => (err ? reject(err) : resolve(key)));
  });
}

/** scrypt needs about 128·N·r bytes; the default maxmem (32 MiB) is too small above N=2^17·r=1. */
function scryptOptions(N: number, r: number, p: number): ScryptOptions {
  return { N, r, p, maxmem: 256 * N * r + 1024 * 1024 };
}

/** Strict parse: anything that is not exactly our format is not a hash (CVE-2018-12551 class). */
function parseHash(hash: string): ParsedHash | undefined {
  if (typeof hash !== 'string' || !hash.startsWith(PREFIX)) return undefined;
  const parts = hash.slice(PREFIX.length).split('$');
  if (parts.length !== 3) return undefined;
  const [paramText, saltText, keyText] = parts as [string, string, string];
  const params = /^N=(\d{1,7}),r=(\d{1,2}),p=(\d{1,2})$/.exec(paramText);
  if (!params) return undefined;
  const N = Number(params[1]);
  const r = Number(params[2]);
  const p = Number(params[3]);
  // N a power of two in [2^10, 2^17]: cheaper is not a slow hash, dearer is a memory DoS.
  if (N < 1024 || N > 131072 || (N & (N - 1)) !== 0) return undefined;
  if (r < 1 || r > 32 || p < 1 || p > 16) return undefined;
  const base64 = /^[A-Za-z0-9+/]+={0,2}$/;
  if (!base64.test(saltText) || !base64.test(keyText)) return undefined;
  const salt = Buffer.from(saltText, 'base64');
  const key = Buffer.from(keyText, 'base64');
  if (salt.length < 16 || key.length < 16 || key.length > 64) return undefined;
  return { N, r, p, salt, key };
}

/** Hashes a password with a fresh 16-byte salt and the default cost. */
export async function hashPassword(password: string): Promise<string> {
  const { N, r, p } = DEFAULT_PARAMS;
  const salt = randomBytes(SALT_BYTES);
  const key = await scryptAsync(Buffer.from(password, 'utf8'), salt, KEY_BYTES, scryptOptions(N, r, p));
  return `${PREFIX}N=${N},r=${r},p=${p}$${salt.toString('base64')}$${key.toString('base64')}`;
}

/** True only when `password` matches `hash`; a malformed hash is false. Never throws. */
export async function verifyPassword(password: string | Buffer, hash: string): Promise<boolean> {
  const parsed = parseHash(hash);
  if (!parsed) return false;
  try {
    const candidate = await scryptAsync(
      typeof password === 'string' ? Buffer.from(password, 'utf8') : password,
      parsed.salt,
      parsed.key.length,
      scryptOptions(parsed.N, parsed.r, parsed.p),
    );
    return timingSafeEqual(candidate, parsed.key);
  } catch {
    return false;
  }
}

/** True when the string has the shape of a hash we can verify. */
export function isPasswordHash(hash: string): boolean {
  return parseHash(hash) !== undefined;
}

export interface PasswordVerifierOptions {
  /** Successful verifications remembered, so reconnect storms do not burn CPU. */
  cacheSize?: number;
  cacheTtlMs?: number;
  now?: () => number;
}

export interface PasswordVerifier {
  /**
   * Verifies against `hash`; with no hash (unknown user, certificate-only device) it spends a
   * dummy scrypt of the same cost and returns false, so timing does not tell which ids exist.
   */
  verify(password: string | Buffer, hash: string | undefined): Promise<boolean>;
  readonly cacheSize: number;
}

/** A well-formed hash of no one's password at the default cost, verified only for its timing. */
export const TIMING_DUMMY_HASH =
  '$scrypt$N=16384,r=8,p=1$ZHVtbXktc2FsdC1mb3ItdGltaW5n$Q2xvc2VkRG9vckR1bW15S2V5Rm9yVGltaW5nT25seSE=';

export function createPasswordVerifier(options: PasswordVerifierOptions = {}): PasswordVerifier {
  const maxEntries = options.cacheSize ?? 1000;
  const ttlMs = options.cacheTtlMs ?? 5 * 60_000;
  const now = options.now ?? Date.now;
  // Map iteration order is insertion order: re-inserting on hit makes it an LRU.
  const cache = new Map<string, number>();

  const cacheKey = (password: string | Buffer, hash: string): string =>
    createHash('sha256')
      .update(hash)
      .update('\u0000')
      .update(typeof password === 'string' ? Buffer.from(password, 'utf8') : password)
      .digest('base64');

  return {
    get cacheSize() {
      return cache.size;
    },
    async verify(password, hash) {
      if (hash === undefined || !isPasswordHash(hash)) {
        await verifyPassword(password, TIMING_DUMMY_HASH);
        return false;
      }
      const key = cacheKey(password, hash);
      const expires = cache.get(key);
      if (expires !== undefined) {
        cache.delete(key);
        if (expires > now()) {
          cache.set(key, expires);
          return true;
        }
      }
      const ok = await verifyPassword(password, hash);
      if (ok) {
        cache.set(key, now() + ttlMs);
        while (cache.size > maxEntries) {
          const oldest = cache.keys().next().value;
          if (oldest === undefined) break;
          cache.delete(oldest);
        }
      }
      return ok;
    },
  };
}
