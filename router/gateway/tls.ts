/**
 * The gateway's TLS certificate: PEM files an operator provides, or, for local
 * clusters, a self-signed certificate generated once per directory and reused after.
 * Synchronous on purpose: it runs once at start-up, before the gateway listens.
 */
import { execFileSync } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import { createRequire } from 'node:module';
import os from 'node:os';
import path from 'node:path';

export interface TlsMaterial {
  key: string;
  cert: string;
  /** The certificate file (clients can use it as sslrootcert for sslmode=verify-full). */
  certFile: string;
  keyFile: string;
  /** True when this call generated the certificate. */
  generated: boolean;
  /** From the certificate, for logs. */
  subject: string;
  subjectAltName: string | undefined;
  validTo: Date;
  fingerprint256: string;
}

export interface TlsConfig {
  /** PEM files (both or neither). */
  certFile?: string;
  keyFile?: string;
  /** Else: a directory holding server.crt and server.key, generated (self-signed) when absent. */
  dir?: string;
  /** Extra DNS names or IPs for a generated certificate (localhost, 127.0.0.1, ::1 and the host name are always in). */
  hosts?: string[];
}

/** Marks certificates we generated: only those are ever replaced. */
const OUR_ORG = 'multigres-ts local cluster';
const RENEW_BEFORE_MS = 30 * 24 * 3600 * 1000;
const VALID_FOR_MS = 3 * 365 * 24 * 3600 * 1000;
/** How long to wait for another process that is generating the same directory's certificate. */
const PEER_WAIT_MS = 15_000;

/** The configured files, else the directory's (generated) certificate, else null: TLS off. */
export function resolveGatewayTls(cfg: TlsConfig): TlsMaterial | null {
  if (cfg.certFile || cfg.keyFile) {
    if (!cfg.certFile || !cfg.keyFile) throw new Error('tls: certFile and keyFile go together');
    return loadTlsFiles(cfg.certFile, cfg.keyFile);
  }
  if (cfg.dir) return loadOrCreateTls(cfg.dir, { hosts: cfg.hosts });
  return null;
}

/** Reads and checks a PEM certificate (chain) and its key; errors name the file. */
export function loadTlsFiles(certFile: string, keyFile: string): TlsMaterial {
  const read = (file: string) => {
    try {
      return fs.readFileSync(file, 'utf8');
    } catch (err) {
      throw new Error(`tls: cannot read ${file}: ${(err as Error).message}`);
    }
  };
  return describe(read(keyFile), read(certFile), certFile, keyFile, false);
}

/**
 * `<dir>/server.crt` and `<dir>/server.key` (Postgres's names): loaded when present;
 * otherwise a self-signed certificate (EC P-256, SHA-256, SANs for localhost, the loopback
 * addresses and the host name, valid 3 years) is generated once and kept there. One we
 * generated is replaced 30 days before it expires; operator-provided files never are.
 * Gateways starting at once on one directory agree on one certificate: the key file is
 * created with link(2), which only one of them wins.
 */
export function loadOrCreateTls(dir: string, opts: { hosts?: string[] } = {}): TlsMaterial {
  const certFile = path.join(dir, 'server.crt');
  const keyFile = path.join(dir, 'server.key');
  fs.mkdirSync(dir, { recursive: true, mode: 0o700 });

  const deadline = Date.now() + PEER_WAIT_MS;
  for (;;) {
    const hasKey = fs.existsSync(keyFile);
    const hasCert = fs.existsSync(certFile);
    if (hasKey && hasCert) {
      const m = loadTlsFiles(certFile, keyFile);
      if (!(m.subject.includes(`O=${OUR_ORG}`) && m.validTo.getTime() - Date.now() < RENEW_BEFORE_MS)) return m;
      fs.rmSync(keyFile, { force: true }); // ours and about to expire: make a new one
      fs.rmSync(certFile, { force: true });
      continue;
    }
    if (hasKey || hasCert) {
      // Another gateway is between writing the key and the certificate.
      if (Date.now() > deadline) {
        throw new Error(`tls: ${dir} has ${hasKey ? 'server.key but no server.crt' : 'server.crt but no server.key'}; provide both or remove it`);
      }
      sleepSync(50);
      continue;
    }
    const { key, cert } = generateSelfSigned(opts.hosts ?? []);
    const tag = `${process.pid}.${crypto.randomBytes(4).toString('hex')}`;
    const keyTmp = `${keyFile}.${tag}`;
    const certTmp = `${certFile}.${tag}`;
    fs.writeFileSync(keyTmp, key, { mode: 0o600 });
    fs.writeFileSync(certTmp, cert, { mode: 0o644 });
    try {
      fs.linkSync(keyTmp, keyFile);
    } catch (err) {
      fs.rmSync(certTmp, { force: true });
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
      continue; // another process won: wait for its certificate
    } finally {
      fs.rmSync(keyTmp, { force: true });
    }
    fs.renameSync(certTmp, certFile);
    return { ...loadTlsFiles(certFile, keyFile), generated: true };
  }
}

/**
 * selfsigned 5 is async only; start-up is synchronous, so it runs in a short child
 * Node process (about 0.1 s, once per directory).
 */
function generateSelfSigned(hosts: string[]): { key: string; cert: string } {
  const names = [...new Set(['localhost', os.hostname(), ...hosts].filter((h) => h && !isIp(h)))];
  const ips = [...new Set(['127.0.0.1', '::1', ...hosts.filter(isIp)])];
  const attrs = [{ name: 'commonName', value: 'mg-gateway' }, { name: 'organizationName', value: OUR_ORG }];
  const options = {
    keyType: 'ec',
    curve: 'P-256',
    algorithm: 'sha256',
    extensions: [
      { name: 'basicConstraints', cA: false },
      { name: 'keyUsage', digitalSignature: true, keyEncipherment: true },
      { name: 'extKeyUsage', serverAuth: true },
      { name: 'subjectAltName', altNames: [...names.map((value) => ({ type: 2, value })), ...ips.map((ip) => ({ type: 7, ip }))] },
    ],
  };
  const now = Date.now();
  const script = `
    const opts = ${JSON.stringify(options)};
    opts.notBeforeDate = new Date(${now - 3600_000});
    opts.notAfterDate = new Date(${now + VALID_FOR_MS});
    require(${JSON.stringify(createRequire(import.meta.url).resolve('selfsigned'))})
      .generate(${JSON.stringify(attrs)}, opts)
      .then((r) => process.stdout.write(JSON.stringify({ key: r.private, cert: r.cert })),
            (e) => { process.stderr.write(String(e && e.stack || e)); process.exit(1); });`;
  let out: string;
  try {
    out = execFileSync(process.execPath, ['-e', script], { encoding: 'utf8', timeout: 30_000, stdio: ['ignore', 'pipe', 'pipe'] });
  } catch (err) {
    const e = err as { stderr?: string; message: string };
    throw new Error(`tls: generating a self-signed certificate failed: ${e.stderr?.trim() || e.message}`);
  }
  return JSON.parse(out) as { key: string; cert: string };
}

function describe(key: string, cert: string, certFile: string, keyFile: string, generated: boolean): TlsMaterial {
  let x509: crypto.X509Certificate;
  let privateKey: crypto.KeyObject;
  try {
    x509 = new crypto.X509Certificate(cert);
  } catch (err) {
    throw new Error(`tls: ${certFile}: not a PEM certificate (${(err as Error).message})`);
  }
  try {
    privateKey = crypto.createPrivateKey(key);
  } catch (err) {
    throw new Error(`tls: ${keyFile}: not a PEM private key (${(err as Error).message})`);
  }
  if (!x509.checkPrivateKey(privateKey)) throw new Error(`tls: ${keyFile} does not match the certificate in ${certFile}`);
  return {
    key,
    cert,
    certFile,
    keyFile,
    generated,
    subject: x509.subject,
    subjectAltName: x509.subjectAltName,
    validTo: new Date(x509.validTo),
    fingerprint256: x509.fingerprint256,
  };
}

const isIp = (s: string) => /^\d{1,3}(\.\d{1,3}){3}$/.test(s) || s.includes(':');

function sleepSync(ms: number): void {
  Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, ms);
}
