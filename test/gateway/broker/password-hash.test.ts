import { describe, expect, it } from 'vitest';
import {
  TIMING_DUMMY_HASH,
  createPasswordVerifier,
  hashPassword,
  isPasswordHash,
  verifyPassword,
} from '../../../src/gateway/broker/password-hash.js';

describe('password hashes', () => {
  it('hashes in the documented format with a fresh salt each time', async () => {
    const a = await hashPassword('correct horse');
    const b = await hashPassword('correct horse');
    expect(a).toMatch(/^\$scrypt\$N=16384,r=8,p=1\$[A-Za-z0-9+/]{22}==\$[A-Za-z0-9+/]{43}=$/);
    expect(a).not.toBe(b);
    expect(isPasswordHash(a)).toBe(true);
  });

  it('verifies the right password (string or bytes) and refuses a wrong one', async () => {
    const hash = await hashPassword('correct horse');
    expect(await verifyPassword('correct horse', hash)).toBe(true);
    expect(await verifyPassword(Buffer.from('correct horse'), hash)).toBe(true);
    expect(await verifyPassword('correct horsE', hash)).toBe(false);
    expect(await verifyPassword('', hash)).toBe(false);
  });

  it('treats malformed or tampered hashes as not matching, never as valid', async () => {
    const hash = await hashPassword('pw');
    const [, , params, salt, key] = hash.split('$');
    const tampered = [
      '',
      '$scrypt$',
      'plain-text-password',
      `$scrypt$${params}$${salt}`,
      `$scrypt$${params}$${salt}$${key}$extra`,
      `$scrypt$N=16385,r=8,p=1$${salt}$${key}`,
      `$scrypt$N=16384,r=8,p=1$${salt}$`,
      `$scrypt$N=16384,r=8,p=1$$${key}`,
      `$scrypt$N=16384,r=8,p=1$!!!!$${key}`,
      `$scrypt$N=1048576,r=8,p=1$${salt}$${key}`,
      `$scrypt$N=16384,r=8,p=1$${salt}$${Buffer.alloc(32).toString('base64')}`,
    ];
    for (const bad of tampered) {
      expect(await verifyPassword('pw', bad), bad).toBe(false);
    }
    expect(tampered.slice(0, -1).some(isPasswordHash)).toBe(false);
  });

  it('caches successful verifications for a while, keyed by hash and password', async () => {
    let now = 1_000_000;
    const verifier = createPasswordVerifier({ cacheSize: 2, cacheTtlMs: 60_000, now: () => now });
    const hash = await hashPassword('pw');
    expect(await verifier.verify('pw', hash)).toBe(true);
    expect(verifier.cacheSize).toBe(1);
    expect(await verifier.verify('wrong', hash)).toBe(false);
    expect(verifier.cacheSize).toBe(1);
    expect(await verifier.verify('pw', hash)).toBe(true);
    now += 61_000;
    expect(await verifier.verify('pw', hash)).toBe(true);
    // A changed hash for the same password is a different entry; the cache stays bounded.
    const other = await hashPassword('pw');
    const third = await hashPassword('pw');
    await verifier.verify('pw', other);
    await verifier.verify('pw', third);
    expect(verifier.cacheSize).toBe(2);
  });

  it('answers an unknown user (no hash) with false after a dummy verification', async () => {
    // The dummy must be a real, full-cost hash, or unknown users would be answered faster.
    expect(isPasswordHash(TIMING_DUMMY_HASH)).toBe(true);
    expect(TIMING_DUMMY_HASH.startsWith('$scrypt$N=16384,r=8,p=1$')).toBe(true);
    const verifier = createPasswordVerifier();
    expect(await verifier.verify('anything', undefined)).toBe(false);
    expect(await verifier.verify('anything', 'not-a-hash')).toBe(false);
  });
});
