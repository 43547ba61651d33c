/**
 * A real Kubernetes control plane for the operator's tests: etcd, kube-apiserver and
 * kube-controller-manager built from upstream sources (test/k8s/controlplane/build.sh, cached
 * like the Kafka jars) and started on 127.0.0.1 with token auth and RBAC. No kubelet: pods are
 * created and scheduled nowhere, so containers never run. Decision 0044 has versions and flags.
 */
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { Health, KubeConfig } from '@kubernetes/client-node';
import { isAlive, readPid, spawnDetached, stopProcess, waitFor } from '../../compose/supervise.ts';

const buildScript = path.join(path.dirname(fileURLToPath(import.meta.url)), '..', 'k8s', 'controlplane', 'build.sh');

export interface ControlPlane {
  /** https://127.0.0.1:<port> of the API server. */
  server: string;
  /** A kubeconfig file for a user with the given token (see `tokens`). */
  kubeconfigFile(user: keyof ControlPlane['tokens']): string;
  kubeConfig(user: keyof ControlPlane['tokens']): KubeConfig;
  tokens: { admin: string; operator: string };
  /** The name the API server gives the operator's token user (RBAC subjects bind it). */
  operatorUser: string;
  /** Milliseconds from the first spawn until the API server answered /readyz. */
  startMs: number;
  stop(): Promise<void>;
}

export interface ControlPlaneOptions {
  dir: string;
  /** etcd client +0, etcd peer +1, API server +2, controller manager +3. */
  basePort: number;
  /** Runs before the controller manager starts (it sees CRDs installed here from its first sync). */
  beforeControllers?: (kc: KubeConfig, kubeconfigFile: string) => Promise<void>;
}

/** The cache directory holding the binaries, building them first when it is empty. */
export function controlPlaneBinaries(): string {
  return execFileSync('bash', [buildScript], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'inherit'] }).trim();
}

export const OPERATOR_NAMESPACE = 'multigres-system';
export const OPERATOR_SERVICE_ACCOUNT = 'multigres-operator';

export async function startControlPlane(opts: ControlPlaneOptions): Promise<ControlPlane> {
  const bin = controlPlaneBinaries();
  const { dir, basePort } = opts;
  const runDir = path.join(dir, 'run');
  const logDir = path.join(dir, 'logs');
  const pki = path.join(dir, 'pki');
  fs.mkdirSync(pki, { recursive: true });
  const etcdUrl = `http://127.0.0.1:${basePort}`;
  const server = `https://127.0.0.1:${basePort + 2}`;
  const tokens = { admin: `admin-${Date.now().toString(36)}`, operator: `operator-${Date.now().toString(36)}` };
  // A token-file user named like the operator's service account, so the RBAC manifests of
  // compose/k8s bind it exactly as they bind the real service account in a cluster.
  const operatorUser = `system:serviceaccount:${OPERATOR_NAMESPACE}:${OPERATOR_SERVICE_ACCOUNT}`;
  fs.writeFileSync(path.join(pki, 'tokens.csv'),
    `${tokens.admin},admin,admin,"system:masters"\n${tokens.operator},${operatorUser},operator,"system:serviceaccounts,system:serviceaccounts:${OPERATOR_NAMESPACE}"\n`);
  const saKey = path.join(pki, 'sa.key');
  const saPub = path.join(pki, 'sa.pub');
  if (!fs.existsSync(saKey)) {
    execFileSync('openssl', ['genrsa', '-out', saKey, '2048'], { stdio: 'ignore' });
    execFileSync('openssl', ['rsa', '-in', saKey, '-pubout', '-out', saPub], { stdio: 'ignore' });
  }

  const kubeconfigFile = (user: keyof typeof tokens) => {
    const file = path.join(pki, `${user}.kubeconfig`);
    fs.writeFileSync(file, JSON.stringify({
      apiVersion: 'v1', kind: 'Config', 'current-context': user,
      clusters: [{ name: 'test', cluster: { server, 'insecure-skip-tls-verify': true } }],
      users: [{ name: user, user: { token: tokens[user] } }],
      contexts: [{ name: user, context: { cluster: 'test', user } }],
    }));
    return file;
  };
  const kubeConfig = (user: keyof typeof tokens) => {
    const kc = new KubeConfig();
    kc.loadFromFile(kubeconfigFile(user));
    return kc;
  };

  const started = Date.now();
  const start = (name: string, args: string[]) => spawnDetached({ name, command: path.join(bin, name), args, runDir, logFile: path.join(logDir, `${name}.log`) });
  const stop = async () => {
    // The API server first: stopping etcd under it makes it spin on reconnects.
    for (const name of ['kube-controller-manager', 'kube-apiserver', 'etcd']) await stopProcess(runDir, name, { graceMs: 5_000 });
  };
  const failWithLog = async (name: string, err: unknown): Promise<never> => {
    await stop();
    const log = fs.existsSync(path.join(logDir, `${name}.log`)) ? fs.readFileSync(path.join(logDir, `${name}.log`), 'utf8').slice(-3_000) : '';
    throw new Error(`${(err as Error).message}\n--- ${name} log\n${log}`);
  };

  await start('etcd', [
    '--name', 'test', '--data-dir', path.join(dir, 'etcd'),
    '--listen-client-urls', etcdUrl, '--advertise-client-urls', etcdUrl,
    '--listen-peer-urls', `http://127.0.0.1:${basePort + 1}`, '--initial-advertise-peer-urls', `http://127.0.0.1:${basePort + 1}`,
    '--initial-cluster', `test=http://127.0.0.1:${basePort + 1}`,
    '--quota-backend-bytes', String(1 << 30), '--log-level', 'warn',
  ]);
  await start('kube-apiserver', [
    '--etcd-servers', etcdUrl,
    '--bind-address', '127.0.0.1', '--advertise-address', '127.0.0.1', '--secure-port', String(basePort + 2),
    '--cert-dir', path.join(pki, 'serving'),
    '--token-auth-file', path.join(pki, 'tokens.csv'),
    '--authorization-mode', 'RBAC',
    '--service-account-issuer', 'https://kubernetes.default.svc.cluster.local',
    '--service-account-key-file', saPub, '--service-account-signing-key-file', saKey,
    '--service-cluster-ip-range', '10.96.0.0/16',
    // No kubelet and no real node network: the default reconciler refuses a loopback address.
    '--endpoint-reconciler-type', 'none',
    // Without a token controller no service-account token would exist for the admission plugin to mount.
    '--disable-admission-plugins', 'ServiceAccount',
  ]);
  const admin = kubeConfig('admin');
  try {
    await waitFor(async () => (await ready(admin)) || !alive(runDir, 'kube-apiserver'), { timeoutMs: 90_000, intervalMs: 250, what: `kube-apiserver on ${server}` });
    if (!alive(runDir, 'kube-apiserver')) throw new Error('kube-apiserver exited during startup');
  } catch (err) {
    return failWithLog('kube-apiserver', err);
  }
  const startMs = Date.now() - started;
  try {
    await opts.beforeControllers?.(admin, kubeconfigFile('admin'));
  } catch (err) {
    // The caller gets no handle to stop them with: etcd and the API server would outlive the test, holding its ports.
    await stop();
    throw err;
  }
  await start('kube-controller-manager', [
    '--kubeconfig', kubeconfigFile('admin'),
    '--authentication-kubeconfig', kubeconfigFile('admin'), '--authorization-kubeconfig', kubeconfigFile('admin'),
    '--bind-address', '127.0.0.1', '--secure-port', String(basePort + 3),
    '--leader-elect=false', '--use-service-account-credentials=false',
    '--cert-dir', path.join(pki, 'kcm'),
  ]);
  return { server, kubeconfigFile, kubeConfig, tokens, operatorUser, startMs, stop };
}

function alive(runDir: string, name: string): boolean {
  const pid = readPid(runDir, name);
  return pid !== undefined && isAlive(pid);
}

async function ready(kc: KubeConfig): Promise<boolean> {
  try {
    return await new Health(kc).readyz({ timeout: 2_000 });
  } catch {
    return false;
  }
}
