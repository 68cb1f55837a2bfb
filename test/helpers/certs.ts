import { execFileSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

export interface TestPki {
  dir: string;
  /** Paths of PEM files. */
  caCert: string;
  serverCert: string;
  serverKey: string;
  /** Issues a client certificate with this CN, signed by the test CA (or by `otherCa`). */
  issueClient(cn: string, options?: { signedByOtherCa?: boolean }): { cert: Buffer; key: Buffer };
  /** Issues another server certificate for `dnsName` only (an impostor's, for a wrong host or CA). */
  issueServer(dnsName: string, options?: { signedByOtherCa?: boolean }): { cert: Buffer; key: Buffer };
  readonly ca: Buffer;
  /** Revokes a certificate of the test CA; the next `writeCrl` lists it. */
  revoke(cert: Buffer): void;
  /** Writes the test CA's current CRL (PEM) to `path`. */
  writeCrl(path: string): void;
  cleanup(): void;
}

/**
 * A throwaway PKI made with the `openssl` command: a CA, a server certificate for
 * localhost / 127.0.0.1, client certificates on demand, and a second unrelated CA.
 */
export function createTestPki(): TestPki {
  const dir = mkdtempSync(join(tmpdir(), 'gw-pki-'));
  const p = (name: string) => join(dir, name);
  const openssl = (...args: string[]) =>
    execFileSync('openssl', args, { cwd: dir, stdio: ['ignore', 'pipe', 'pipe'] });

  const makeCa = (name: string, cn: string) => {
    openssl(
      'req',
      '-x509',
      '-newkey',
      'rsa:2048',
      '-nodes',
      '-days',
      '2',
      '-subj',
      `/CN=${cn}`,
      '-keyout',
      p(`${name}.key`),
      '-out',
      p(`${name}.crt`),
    );
  };
  makeCa('ca', 'gw-test-ca');
  makeCa('other-ca', 'gw-other-ca');

  let serial = 1;
  const issue = (name: string, cn: string, ca: string, ext: string) => {
    openssl(
      'req',
      '-newkey',
      'rsa:2048',
      '-nodes',
      '-subj',
      `/CN=${cn}`,
      '-keyout',
      p(`${name}.key`),
      '-out',
      p(`${name}.csr`),
    );
    writeFileSync(p(`${name}.ext`), ext);
    openssl(
      'x509',
      '-req',
      '-in',
      p(`${name}.csr`),
      '-CA',
      p(`${ca}.crt`),
      '-CAkey',
      p(`${ca}.key`),
      '-set_serial',
      String(serial++),
      '-days',
      '2',
      '-extfile',
      p(`${name}.ext`),
      '-out',
      p(`${name}.crt`),
    );
  };
  issue(
    'server',
    'localhost',
    'ca',
    'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n',
  );

  // `openssl ca` keeps what it revoked in index.txt; the CRL is made from it.
  writeFileSync(p('index.txt'), '');
  writeFileSync(p('crlnumber'), '1000\n');
  writeFileSync(
    p('ca.cnf'),
    [
      '[ ca ]',
      'default_ca = test_ca',
      '[ test_ca ]',
      `database = ${p('index.txt')}`,
      `crlnumber = ${p('crlnumber')}`,
      `certificate = ${p('ca.crt')}`,
      `private_key = ${p('ca.key')}`,
      'default_md = sha256',
      'default_crl_days = 2',
      '',
    ].join('\n'),
  );
  let revoked = 0;

  let clients = 0;
  return {
    dir,
    caCert: p('ca.crt'),
    serverCert: p('server.crt'),
    serverKey: p('server.key'),
    get ca() {
      return readFileSync(p('ca.crt'));
    },
    issueClient(cn, options = {}) {
      const name = `client-${clients++}`;
      issue(name, cn, options.signedByOtherCa ? 'other-ca' : 'ca', 'extendedKeyUsage=clientAuth\n');
      return { cert: readFileSync(p(`${name}.crt`)), key: readFileSync(p(`${name}.key`)) };
    },
    issueServer(dnsName, options = {}) {
      const name = `server-${clients++}`;
      issue(
        name,
        dnsName,
        options.signedByOtherCa ? 'other-ca' : 'ca',
        `subjectAltName=DNS:${dnsName}\nextendedKeyUsage=serverAuth\n`,
      );
      return { cert: readFileSync(p(`${name}.crt`)), key: readFileSync(p(`${name}.key`)) };
    },
    revoke(cert) {
      const file = p(`revoked-${revoked++}.crt`);
      writeFileSync(file, cert);
      openssl('ca', '-config', p('ca.cnf'), '-revoke', file);
    },
    writeCrl(path) {
      openssl('ca', '-config', p('ca.cnf'), '-gencrl', '-out', path);
    },
    cleanup() {
      rmSync(dir, { recursive: true, force: true });
    },
  };
}
