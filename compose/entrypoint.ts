/**
 * The Multigres image's entry point (decision 0076): `entrypoint agent|pooler|gateway|orchestrator`,
 * the argument the operator's manifests give each container. Writes the component's configuration
 * (compose/pod-config.ts, from the pod's environment and the mounted cluster spec) and runs the
 * component as `mg cluster up` does (compose/launch.ts's nodeArgs: the bundle under MG_DIST),
 * passing the kubelet's SIGTERM on and exiting as it exits.
 */
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { nodeArgs } from './launch.ts';
import { COMPONENTS, podConfig, type Component } from './pod-config.ts';

const component = process.argv[2] as Component;
if (!(component in COMPONENTS)) {
  console.error(`usage: entrypoint ${Object.keys(COMPONENTS).join('|')}`);
  process.exit(2);
}
let started;
try {
  started = podConfig(component, process.env, JSON.parse(fs.readFileSync(process.env.MG_SPEC_FILE ?? '/etc/multigres/spec.json', 'utf8')));
} catch (err) {
  // A missing variable, an unreadable or invalid spec: the container cannot start; the message says why.
  console.error(`entrypoint ${component}: ${(err as Error).message}`);
  process.exit(2);
}
const file = path.join(fs.mkdtempSync(path.join(os.tmpdir(), 'mg-')), `${component}.json`);
fs.writeFileSync(file, JSON.stringify(started.config, null, 2), { mode: 0o600 }); // the orchestrator's holds the API token
const child = spawn(process.execPath, [...nodeArgs(started.entry), '--config', file], { stdio: 'inherit', env: { ...process.env, ...started.env } });
for (const signal of ['SIGTERM', 'SIGINT'] as const) process.on(signal, () => child.kill(signal));
child.on('exit', (code, signal) => process.exit(code ?? 128 + (signal ? os.constants.signals[signal] : 0)));
